"""`imgconv oci-to-qcow2`: an OCI image becomes a bootable, read-only VM disk that runs its ENTRYPOINT.

The conversion is a short list of named steps over one context:

1. open the image (manifest and config verified),
2. plan: what to run (Docker's argv/env/user/cwd rules), which kernel, how big a disk,
3. one libguestfs appliance: partition, mkfs, stream the flattened root filesystem plus
   imgconv's own files in through a FIFO (nothing is extracted on the host), add kernel,
   initramfs and extlinux, shut down (its errors fail the conversion),
4. convert to the requested format if it is not qcow2,
5. publish: mode 0444, sha256, sidecar, atomic rename.

Everything imgconv adds to the guest lives under `/.imgconv`, except the modules tree of a host
kernel, which must be where modprobe looks. `/.imgconv/origin.json` records every path added
so `vm-to-oci` can take them out again.
"""

from __future__ import annotations

import copy
import functools
import io
import json
import logging
import os
import posixpath
import stat
import tarfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

from converter import __version__
from converter.artifact import check_output, now_utc, publish, temp_beside
from converter.boot.initbin import init_binary
from converter.boot.initramfs import InitSpec, build_initramfs, docker_env, encode_spec, needed_modules
from converter.boot.kernel import (
    HEADER_BYTES,
    KERNEL_NAME,
    Kernel,
    from_flag,
    host_kernel,
    image_kernel,
    resolve_in_tree,
)
from converter.disk.appliance import Appliance, launch
from converter.disk.fifo import through_fifo
from converter.errors import ImageError, ImgconvError, ToolError, UsageError
from converter.oci.flatten import (
    DIR,
    FlatTree,
    LayerInput,
    abandon_output,
    flatten,
    gnu_xattrs_encoded,
    open_output,
    parents,
)
from converter.oci.image import Image, Layer
from converter.oci.model import Platform
from converter.oci.reference import parse_reference
from converter.oci.source import open_image, scratch_dir
from converter.progress import Monitor
from converter.run import run

log = logging.getLogger("imgconv.build")

RESERVED = ".imgconv"
BOOT_DIR = f"{RESERVED}/boot"
ROOT_LABEL = "imgconv-root"
DEVICE = "/dev/sda"
PARTITION = "/dev/sda1"
MBR_CODE = Path("/usr/lib/syslinux/mbr/mbr.bin")
MiB = 1 << 20


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
    kernel_modules: bool = True

    def recorded(self) -> dict[str, Any]:
        return {
            "format": str(self.format), "compress": self.compress, "size": self.size,
            "kernel": str(self.kernel) if self.kernel else None, "initrd": str(self.initrd) if self.initrd else None,
            "hostname": self.hostname, "platform": str(self.platform) if self.platform else None,
            "kernel_modules": self.kernel_modules,
        }


INODE_SIZE = 256  # mke2fs's default for ext4
BYTES_PER_INODE = 8192


@dataclass(frozen=True)
class DiskPlan:
    size: int  # virtual bytes
    inodes: int  # for mke2fs -N


@dataclass
class Plan:
    """What the steps decided; filled in as the conversion goes."""

    spec: InitSpec
    disk: DiskPlan
    kernel: Kernel | None = None  # known before streaming for --kernel; after it otherwise
    tree: FlatTree | None = None
    injected: list[str] = field(default_factory=list)  # paths imgconv created in the guest
    touched_dirs: dict[str, float] = field(default_factory=dict)  # existing dirs written into -> mtime


# -- step 2: plan ---------------------------------------------------------------------------------------


def run_spec(image: Image, hostname: str) -> InitSpec:
    """What `docker run IMAGE` would start: argv = Entrypoint + Cmd, Docker's env, cwd and user."""
    config = image.config
    argv = (*(config.entrypoint or ()), *(config.cmd or ()))
    if not argv:
        raise ImageError(f"{image.source} has neither Entrypoint nor Cmd, so there is nothing for the VM to run")
    return InitSpec(argv=argv, env=docker_env(config.env, hostname), cwd=config.working_dir or "/",
                    user=config.user, hostname=hostname)


