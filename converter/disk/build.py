"""`imgconv oci-to-qcow2`: an OCI image becomes a bootable, read-only VM disk that runs its ENTRYPOINT.

The conversion is the pipeline :func:`pipeline` assembles (each step a function of the run's context,
with a stable id that ``--json`` progress and ``make bench`` report):

    check-inputs     OUTPUT writable and free, the boot code present, --kernel readable
    read-image       manifest and config verified (layers are verified as they stream)
    plan             what to run (Docker's argv/env/user/cwd rules), disk size and inodes, filesystem UUID
    create-disk      an empty sparse raw file under a temporary name beside OUTPUT
    partition        MBR partition table, ext4 (GPT with an EFI system partition first for --firmware uefi|both),
                     made on the host with ids and times from the image (converter/disk/reproducible.py)
    launch-appliance one libguestfs appliance, in a worker thread (Ctrl-C is seen at once)
      write-rootfs     the image's layers, flattened, streamed in through a FIFO (nothing extracted on the host)
      choose-kernel    --kernel, else the image's own, else this machine's newest
      add-imgconv-files init, its spec, config, host modules, origin record
      install-boot     kernel, initramfs, extlinux and the MBR code (extlinux only with a BIOS path)
      install-uefi     --firmware uefi|both: a unified kernel image at EFI/BOOT/BOOTX64.EFI (converter/disk/uefi.py)
    close-appliance  shutdown; a failed flush fails the conversion
    settle-filesystem inode and superblock times, generations and the journal made the build's own (host tools)
    finish-disk      the raw disk converted to qcow2 or another format (compressed with --compress)
    publish          mode 0444, sha256, sidecar, atomic rename

Everything imgconv adds to the guest lives under `/.imgconv`, except the modules tree of a host kernel,
which must be where modprobe looks. `/.imgconv/origin.json` records every path added so `vm-to-oci` can
take them out again.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shlex
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from converter import __version__
from converter.artifact import check_output, now_utc, publish, sha256_file, temp_beside, temp_dir_beside
from converter.boot.extlinux import MBR_CODE, MBR_CODE_BYTES, extlinux_files, install_extlinux
from converter.boot.initbin import init_binary
from converter.boot.initramfs import InitSpec, build_initramfs, decode_spec, encode_spec
from converter.boot.kernel import Kernel, from_flag, host_kernel, image_kernel
from converter.boot.syslinux import install as install_syslinux
from converter.disk.appliance import Appliance, Drive
from converter.disk.bootfiles import boot_files_on_host, place_kernel
from converter.disk.hostwrite import Collect, collect_image, collect_imgconv
from converter.disk.hostwrite import write_files as write_host_files
from converter.disk.increment import (
    BLOCK,
    SLACK_BLOCKS,
    Base,
    Delta,
    FullBuild,
    delta,
    find_base,
    free_space,
    guest_file,
    script,
)
from converter.disk.plan import (
    IMGCONV_ENTRIES,
    IMGCONV_FILES,
    INIT_SYSTEMS,
    DiskPlan,
    InitMode,
    PartitionLayout,
    content_bytes,
    partition_layout,
    plan_disk,
    run_spec,
    tree_size,
    volume_uuid,
)
from converter.disk.reproducible import (
    SECTOR,
    build_epoch,
    debugfs_script,
    derived_id,
    e2fs_tool,
    make_ext4,
    mbr,
    settle_ext4,
    write_at,
    write_guest_files,
)
from converter.disk.rootfs import (
    Additions,
    GuestFile,
    ImageTree,
    check_tree,
    stream_into,
    write_image_tree,
    write_imgconv_files,
)
from converter.disk.uefi import (
    Firmware,
    build_uki,
    check_efi_kernel,
    check_tools,
    gpt_mbr_code,
    install_uki,
    partition_gpt,
)
from converter.epoch import source_date_epoch
from converter.errors import ImageError, UsageError
from converter.guest import ORIGIN, RESERVED
from converter.oci.image import Image
from converter.oci.model import Platform
from converter.oci.reference import Reference, parse_reference
from converter.oci.tarsplit import Recorder, finish_records
from converter.oci.transport import open_image
from converter.pipeline import APPLIANCE, ApplianceSession, Context, Item, Pipeline, Slot, Step
from converter.progress import Monitor
from converter.provenance import provenance_of, statement_for
from converter.records import (
    BootEntry,
    BuildRecord,
    ImageIdentity,
    KernelRecord,
    OriginRecord,
    RunRecord,
    to_json,
)
from converter.records import dumps as record_json
from converter.run import run
from converter.scratch import scratch_dir
from converter.store.store import Store, Target

DEVICE = "/dev/sda"


class DiskFormat(StrEnum):
    QCOW2 = "qcow2"
    RAW = "raw"
    VMDK = "vmdk"
    VHDX = "vhdx"
    VPC = "vpc"


@dataclass(frozen=True)
class BuildOptions:
    output: Path
    format: DiskFormat = DiskFormat.QCOW2
    compress: bool = False
    size: int | None = None  # bytes; None: content plus headroom
    force: bool = False
    kernel: Path | None = None
    initrd: Path | None = None
    hostname: str = "imgconv"
    platform: Platform | None = None
    tls_verify: bool = True
    kernel_modules: bool | None = None  # None: the mode decides (system: yes, container: no)
    firmware: Firmware = Firmware.BIOS
    init: InitMode = InitMode.AUTO
    store: Target | None = None  # OUTPUT store:NAME[:TAG]; output is then the store's work path
    incremental: bool = True  # into the store: build on a version of the image's older layers (disk/increment.py)

    def recorded(self) -> dict[str, Any]:
        """The options as the sidecar and origin record keep them (paths as text, no output or --force)."""
        doc = asdict(self)
        for key in ("output", "force", "tls_verify", "store", "incremental"):
            del doc[key]
        return {key: str(value) if isinstance(value, Path | Platform | DiskFormat | Firmware | InitMode) else value
                for key, value in doc.items()}


@dataclass(frozen=True)
class Inputs:
    ref: Reference
    scratch: Path
    kernel: Kernel | None  # --kernel, chosen before anything else
    # The initramfs of the kernel a full build will likely boot (--kernel's, else this machine's newest), built in a
    # thread while the appliance starts; None for any other kernel (see _prebuild_initramfs).
    prebuilt: Callable[[Kernel], bytes | None] = field(default=lambda _: None)


@dataclass(frozen=True)
class Plan:
    spec: InitSpec
    disk: DiskPlan
    uuid: str
    content: int  # bytes of tar the layers inflate to (the progress bar's total)
    layout: PartitionLayout
    epoch: int  # every time written into the disk (converter.disk.reproducible.build_epoch)
    modules: bool = False  # a host kernel's modules tree goes into the guest (see plan)


SOURCE: Slot[str] = Slot("source")
OPTIONS: Slot[BuildOptions] = Slot("options")
FINISHED: Slot[Path] = Slot("finished disk")  # made by convert_format
WORK_DISK: Slot[Path] = Slot("work disk")  # the raw disk being built: create_disk's, or copy_base's (incremental)
KERNEL: Slot[Kernel] = Slot("kernel")  # choose_kernel's, or choose_host_kernel's
# Set (to anything) to unpack every image in the appliance, as imgconv did before it wrote files on the host.
UNPACK_IN_APPLIANCE = "IMGCONV_UNPACK_IN_APPLIANCE"


class NeedsAppliance(Exception):
    """The build without an appliance cannot go on (the image's own kernel is read through it); says why."""


def check_inputs(ctx: Context) -> Inputs:
    options = ctx[OPTIONS]
    check_output(options.output, options.force)
    ref = parse_reference(ctx[SOURCE])
    check_tools(options.firmware)
    if options.firmware.bios_path and not MBR_CODE.is_file():
        raise UsageError(f"{MBR_CODE} is missing: install syslinux-common (the MBR boot code)")
    scratch = ctx.enter(scratch_dir())  # a --kernel .deb is read into it
    kernel = from_flag(options.kernel, options.initrd, scratch) if options.kernel else None
    if kernel is not None and kernel.host_path is not None and options.firmware.uefi_path:
        check_efi_kernel(kernel.host_path, f"--kernel {options.kernel}")
    if kernel is not None and kernel.host_initrd is None and kernel.host_modules is None:
        raise UsageError(f"--kernel {options.kernel}: there are no modules for it in /lib/modules/{kernel.release} "
                         "to build an initramfs from; pass --initrd")
    init_binary()  # compile (once, cached) before the appliance starts, so a missing compiler fails fast
    source_date_epoch()  # a malformed value fails now, not at publish after the whole build
    return Inputs(ref, scratch, kernel, _prebuild_initramfs(ctx, kernel or _newest_host_kernel()))


def _newest_host_kernel() -> Kernel | None:
    try:
        return host_kernel()
    except UsageError:
        return None


@contextlib.contextmanager
def _one_thread() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(1, thread_name_prefix="imgconv-initramfs")
    try:
        yield pool
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _prebuild_initramfs(ctx: Context, likely: Kernel | None) -> Callable[[Kernel], bytes | None]:
    """Start building the initramfs of *likely* now: the appliance takes seconds to start, on one core under TCG,
    and the initramfs (compressing the boot's modules) takes one or two on the other. Whether it is used is
    decided when the kernel is chosen (an image's own kernel wins over the host's)."""
    if likely is None or likely.host_initrd is not None or likely.host_modules is None:
        return lambda _: None
    future = ctx.enter(_one_thread()).submit(build_initramfs, likely.release, likely.host_modules, init_binary())

    def prebuilt(chosen: Kernel) -> bytes | None:
        if (chosen.release, chosen.host_modules, chosen.host_initrd) != (likely.release, likely.host_modules, None):
            return None
        return future.result()

    return prebuilt


def read_image(ctx: Context) -> Image:
    options = ctx[OPTIONS]
    image = ctx.enter(open_image(ctx[check_inputs].ref, platform=options.platform, tls_verify=options.tls_verify))
    if image.config.platform.architecture != "amd64":
        raise ImageError(f"{image.source} is for {image.config.platform}; imgconv boots x86_64 guests only")
    return image


def plan(ctx: Context) -> Plan:
    """Sizes assume a host kernel's modules go in when they are wanted, unless --kernel says otherwise: the image's
    own kernel (found only while streaming) needs no room for them, so the worst case is planned.

    The modules tree (about 90 MiB for Debian's cloud kernel) is wanted by default only in system mode: a
    container never gets the host's modules, and imgconv's initramfs already loads what the boot needs, while an
    init system's udev loads drivers for what it finds. --kernel-modules / --no-kernel-modules decide otherwise."""
    options, image, explicit = ctx[OPTIONS], ctx[read_image], ctx[check_inputs].kernel
    spec = run_spec(image, options.hostname, options.init)
    wanted = options.kernel_modules if options.kernel_modules is not None else spec.mode == InitMode.SYSTEM
    modules = explicit.host_modules if explicit else _host_modules()
    modules_bytes, modules_entries = tree_size(modules) if modules and wanted else (0, 0)
    content = content_bytes(image)
    layout = plan_layout(options, explicit)
    disk = plan_disk(content, options.size, modules_bytes + IMGCONV_FILES + layout.esp_bytes,
                     modules_entries + IMGCONV_ENTRIES)
    _say_plan(ctx.monitor, spec, wanted, modules_bytes)
    return Plan(spec, disk, volume_uuid(image), content, layout, build_epoch(image), wanted)


def _say_plan(monitor: Monitor, spec: InitSpec, modules: bool, modules_bytes: int) -> None:
    """Which mode the conversion chose, and what the kernel's modules cost (or would)."""
    if spec.mode == InitMode.SYSTEM:
        service = spec.argv and spec.argv[0] not in INIT_SYSTEMS
        monitor.note("init: system (the image's init system boots" +
                     (f"; its service runs the image's command: {shlex.join(spec.argv)})" if service else ")"))
    else:
        monitor.note("init: container (imgconv's init runs the image's command, as docker run)")
    if modules and modules_bytes:
        monitor.note(f"kernel modules: placed in the guest ({modules_bytes / (1 << 20):.0f} MiB; "
                     "--no-kernel-modules leaves them out)")
    elif not modules:
        monitor.note("kernel modules: left out (the initramfs loads what the boot needs; --kernel-modules adds "
                     "a host kernel's modules tree, about 90 MiB)")


def plan_layout(options: BuildOptions, kernel: Kernel | None = None) -> PartitionLayout:
    """MBR for BIOS only; GPT with an EFI system partition sized for a --kernel/--initrd given (else the
    default fits the host's or an image's kernel with imgconv's initramfs). A --kernel package counts as the
    kernel file it holds (*kernel*), not as the whole .deb."""
    kernel_file = kernel.host_path if kernel is not None and kernel.package is not None else options.kernel
    given = sum(path.stat().st_size for path in (kernel_file, options.initrd) if path is not None)
    layout = partition_layout(options.firmware.uefi_path, DEVICE, given)
    if options.size is not None and layout.esp_bytes and options.size < layout.esp_bytes + 64 * (1 << 20):
        raise UsageError(f"--size {options.size} leaves no room for the root filesystem beside the "
                         f"{layout.esp_bytes >> 20} MiB EFI system partition")
    return layout


def _host_modules() -> Path | None:
    try:
        return host_kernel().host_modules
    except UsageError:
        return None


def create_disk(ctx: Context) -> Path:
    """A sparse raw file: written by the host's tools and the appliance alike, and turned into the output format
    in one sequential pass at the end (so a qcow2's cluster layout never depends on the order of writes)."""
    work_disk = ctx.enter(temp_beside(ctx[OPTIONS].output, ".raw"))
    os.truncate(work_disk, -(-ctx[plan].disk.size // SECTOR) * SECTOR)
    return work_disk


def partition(ctx: Context) -> None:
    """Partition table and root filesystem, made on the host before the appliance starts (faster than parted and
    mke2fs in it under TCG, and given the ids a reproducible disk needs: converter/disk/reproducible.py)."""
    plan_, disk = ctx[plan], ctx[WORK_DISK]
    sectors = -(-plan_.disk.size // SECTOR)
    if plan_.layout.table == "gpt":
        partition_gpt(disk, plan_.layout, plan_.disk.size, plan_.uuid, ctx[OPTIONS].firmware)
    else:
        write_at(disk, mbr(sectors, derived_id(plan_.uuid, "disk").bytes), 0)
    first, last = plan_.layout.root_sectors(sectors)
    make_ext4(disk, first * SECTOR, (last - first + 1) * SECTOR, plan_.uuid, plan_.disk.inodes, plan_.epoch)


def write_rootfs(ctx: Context) -> ImageTree:
    # nodelalloc: blocks are allocated as tar writes them (in the stream's order), not whenever writeback runs;
    # noinit_itable: the inode tables are zeroed already, no background thread writes them at its own pace.
    app = ctx[APPLIANCE]
    app.call("mount the root filesystem", app.g.mount_options, "nodelalloc,noinit_itable",
             ctx[plan].layout.root_device, "/")
    found: list[ImageTree] = []

    def work(out: Any, bar: Any) -> None:
        found.append(write_image_tree(ctx[read_image], out, bar.update,
                                      Recorder(ctx[check_inputs].scratch / "tar-split")))

    with ctx.monitor.bar("layers", ctx[plan].content) as bar:
        stream_into(ctx[APPLIANCE], ctx[check_inputs].scratch / "rootfs.fifo", functools.partial(work, bar=bar),
                    "unpack the image's files into the disk")
    return found[0]


def choose_host_kernel(ctx: Context) -> Kernel:
    """choose_kernel, for the build that starts no appliance: a kernel that is a host file."""
    kernel = choose_kernel(ctx)
    if kernel.host_path is None:
        raise NeedsAppliance(f"the image's own kernel ({kernel.describe()}) and its modules are read in the "
                             "appliance")
    return kernel


def choose_kernel(ctx: Context) -> Kernel:
    written = _image_tree(ctx)
    kernel = (ctx[check_inputs].kernel
              or image_kernel(written.tree.kinds, written.tree.symlinks, written.kernel_releases)
              or host_kernel())
    ctx.monitor.note(f"using {kernel.describe()}")
    return kernel


def _imgconv_files(ctx: Context) -> tuple[list[GuestFile], Callable[[Additions], bytes]]:
    """imgconv's files under /.imgconv, and the origin record as a function of what was added."""
    image, kernel, options = ctx[read_image], ctx[KERNEL], ctx[OPTIONS]
    files = [GuestFile("init", init_binary().read_bytes(), 0o755), GuestFile("init.spec", encode_spec(ctx[plan].spec)),
             GuestFile("config.json", image.config.raw)]
    if image.manifest.raw is not None:
        files.append(GuestFile("manifest.json", image.manifest.raw))
    # The layers' tar-split records, so that vm-to-oci gives back the very layers (converter/oci/tarsplit.py).
    files += [GuestFile(name, path.read_bytes())
              for name, path in finish_records(ctx[check_inputs].scratch / "tar-split", list(image.config.diff_ids))]

    def origin(added: Additions) -> bytes:
        record = OriginRecord(__version__, ImageIdentity.of(image),
                              KernelRecord(kernel.release, kernel.origin, kernel.package_sha256),
                              tuple(sorted(set(added.injected))), added.touched_dirs, options.recorded())
        return record_json(record).encode()

    return files, origin


def add_imgconv_files(ctx: Context) -> Additions:
    files, origin = _imgconv_files(ctx)
    tree, kernel, modules, epoch = ctx[write_rootfs].tree, ctx[KERNEL], ctx[plan].modules, ctx[plan].epoch
    found: list[Additions] = []
    stream_into(ctx[APPLIANCE], ctx[check_inputs].scratch / "imgconv.fifo",
                lambda out: found.append(write_imgconv_files(tree, files, kernel, modules, origin, out, epoch)),
                "add imgconv's files to the disk")
    return found[0]


# -- the files written on the host (converter/disk/hostwrite.py) ----------------------------------------------


@dataclass(frozen=True)
class Collected:
    """The image's tree and its files spooled for debugfs."""

    image: ImageTree
    files: Collect
    spool: Path  # where the files' contents wait for debugfs


def read_layers(ctx: Context) -> Collected:
    """The layers flattened once (tar-split recorded on the way), each file spooled for debugfs, beside the output
    (the size of the image's contents: $TMPDIR may be memory)."""
    spool = ctx.enter(temp_dir_beside(ctx[OPTIONS].output, ".files"))
    with ctx.monitor.bar("layers", ctx[plan].content) as bar:
        tree, files = collect_image(ctx[read_image], spool, bar.update,
                                    Recorder(ctx[check_inputs].scratch / "tar-split"))
    return Collected(tree, files, spool)


def _image_tree(ctx: Context) -> ImageTree:
    """The image's files as the disk holds them, whichever way they were written."""
    return ctx[read_layers].image if read_layers in ctx else ctx[write_rootfs]


def collect_imgconv_files(ctx: Context) -> Collect:
    files, origin = _imgconv_files(ctx)
    _, collected = collect_imgconv(ctx[read_layers].image.tree, files, ctx[KERNEL], ctx[plan].modules,
                                   origin, ctx[read_layers].spool, ctx[plan].epoch)
    return collected


def write_files(ctx: Context) -> None:
    """Everything collected into the empty root filesystem, by one debugfs run on the host."""
    plan_, collected = ctx[plan], ctx[read_layers]
    first, _ = plan_.layout.root_sectors(-(-plan_.disk.size // SECTOR))
    write_host_files(f"{ctx[WORK_DISK]}?offset={first * SECTOR}", collected.image.tree,
                     [collected.files, ctx[collect_imgconv_files]], collected.spool, ctx[check_inputs].scratch,
                     plan_.epoch)


def mount_root(ctx: Context) -> None:
    """The root filesystem mounted for extlinux (and an image kernel's files), as write-rootfs mounts it."""
    app, device = ctx[APPLIANCE], ctx[plan].layout.root_device
    # The appliance started while debugfs wrote: what its kernel read of the disk at boot (the partition table,
    # the superblock udev probed) may be stale in its block caches.
    for cached in (device.rstrip("0123456789"), device):
        app.call("drop the disk's block caches", app.g.blockdev_flushbufs, cached)
    app.call("mount the root filesystem", app.g.mount_options, "nodelalloc,noinit_itable", device, "/")


@dataclass(frozen=True)
class Booted:
    """What install-boot decided: the boot entry, and what write-boot-files writes on the host."""

    entry: BootEntry
    files: tuple[tuple[str, Path], ...]  # (guest path, host file)
    mbr_code: bytes  # for the first 440 bytes of the disk; b"" for a disk without a BIOS path


BOOTED: Slot[Booted] = Slot("boot entry")  # install_boot's or install_boot_on_host's


def _booted(ctx: Context, app: Appliance | None, install_bootloader: Callable[[], None]) -> Booted:
    """The boot entry, the initramfs and, with a BIOS path, extlinux (*install_bootloader*)."""
    scratch, kernel = ctx[check_inputs].scratch, ctx[KERNEL]
    placed = place_kernel(app, kernel, _image_tree(ctx).tree, scratch, ctx[plan].uuid, ctx[check_inputs].prebuilt)
    firmware, files = ctx[OPTIONS].firmware, list(placed.files)
    mbr_code = b""
    if firmware.bios_path:
        install_bootloader()
        files.append(extlinux_files(placed.entry, scratch))
        # The protective MBR of a GPT disk gets code that boots the legacy-bootable partition.
        mbr_code = gpt_mbr_code() if firmware is Firmware.BOTH else MBR_CODE.read_bytes()[:MBR_CODE_BYTES]
    # The file booted, whichever kernel it is, named by digest in the provenance statement.
    if kernel.host_path is not None:
        digest = sha256_file(kernel.host_path)
    elif app is not None:
        digest = "sha256:" + app.call("hash the kernel", app.g.checksum, "sha256", placed.entry.kernel)
    else:
        raise ValueError("an image's own kernel is hashed in the appliance")
    return Booted(replace(placed.entry, kernel_sha256=digest), tuple(files), mbr_code)


def install_boot(ctx: Context) -> Booted:
    """In the appliance: an image's own kernel is read there, and extlinux runs there."""
    app = ctx[APPLIANCE]
    return _booted(ctx, app, lambda: install_extlinux(app))


def install_boot_on_host(ctx: Context) -> Booted:
    """Without the appliance: a host kernel, and extlinux installed from its template
    (converter/boot/syslinux.py)."""
    plan_ = ctx[plan]
    first, last = plan_.layout.root_sectors(-(-plan_.disk.size // SECTOR))
    return _booted(ctx, None, lambda: install_syslinux(ctx[WORK_DISK], first * SECTOR, last - first + 1,
                                                       ctx[check_inputs].scratch, plan_.epoch))


def write_boot_files(ctx: Context) -> None:
    """Kernel, initramfs and bootloader configuration into the root filesystem, the MBR code into the disk: on the
    host, once the appliance is gone (debugfs writes in no time what the appliance needs a round trip for)."""
    booted, plan_, disk = ctx[BOOTED], ctx[plan], ctx[WORK_DISK]
    first, _ = plan_.layout.root_sectors(-(-plan_.disk.size // SECTOR))
    write_guest_files(disk, first * SECTOR, booted.files, ctx[check_inputs].scratch, plan_.epoch)
    if booted.mbr_code:
        write_at(disk, booted.mbr_code, 0)


def install_uefi(ctx: Context) -> None:
    """The kernel, initramfs and command line the BIOS path boots, as one UKI in the EFI system partition."""
    app = ctx.optional(APPLIANCE)  # none for a host kernel built without the appliance
    scratch, entry = ctx[check_inputs].scratch, ctx[BOOTED].entry
    kernel, initrd = boot_files_on_host(app, ctx[KERNEL], entry, scratch)
    check_efi_kernel(kernel, ctx[KERNEL].describe())
    uki = scratch / "BOOTX64.EFI"
    build_uki(kernel, initrd, entry.cmdline, uki, epoch=ctx[plan].epoch)
    install_uki(ctx[WORK_DISK], uki, ctx[plan].layout, ctx[plan].epoch)


def settle_filesystem(ctx: Context) -> None:
    """Times, generations, journal and superblock made the build's own once the appliance is gone."""
    plan_, tree = ctx[plan], _image_tree(ctx).tree
    first, _ = plan_.layout.root_sectors(-(-plan_.disk.size // SECTOR))
    root = tree.dirs.get("")
    settle_ext4(ctx[WORK_DISK], first * SECTOR, plan_.epoch, int(root.mtime) if root else plan_.epoch,
                ctx[check_inputs].scratch)


def convert_format(ctx: Context) -> Path:
    """The raw work disk in the output format, in one sequential pass (qemu-img writes in order without -W)."""
    options = ctx[OPTIONS]
    converted = ctx.enter(temp_beside(options.output, f".{options.format}"))
    argv = ["qemu-img", "convert", "-f", "raw", "-O", str(options.format)]
    if options.compress:
        argv += ["-c", "-o", "compression_type=zstd"]
    run([*argv, str(ctx[WORK_DISK]), str(converted)], purpose=f"write the {options.format} disk")
    return converted


def _record(ctx: Context, kernel: KernelRecord, boot: BootEntry, spec: InitSpec, size: int,
            built_on: str = "") -> BuildRecord:
    image, options = ctx[read_image], ctx[OPTIONS]
    return BuildRecord(
        imgconv=__version__, identity=ImageIdentity.of(image), config_digest=image.config.digest, kernel=kernel,
        boot=boot, format=str(options.format), virtual_size=size, options=options.recorded(), created=now_utc(),
        run=RunRecord(tuple(spec.argv), spec.user, spec.cwd), firmware=str(options.firmware), built_on=built_on,
    )


def build_record(ctx: Context) -> BuildRecord:
    kernel = ctx[KERNEL]
    return _record(ctx, KernelRecord(kernel.release, kernel.origin, kernel.package_sha256), ctx[BOOTED].entry,
                   ctx[plan].spec, ctx[plan].disk.size)


def _publish_file(ctx: Context, record: BuildRecord) -> BuildRecord:
    output = ctx[OPTIONS].output
    predicate = provenance_of(record, ctx[SOURCE], sha256_file(init_binary()), source_date_epoch())
    published = publish(ctx[FINISHED], output, to_json(record), statement_for(output.name, predicate))
    return replace(record, sha256=published["sha256"], size=published["size"], output=str(output))


def _publish_store(ctx: Context, record: BuildRecord) -> BuildRecord:
    """publish's twin for OUTPUT store:NAME[:TAG]: the disk becomes a version of the store and the tag moves."""
    target = ctx[OPTIONS].store
    if target is None:
        raise LookupError("publishing into the store is chosen only for a store target")
    predicate = provenance_of(record, ctx[SOURCE], sha256_file(init_binary()), source_date_epoch())
    # The statement's subject is the version's object file (objects/sha256/HEX), which verify reads.
    published = target.publish(ctx[FINISHED], to_json(record), statement=lambda sha256: statement_for(
        sha256.removeprefix("sha256:"), predicate)(sha256))
    return replace(record, sha256=published["sha256"], size=published["size"], output=str(target.ref))


def publish_disk(ctx: Context) -> BuildRecord:
    return _publish_file(ctx, build_record(ctx))


def publish_version(ctx: Context) -> BuildRecord:
    return _publish_store(ctx, build_record(ctx))


# -- an incremental rebuild (converter/disk/increment.py): the same result from a store version's disk ---------


@dataclass(frozen=True)
class Rebuild:
    """What an incremental rebuild starts from and keeps of its base."""

    base: Base
    spec: InitSpec
    layout: PartitionLayout
    size: int  # the base's virtual size: the disk keeps it
    epoch: int
    kernel: KernelRecord
    boot: BootEntry


def find_base_version(ctx: Context) -> Rebuild:
    """The store version to build on (:func:`converter.disk.increment.find_base`), kept from gc meanwhile."""
    options, image, explicit = ctx[OPTIONS], ctx[read_image], ctx[check_inputs].kernel
    if options.store is None:
        raise LookupError("an incremental rebuild is chosen only for a store target")
    store = Store(options.store.root)
    found = find_base(store, image, options.recorded())
    if isinstance(found, str):
        raise FullBuild(found)
    version = ctx.enter(store.use_digest(found[0]))
    try:
        kernel, boot = KernelRecord(**version.sidecar["kernel"]), BootEntry(**version.sidecar["boot"])
        size = int(version.sidecar["virtual_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise FullBuild(f"the sidecar of {found[0]} lacks {exc}") from exc
    _same_kernel(explicit, kernel, boot)
    ctx.monitor.note(f"incremental: building on {found[0]} (it holds {found[1]} of the image's "
                     f"{len(image.layers)} layers; --no-incremental builds in full)")
    return Rebuild(Base(version, found[1]), run_spec(image, options.hostname, options.init),
                   plan_layout(options, explicit), size, build_epoch(image), kernel, boot)


def _same_kernel(explicit: Kernel | None, kernel: KernelRecord, boot: BootEntry) -> None:
    """A full build would choose the base's kernel: --kernel's, the image's own (the new layers leave the kernel's
    paths alone, or apply-layers says so), or this machine's newest, which may have changed since."""
    if explicit is None and kernel.origin == "image":
        return
    chosen = explicit or host_kernel()
    same = chosen.release == kernel.release and chosen.host_path is not None and (
        not boot.kernel_sha256 or sha256_file(chosen.host_path) == boot.kernel_sha256)
    if not same:
        raise FullBuild(f"a full build would boot {chosen.describe()}, the base boots kernel {kernel.release}")


def copy_base(ctx: Context) -> Path:
    """The base version as a raw work disk (its bytes stay as they are in the store)."""
    rebuild, options = ctx[find_base_version], ctx[OPTIONS]
    work = ctx.enter(temp_beside(options.output, ".raw"))
    run(["qemu-img", "convert", "-f", str(rebuild.base.sidecar.get("format", "qcow2")), "-O", "raw",
         str(rebuild.base.version.path), str(work)], purpose="copy the base version's disk")
    return work


def _root_device(ctx: Context) -> tuple[int, str]:
    """The root filesystem's byte offset in the work disk, and the disk as e2fsprogs opens it there."""
    rebuild = ctx[find_base_version]
    first, _ = rebuild.layout.root_sectors(-(-rebuild.size // SECTOR))
    return first * SECTOR, f"{ctx[WORK_DISK]}?offset={first * SECTOR}"


def check_base(ctx: Context) -> dict[str, Any]:
    """The base's init is this imgconv's and it runs in the new image's mode; returns its origin record."""
    rebuild, (_, device) = ctx[find_base_version], _root_device(ctx)
    tool = e2fs_tool("debugfs")
    if guest_file(device, f"{RESERVED}/init", tool) != init_binary().read_bytes():
        raise FullBuild("the base's init is not this imgconv's")
    try:
        mode = decode_spec(guest_file(device, f"{RESERVED}/init.spec", tool)).mode
        origin = json.loads(guest_file(device, ORIGIN, tool))
    except ValueError as exc:
        raise FullBuild(f"the base's records cannot be read ({exc})") from exc
    if mode != rebuild.spec.mode:
        raise FullBuild(f"the base runs in {mode} mode, the new image in {rebuild.spec.mode} mode")
    if not isinstance(origin, dict):
        raise FullBuild("the base's origin record is not an object")
    return origin


def apply_layers(ctx: Context) -> Delta:
    """The new layers' changes, written into the filesystem by debugfs (no appliance)."""
    rebuild, scratch, image = ctx[find_base_version], ctx[check_inputs].scratch, ctx[read_image]
    change = delta(image, rebuild.base.layers, scratch, ctx[check_base].get("injected", []))
    check_tree(change.final)
    _, device = _root_device(ctx)
    blocks, inodes = free_space(device, e2fs_tool("dumpe2fs"))
    needed = -(-change.content // BLOCK) + len(change.written) + SLACK_BLOCKS
    if needed > blocks or len(change.written) + 16 > inodes:
        raise FullBuild(f"the base's filesystem has {blocks} free blocks and {inodes} free inodes; the new layers "
                        f"need about {needed} and {len(change.written)}")
    ctx.monitor.note(f"incremental: {len(change.written)} entries written, {len(change.removed)} removed")
    debugfs_script(device, script(change, scratch / "increment"), scratch, rebuild.epoch, "apply the new layers",
                   output=False)
    return change


def update_imgconv_files(ctx: Context) -> None:
    """init.spec, the image's config and manifest, the tar-split records and the origin record: the new image's."""
    rebuild, image, options, scratch = ctx[find_base_version], ctx[read_image], ctx[OPTIONS], ctx[check_inputs].scratch
    base_origin, final = ctx[check_base], ctx[apply_layers].final
    touched = {path: (final.dirs[path].mtime if path in final.dirs else mtime)
               for path, mtime in dict(base_origin.get("touched_dirs", {})).items()}
    origin = OriginRecord(__version__, ImageIdentity.of(image), rebuild.kernel,
                          tuple(base_origin.get("injected", [])), touched, options.recorded())
    files = {"init.spec": encode_spec(rebuild.spec), "config.json": image.config.raw,
             "origin.json": record_json(origin).encode()}
    if image.manifest.raw is not None:
        files["manifest.json"] = image.manifest.raw
    for name, path in finish_records(scratch / "tar-split", list(image.config.diff_ids)):
        files[name] = path.read_bytes()
    _, device = _root_device(ctx)
    present = set(re.findall(r"^/\d+/\d+/\d+/\d+/([^/]*)/", debugfs_script(
        device, [f"ls -p /{RESERVED}"], scratch, rebuild.epoch, "list imgconv's files"), re.M))
    spool = scratch / "imgconv-files"
    spool.mkdir()
    # A base made from a layout keeps its manifest; a new image from a `docker save` archive has none to write.
    stale = [name for name in sorted(present) if name in files or name == "manifest.json"]
    if stale:
        debugfs_script(device, [f'rm "/{RESERVED}/{name}"' for name in stale], scratch, rebuild.epoch,
                       "remove imgconv's old files")
    written = []
    for n, (name, data) in enumerate(sorted(files.items())):
        (spool / str(n)).write_bytes(data)
        written.append((f"{RESERVED}/{name}", spool / str(n)))
    write_guest_files(ctx[WORK_DISK], _root_device(ctx)[0], written, scratch, rebuild.epoch)


def settle_rebuilt(ctx: Context) -> None:
    rebuild, root = ctx[find_base_version], ctx[apply_layers].final.dirs.get("")
    offset, _ = _root_device(ctx)
    settle_ext4(ctx[WORK_DISK], offset, rebuild.epoch, int(root.mtime) if root else rebuild.epoch,
                ctx[check_inputs].scratch)


def publish_rebuilt(ctx: Context) -> BuildRecord:
    rebuild = ctx[find_base_version]
    return _publish_store(ctx, _record(ctx, rebuild.kernel, rebuild.boot, rebuild.spec, rebuild.size,
                                       built_on=rebuild.base.version.sha256))


def _drives(ctx: Context) -> list[Drive]:
    return [Drive(ctx[WORK_DISK], "raw", False)]


# Both ways of building start by checking the inputs and reading the image.
_READ_STEPS = (
    Step("check-inputs", "checking the inputs", check_inputs, needs=(OPTIONS, SOURCE)),
    Step("read-image", "reading the image", read_image, needs=(check_inputs,)),
)


@functools.cache
def pipeline(finish: str = "keep", firmware: Firmware = Firmware.BIOS, store: bool = False,
             unpack: str = "host") -> Pipeline[BuildRecord]:
    """The conversion's steps; *finish* picks the last disk step: ``keep`` the qcow2 or ``convert`` it; a
    *firmware* with a UEFI path adds ``install-uefi``. *unpack*: ``host``, every file written by debugfs and
    extlinux installed from its template, no appliance (converter/disk/hostwrite.py, converter/boot/syslinux.py);
    ``debugfs``, the same files while an appliance starts, which reads an image's own kernel and runs extlinux;
    ``appliance``, its GNU tar unpacks the files (what debugfs cannot be given)."""
    finish_step = {"keep": convert_format, "convert": convert_format}[finish]  # the raw work disk: always converted
    uefi = (Step("install-uefi", "installing the unified kernel image (UEFI)", install_uefi,
                 needs=(BOOTED,)),) if firmware.uefi_path else ()
    return Pipeline("oci-to-qcow2", (
        *_READ_STEPS,
        Step("plan", "planning the disk", plan, needs=(read_image,)),
        Step("create-disk", "creating the disk", create_disk, WORK_DISK, needs=(plan,)),
        Step("partition", "partitioning and formatting", partition, needs=(WORK_DISK,)),
        *_unpack_steps(unpack, uefi),
        Step("write-boot-files", "writing kernel, initramfs and bootloader configuration", write_boot_files,
             needs=(WORK_DISK, BOOTED)),
        Step("settle-filesystem", "fixing times and ids (a reproducible disk)", settle_filesystem,
             needs=(write_boot_files,)),
        Step("finish-disk", "writing the disk format", finish_step, FINISHED, needs=(WORK_DISK,)),
        Step("publish", "publishing", publish_version if store else publish_disk, needs=(FINISHED, BOOTED)),
    ), result=publish_version if store else publish_disk, given=(SOURCE, OPTIONS))


def _unpack_steps(unpack: str, uefi: tuple[Step[Any], ...]) -> tuple[Item, ...]:
    host_files = (
        Step("read-layers", "reading the layers", read_layers, needs=(read_image, plan)),
        Step("choose-kernel", "choosing the kernel", choose_host_kernel if unpack == "host" else choose_kernel,
             KERNEL, needs=(read_layers,)),
        Step("add-imgconv-files", "adding imgconv's files", collect_imgconv_files, needs=(KERNEL,)),
        Step("write-files", "writing the files into the disk", write_files, needs=(WORK_DISK, collect_imgconv_files)))
    if unpack == "host":
        return (*host_files, Step("install-boot", "installing kernel, initramfs and bootloader",
                                  install_boot_on_host, BOOTED, needs=(write_files,)), *uefi)
    if unpack == "debugfs":
        return (ApplianceSession(_drives, (
            Step("mount-root", "mounting the root filesystem", mount_root, needs=(write_files,)),
            Step("install-boot", "installing kernel, initramfs and bootloader", install_boot, BOOTED, needs=(KERNEL,)),
            *uefi,
        ), needs=(WORK_DISK,), meanwhile=host_files),)
    return (ApplianceSession(_drives, (
        Step("write-rootfs", "writing the root filesystem", write_rootfs, needs=(read_image, plan)),
        Step("choose-kernel", "choosing the kernel", choose_kernel, KERNEL, needs=(write_rootfs,)),
        Step("add-imgconv-files", "adding imgconv's files", add_imgconv_files, needs=(KERNEL,)),
        Step("install-boot", "installing kernel, initramfs and bootloader", install_boot, BOOTED,
             needs=(KERNEL, add_imgconv_files)),
        *uefi,
    ), needs=(WORK_DISK,)),)


@functools.cache
def rebuild_pipeline() -> Pipeline[BuildRecord]:
    """An incremental rebuild's steps: no appliance, the base version's disk changed on the host."""
    return Pipeline("oci-to-qcow2", (
        *_READ_STEPS,
        Step("find-base", "finding the version to build on", find_base_version, needs=(read_image,)),
        Step("copy-base", "copying its disk", copy_base, WORK_DISK, needs=(find_base_version,)),
        Step("check-base", "reading its records", check_base, needs=(WORK_DISK,)),
        Step("apply-layers", "applying the new layers", apply_layers, needs=(check_base,)),
        Step("update-imgconv-files", "updating imgconv's files", update_imgconv_files, needs=(apply_layers,)),
        Step("settle-filesystem", "fixing times and ids (a reproducible disk)", settle_rebuilt,
             needs=(update_imgconv_files,)),
        Step("finish-disk", "writing the disk format", convert_format, FINISHED, needs=(WORK_DISK,)),
        Step("publish", "publishing", publish_rebuilt, needs=(FINISHED, settle_rebuilt)),
    ), result=publish_rebuilt, given=(SOURCE, OPTIONS))


def convert(source: str, options: BuildOptions, monitor: Monitor) -> BuildRecord:
    """A full build, or into the store an incremental rebuild when a version allows one (else, saying why, the
    full build)."""
    if options.store is not None and options.incremental:
        try:
            return rebuild_pipeline().run(monitor, source=source, options=options)
        except FullBuild as why:
            monitor.note(f"incremental: not possible ({why}); building in full")
    finish = "convert" if options.format is not DiskFormat.QCOW2 or options.compress else "keep"
    store = options.store is not None
    unpack = "appliance" if os.environ.get(UNPACK_IN_APPLIANCE) else "host"
    while True:
        try:
            return pipeline(finish, options.firmware, store, unpack).run(monitor, source=source, options=options)
        except NeedsAppliance as why:
            monitor.note(f"{why}; starting it")
            unpack = "debugfs"
        except FullBuild as why:
            if unpack == "appliance":
                raise
            monitor.note(f"the files cannot be written on the host ({why}); unpacking them in the appliance")
            unpack = "appliance"