def uncompressed_estimate(image: Image, layer: Layer) -> int:
    """Bytes of tar a layer will inflate to: exact where the format says, counted where it does not."""
    size = layer.descriptor.size
    if layer.compression == "none":
        return size
    if layer.compression == "gzip":
        try:
            with image.store.open_blob(layer.descriptor.digest) as blob:
                blob.seek(-4, os.SEEK_END)
                isize = int.from_bytes(blob.read(4), "little")
        except (OSError, ValueError, io.UnsupportedOperation):
            return size * 6
        # ISIZE is the size modulo 2^32: add the wraps a layer of this compressed size must have had.
        while isize < size:
            isize += 1 << 32
        return max(isize, size * 2)
    # zstd records no total (streamed frames omit even their own), and its ratio has no useful bound (a
    # preallocated file of zeros shrinks 30 000 times): count it. zstd inflates at a GB/s, so this extra
    # pass over the (rare) zstd layers costs little; a corrupt layer is left for the real pass to report.
    try:
        with image.open_layer(layer) as stream:
            total = 0
            while chunk := stream.read(1 << 20):
                total += len(chunk)
        return total
    except ImgconvError:
        return size * 6


def plan_disk(image: Image, options: BuildOptions, extra_bytes: int, extra_entries: int) -> DiskPlan:
    """How big a disk and how many inodes: room for every byte and every file of the image, plus headroom.

    Every tar entry takes at least one 512-byte header, so a layer's tar size bounds the files it can
    hold: sizing inodes by that bound (and the disk by their tables) means a tree of many tiny files
    (node_modules) can never run out of inodes, which sizing by bytes alone allowed. Unused inode tables
    cost nothing in a sparse disk.
    """
    content = sum(uncompressed_estimate(image, layer) for layer in image.layers)
    entries = content // 512 + extra_entries
    wanted_inodes = entries + entries // 10 + 4096
    if options.size is not None:
        return DiskPlan(options.size, max(options.size // BYTES_PER_INODE,
                                          min(wanted_inodes, options.size // (16 * INODE_SIZE))))
    total = content + extra_bytes
    # ext4 spends a block per small file and some metadata per group; headroom lets the VM write.
    headroom = max(256 * MiB, total // 4)
    size = int(total * 1.15) + headroom + 64 * MiB
    inodes = max(size // BYTES_PER_INODE, wanted_inodes)
    size += (inodes - size // BYTES_PER_INODE) * INODE_SIZE  # room for the extra inode tables
    return DiskPlan(-(-size // (64 * MiB)) * (64 * MiB), inodes)


def tree_size(path: Path) -> tuple[int, int]:
    """Bytes of file content and number of entries under *path* (a kernel's modules tree)."""
    total, entries = 0, 0
    for root, dirs, files in os.walk(path):
        entries += len(dirs) + len(files)
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total, entries


# -- step 3: the stream into the appliance ----------------------------------------------------------


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.uname, info.gname = len(data), mode, 0, "", ""
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str, mode: int = 0o755, mtime: float = 0) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime, info.uname, info.gname = tarfile.DIRTYPE, mode, mtime, "", ""
    tar.addfile(info)


def _add_host_tree(tar: tarfile.TarFile, source: Path, dest: str) -> None:
    """Copy a host directory (a kernel's modules) into the stream: root-owned, symlinks not followed."""
    for root, dirs, files in os.walk(source):
        dirs.sort()
        rel = os.path.relpath(root, source)
        base = dest if rel == "." else f"{dest}/{rel}"
        st = os.lstat(root)
        _add_dir(tar, base, stat.S_IMODE(st.st_mode), st.st_mtime)
        for name in sorted(files) + sorted(d for d in dirs if os.path.islink(os.path.join(root, d))):
            path = os.path.join(root, name)
            st = os.lstat(path)
            info = tarfile.TarInfo(f"{base}/{name}")
            info.mode, info.mtime, info.uname, info.gname = stat.S_IMODE(st.st_mode), st.st_mtime, "", ""
            if stat.S_ISLNK(st.st_mode):
                info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
                tar.addfile(info)
            elif stat.S_ISREG(st.st_mode):
                info.size = st.st_size
                with open(path, "rb") as f:
                    tar.addfile(info, f)


def place(tree: FlatTree, wanted: str, plan: Plan, tar: tarfile.TarFile) -> str:
    """Where *wanted* lands in the image once its symlinks are followed; create missing parents.

    Existing directories that receive new entries are remembered with their mtime, so their
    header can be re-emitted at the end of the stream (tar then restores the original mtime).
    """
    target = resolve_in_tree(wanted, tree.symlinks)
    if target == RESERVED or target.startswith(f"{RESERVED}/"):
        raise ImageError(f"cannot place /{wanted} in the image: its symlinks lead it to /{target}, "
                         f"inside /{RESERVED}, which imgconv reserves for its own files")
    chain = list(reversed(list(parents(target))))
    for ancestor in chain:
        kind = tree.kinds.get(ancestor)
        if kind is None:
            _add_dir(tar, ancestor)
            tree.kinds[ancestor] = DIR
            plan.injected.append(ancestor)
        elif kind != DIR:
            raise ImageError(f"cannot place /{wanted} in the image: /{ancestor} is not a directory")
    parent = chain[-1] if chain else ""
    if parent and parent not in plan.injected and parent in tree.dirs:
        plan.touched_dirs[parent] = tree.dirs[parent].mtime
    return target


def origin_record(image: Image, options: BuildOptions, plan: Plan) -> dict[str, Any]:
    return {
        "imgconv": __version__,
        "source": image.source,
        "image_id": image.image_id,
        "manifest_digest": image.manifest_digest,
        "index_digest": image.index_digest,
        "layers": [{"digest": layer.descriptor.digest, "media_type": layer.descriptor.media_type,
                    "size": layer.descriptor.size, "diff_id": layer.diff_id} for layer in image.layers],
        "kernel": {"release": plan.kernel.release, "origin": plan.kernel.origin} if plan.kernel else None,
        "injected": sorted(set(plan.injected)),
        "touched_dirs": plan.touched_dirs,
        "options": options.recorded(),
    }


class ApplianceSink:
    """The tar sink in front of the stream to the appliance's GNU tar. It escapes xattr names as GNU tar
    reads them, and keeps the first bytes of every file named like a kernel, so that the image's kernel can
    be checked (is it a bzImage? which release?) without reading it twice."""

    def __init__(self, inner: tarfile.TarFile) -> None:
        self.inner = inner
        self.headers: dict[str, bytes] = {}
        self._links: dict[str, str] = {}

    def addfile(self, tarinfo: tarfile.TarInfo, fileobj: IO[bytes] | None = None) -> None:
        if any(key.startswith("SCHILY.xattr.") and "%" in key for key in tarinfo.pax_headers):
            tarinfo = copy.copy(tarinfo)  # the caller's header (kept in the FlatTree) stays as the image has it
            tarinfo.pax_headers = gnu_xattrs_encoded(tarinfo.pax_headers)
        name = tarinfo.name.strip("/")
        if KERNEL_NAME.fullmatch(name):
            if tarinfo.islnk():
                self._links[name] = tarinfo.linkname.strip("/")
            elif tarinfo.isreg() and fileobj is not None:
                head = _read_full(fileobj, min(tarinfo.size, HEADER_BYTES))
                self.headers[name] = head
                fileobj = cast(IO[bytes], _Prefixed(head, fileobj))
        self.inner.addfile(tarinfo, fileobj)

    def kernel_headers(self) -> dict[str, bytes]:
        found = dict(self.headers)
        for name, target in self._links.items():
            if target in self.headers:
                found[name] = self.headers[target]
        return found


def _read_full(fileobj: IO[bytes], size: int) -> bytes:
    parts, wanted = [], size
    while wanted > 0:
        chunk = fileobj.read(wanted)
        if not chunk:
            break
        parts.append(chunk)
        wanted -= len(chunk)
    return b"".join(parts)


class _Prefixed(io.RawIOBase):
    """*head* (already read from *rest*) followed by the rest of *rest*: full reads, as tarfile needs."""

    def __init__(self, head: bytes, rest: IO[bytes]) -> None:
        super().__init__()
        self.head, self.rest = head, rest

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            data, self.head = self.head + self.rest.read(), b""
            return data
        data, self.head = self.head[:size], self.head[size:]
        return data + _read_full(self.rest, size - len(data)) if len(data) < size else data

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        memoryview(buffer)[: len(data)] = data
        return len(data)


# The guest init mounts devtmpfs and proc on these (and sysfs on /sys when it can): through a symlink the
# mount would land on whatever it points to. Docker's init layer hides such entries under directories;
# imgconv refuses them rather than change the image behind the user's back.
RUNTIME_DIRS = ("dev", "proc", "sys")


def check_runtime_dirs(tree: FlatTree) -> None:
    for name in RUNTIME_DIRS:
        if name in tree.symlinks:
            raise ImageError(f"the image's /{name} is a symbolic link (to {tree.symlinks[name]!r}); the VM mounts "
                             f"its own /{name} there, so it must be a directory")
        if name != "sys" and tree.kinds.get(name, DIR) != DIR:
            raise ImageError(f"the image's /{name} is not a directory; the VM mounts its own /{name} there")


def write_stream(image: Image, options: BuildOptions, plan: Plan, out: BinaryIO,
                 on_bytes: Callable[[int], None]) -> None:
    """Everything the appliance unpacks: the image's final root filesystem, then imgconv's files."""
    tar = open_output(out)
    try:
        _write_stream(image, options, plan, tar, on_bytes)
    except BaseException:
        abandon_output(tar)
        raise
    tar.close()


def _write_stream(image: Image, options: BuildOptions, plan: Plan, tar: tarfile.TarFile,
                  on_bytes: Callable[[int], None]) -> None:
    layers = [LayerInput(layer.what, functools.partial(image.open_layer, layer)) for layer in image.layers]
    sink = ApplianceSink(tar)
    tree = flatten(layers, sink, on_bytes)
    plan.tree = tree
    if RESERVED in tree.kinds:
        raise ImageError(f"the image already contains /{RESERVED}, which imgconv reserves for its own files")
    check_runtime_dirs(tree)
    if plan.kernel is None:
        plan.kernel = image_kernel(tree.kinds, tree.symlinks, sink.kernel_headers()) or host_kernel()
    _add_dir(tar, RESERVED)
    _add_dir(tar, BOOT_DIR)
    plan.injected.append(RESERVED)
    if "lost+found" not in tree.kinds:
        plan.injected.append("lost+found")  # mke2fs makes it; the image did not have it
    _add_bytes(tar, f"{RESERVED}/init", init_binary().read_bytes(), 0o755)
    _add_bytes(tar, f"{RESERVED}/init.spec", encode_spec(plan.spec))
    _add_bytes(tar, f"{RESERVED}/config.json", image.config.raw)
    if image.manifest.raw is not None:
        _add_bytes(tar, f"{RESERVED}/manifest.json", image.manifest.raw)
    kernel = plan.kernel
    if kernel.host_modules is not None and options.kernel_modules:
        dest = place(tree, f"lib/modules/{kernel.release}", plan, tar)
        if dest not in tree.kinds:
            _add_host_tree(tar, kernel.host_modules, dest)
            plan.injected.append(dest)
    for path, mtime in plan.touched_dirs.items():
        header = tree.dirs[path]
        header.mtime = mtime
        sink.addfile(header)
    _add_bytes(tar, f"{RESERVED}/origin.json", json.dumps(origin_record(image, options, plan), indent=2).encode())


def stream_into(app: Appliance, fifo: Path, work: Callable[[BinaryIO], None]) -> None:
    """Unpack what *work* writes into the disk's root, through a FIFO (nothing staged on the host)."""
    try:
        through_fifo(fifo, "write", work,
                     lambda path: app.call("unpack the image's files into the disk", app.g.tar_in, path, "/",
                                           xattrs=True))
    except ToolError as exc:
        if "No space left" in str(exc):
            raise ToolError("the disk is too small for the image's files; pass a larger --size") from None
        raise


# -- step 3b: kernel, initramfs, bootloader --------------------------------------------------------------


MAX_GUEST_MODULE = 64 * MiB  # a module, modules.dep or modules.builtin larger than this is not one


def _guest_file(app: Appliance, path: str) -> bool:
    """*path* in the guest is a regular file (not a symlink, FIFO or device) of a plausible size."""
    if not app.call(f"look for {path}", app.g.is_file, path):  # symlinks are not followed
        return False
    if app.call(f"measure {path}", app.g.filesize, path) > MAX_GUEST_MODULE:
        raise ImageError(f"the image's {path} is too large to be part of a kernel's modules")
    return True


def fetch_guest_modules(app: Appliance, kernel: Kernel, scratch: Path) -> Path:
    """Copy what the initramfs needs of an image kernel's modules out of the guest.

    The image's modules.dep names the files: each name must stay inside the modules tree (it
    becomes a path on the host) and be a regular file in the guest.
    """
    assert kernel.guest_modules is not None
    local = scratch / "modules" / kernel.release
    local.mkdir(parents=True)
    for name in ("modules.dep", "modules.builtin"):
        guest = f"/{kernel.guest_modules}/{name}"
        if _guest_file(app, guest):
            app.call(f"read {guest}", app.g.download, guest, str(local / name))
    for rel in needed_modules(local):
        clean = posixpath.normpath(rel)
        if rel.startswith("/") or clean == "." or clean.startswith("../") or clean == ".." or "\0" in rel:
            raise ImageError(f"the image's /{kernel.guest_modules}/modules.dep names {rel!r}, "
                             "which is outside its modules tree")
        guest = f"/{kernel.guest_modules}/{clean}"
        if not _guest_file(app, guest):
            raise ImageError(f"the image's kernel module {guest} is not a regular file")
        (local / clean).parent.mkdir(parents=True, exist_ok=True)
        app.call(f"read {guest}", app.g.download, guest, str(local / clean))
    return local


def extlinux_conf(kernel_path: str, initrd_path: str, uuid: str) -> str:
    # quiet + loglevel=1: only the workload's own output and panics reach the console.
    append = (f"root=UUID={uuid} rw console=tty0 console=ttyS0 init=/{RESERVED}/init "
              "quiet loglevel=1 panic=5")
    return (
        "# Written by imgconv: boots the container's entrypoint.\n"
        "DEFAULT imgconv\nPROMPT 0\nTIMEOUT 0\n"
        f"LABEL imgconv\n  LINUX /{kernel_path}\n  INITRD /{initrd_path}\n  APPEND {append}\n"
    )


def install_boot(app: Appliance, plan: Plan, scratch: Path, uuid: str) -> None:
    kernel = plan.kernel
    assert kernel is not None and plan.tree is not None
    g = app.g
    if kernel.host_path is not None:
        kernel_guest = f"{BOOT_DIR}/vmlinuz-{kernel.release}"
        app.call("copy the kernel in", g.upload, str(kernel.host_path), f"/{kernel_guest}")
    else:
        assert kernel.guest_path is not None
        kernel_guest = resolve_in_tree(kernel.guest_path, plan.tree.symlinks)
    initrd_guest = f"{BOOT_DIR}/initramfs-{kernel.release}.img"
    if kernel.host_initrd is not None:
        app.call("copy the initrd in", g.upload, str(kernel.host_initrd), f"/{initrd_guest}")
    else:
        modules = kernel.host_modules if kernel.host_modules else fetch_guest_modules(app, kernel, scratch)
        initramfs = scratch / "initramfs.img"
        initramfs.write_bytes(build_initramfs(kernel.release, modules, init_binary()))
        app.call("copy the initramfs in", g.upload, str(initramfs), f"/{initrd_guest}")
    conf = scratch / "extlinux.conf"
    conf.write_text(extlinux_conf(kernel_guest, initrd_guest, uuid))
    app.call("write the bootloader configuration", g.upload, str(conf), f"/{BOOT_DIR}/extlinux.conf")
    app.call("install extlinux", g.extlinux, f"/{BOOT_DIR}")
    app.call("write the MBR boot code", g.pwrite_device, DEVICE, MBR_CODE.read_bytes()[:440], 0)


# -- the conversion -----------------------------------------------------------------------------------------


def volume_uuid(image: Image) -> str:
    """Derived from the image, so the same image gives the same filesystem UUID."""
    h = image.image_id.removeprefix("sha256:")
    return f"{h[0:8]}-{h[8:12]}-4{h[13:16]}-8{h[17:20]}-{h[20:32]}"


def convert(source: str, options: BuildOptions, monitor: Monitor) -> dict[str, Any]:
    check_output(options.output, options.force)
    ref = parse_reference(source)
    if not MBR_CODE.is_file():
        raise UsageError(f"{MBR_CODE} is missing: install syslinux-common (the MBR boot code)")
    kernel = from_flag(options.kernel, options.initrd) if options.kernel else None
    with scratch_dir() as scratch, monitor.step(f"reading {ref}"), \
            open_image(ref, platform=options.platform, tls_verify=options.tls_verify) as image:
        if image.config.platform.architecture != "amd64":
            raise ImageError(f"{image.source} is for {image.config.platform}; imgconv boots x86_64 guests only")
        spec = run_spec(image, options.hostname)
        init_binary()  # compile (once, cached) before the appliance starts, so a missing compiler fails fast
        modules = kernel.host_modules if kernel else None
        if kernel is None:  # the image's own kernel needs no room for modules; the host's (the fallback) does
            host = _host_kernel_or_none()
            modules = host.host_modules if host else None
        modules_bytes, modules_entries = tree_size(modules) if modules and options.kernel_modules else (0, 0)
        disk = plan_disk(image, options, modules_bytes + 64 * MiB, modules_entries + 64)
        plan = Plan(spec=spec, disk=disk, kernel=kernel)
        with temp_beside(options.output, ".qcow2") as work_disk:
            run(["qemu-img", "create", "-q", "-f", "qcow2", str(work_disk), str(plan.disk.size)],
                purpose="create the disk image")
            _build_in_appliance(image, options, plan, work_disk, scratch, monitor)
            finished = work_disk
            with temp_beside(options.output, f".{options.format}") as converted:
                if options.format is not DiskFormat.QCOW2 or options.compress:
                    with monitor.step(f"writing {options.format}"):
                        argv = ["qemu-img", "convert", "-f", "qcow2", "-O", str(options.format)]
                        if options.compress:
                            argv += ["-c", "-o", "compression_type=zstd"]
                        run([*argv, str(work_disk), str(converted)], purpose=f"write the {options.format} disk")
                    finished = converted
                assert plan.kernel is not None and plan.tree is not None
                sidecar = {
                    "imgconv": __version__,
                    "source": image.source,
                    "image_id": image.image_id,
                    "manifest_digest": image.manifest_digest,
                    "index_digest": image.index_digest,
                    "config_digest": image.config.digest,
                    "kernel": {"release": plan.kernel.release, "origin": plan.kernel.origin},
                    "format": str(options.format),
                    "virtual_size": plan.disk.size,
                    "options": options.recorded(),
                    "created": now_utc(),
                    "run": {"argv": list(spec.argv), "user": spec.user, "cwd": spec.cwd},
                }
                with monitor.step("publishing"):
                    record = publish(finished, options.output, sidecar)
        record["output"] = str(options.output)
        return record


def _host_kernel_or_none() -> Kernel | None:
    try:
        return host_kernel()
    except UsageError:
        return None


def _build_in_appliance(image: Image, options: BuildOptions, plan: Plan, disk: Path, scratch: Path,
                        monitor: Monitor) -> None:
    """Step 3, run in a worker thread so Ctrl-C is seen at once even while libguestfs is busy."""
    uuid = volume_uuid(image)
    fifo = scratch / "rootfs.fifo"
    total = sum(uncompressed_estimate(image, layer) for layer in image.layers)

    def work() -> None:
        with monitor.step("starting the appliance"):
            app_cm = launch([(disk, "qcow2", False)])
            app = app_cm.__enter__()
        try:
            g = app.g
            with monitor.step("partitioning and formatting"):
                # One call for table + partition (1 MiB aligned): each call costs ~0.7 s under TCG.
                app.call("create the partition table", g.part_disk, DEVICE, "mbr")
                app.call("mark the partition bootable", g.part_set_bootable, DEVICE, 1, True)
                app.call("create the ext4 filesystem", g.mke2fs, PARTITION, fstype="ext4", blocksize=4096,
                         label=ROOT_LABEL, uuid=uuid, reservedblockspercentage=1, numberofinodes=plan.disk.inodes)
                app.call("mount the root filesystem", g.mount, PARTITION, "/")
            with monitor.step("writing the root filesystem"), monitor.bar("layers", total) as bar:
                stream_into(app, fifo, lambda out: write_stream(image, options, plan, out, bar.update))
            assert plan.kernel is not None
            monitor.note(f"using {plan.kernel.describe()}")
            with monitor.step("installing kernel, initramfs and bootloader"):
                install_boot(app, plan, scratch, uuid)
            with monitor.step("closing the disk"):
                app.call("unmount the filesystem", g.umount_all)
        except BaseException as exc:
            app_cm.__exit__(type(exc), exc, exc.__traceback__)
            raise
        app_cm.__exit__(None, None, None)

    run_interruptibly(work)


def run_interruptibly(work: Callable[[], None]) -> None:
    """Run *work* in a thread while this one stays free to receive SIGINT/SIGTERM.

    libguestfs calls block in C for minutes; a signal handler only runs in the main thread
    between bytecodes. On interruption the worker is abandoned: libguestfs' recovery process
    kills the appliance when imgconv exits, and the caller removes the temporary files.
    """
    errors: list[BaseException] = []

    def target() -> None:
        try:
            work()
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=target, name="imgconv-appliance", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.2)
    if errors:
        raise errors[0]

