"""`imgconv vm-to-oci`: a VM disk becomes an OCI image that Docker, skopeo and registries accept.

The conversion is the pipeline :func:`pipeline` assembles:

    check-inputs     DEST writable, options valid, SOURCE_DATE_EPOCH read
    open-disk        format from magic, then explicit; backing files, external data and corruption refused
                     (:mod:`converter.disk.safety`); the disk's sha256 is computed meanwhile
    read-base        --base only: the base image's final tree, as signatures
    launch-appliance one read-only appliance (no network, no guest code run)
      find-os          a disk imgconv made (its embedded config and what it injected), or a foreign
                       operating system mounted at its mountpoints
      write-layer      the root filesystem tarred out through a FIFO, filtered, streamed into a compressed
                       layer (digests on the fly, bounded memory); with --base only what differs
    close-appliance
    write-image      base layers (if any), config and manifest into a private OCI layout
    deliver          the image to DEST through its transport
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, cast

from converter import __version__
from converter.artifact import sha256_file
from converter.disk.appliance import Drive
from converter.disk.fifo import through_fifo
from converter.disk.inspect import Opened, clean_label, open_guest
from converter.disk.layer import DiffState, Filter, filter_for, write_deferred_links, write_layer
from converter.disk.safety import SafeDisk, open_disk
from converter.epoch import source_date_epoch, timestamp
from converter.errors import DiskError, LayerError, UsageError
from converter.oci.config import ConfigFile, ConfigOverrides, HistoryEntry
from converter.oci.image import Image
from converter.oci.layout import LayoutWriter
from converter.oci.model import Descriptor, ImageConfig, Platform, normalise_arch
from converter.oci.reference import Reference, parse_reference
from converter.oci.tarsplit import (
    DiskFiles,
    TarSplitError,
    record_name,
    restore,
    wanted_hashes,
    write_restored,
)
from converter.oci.transport import WORK_TAG, Built, check_destination, deliver, open_image
from converter.oci.tree import Signature, hash_stream, index_image
from converter.oci.writer import LayerWriter, WrittenLayer, copy_blob, write_image
from converter.pipeline import APPLIANCE, ApplianceSession, Context, Pipeline, Slot, Step
from converter.progress import Monitor
from converter.records import DiskSource, ExportRecord, ImageIdentity, LayerRecord, NewLayer, OsRecord
from converter.scratch import scratch_dir

LABEL_PREFIX = "io.imgconv.source"


@dataclass(frozen=True)
class ExportOptions:
    compression: str = "gzip"
    reproducible: bool = False
    keep_boot: bool = False
    root: str | None = None
    base: str | None = None
    platform: Platform | None = None
    tls_verify: bool = True
    overrides: ConfigOverrides = field(default_factory=ConfigOverrides)


@dataclass(frozen=True)
class Inputs:
    disk: Path  # absolute: qemu-img reads `vm-1:2.qcow2` as a protocol, `file:x` as another file, `-x` as an option
    dest: Reference
    epoch: int | None  # SOURCE_DATE_EPOCH, or 0 with --reproducible
    scratch: Path


class _Background:
    """A value computed in a daemon thread (a killed run does not wait for it); :meth:`result` waits."""

    def __init__(self, work: Callable[[], str]) -> None:
        self._value = "unknown"
        self._thread = threading.Thread(target=self._run, args=(work,), daemon=True)
        self._thread.start()

    def _run(self, work: Callable[[], str]) -> None:
        self._value = work()

    def result(self) -> str:
        self._thread.join()
        return self._value


@dataclass(frozen=True)
class CheckedDisk:
    disk: SafeDisk
    sha256: _Background  # the disk's sha256, computed while the appliance works


@dataclass(frozen=True)
class Base:
    image: Image
    index: dict[str, Signature]
    config: ConfigFile  # validated before the disk is read: a hostile base fails fast


@dataclass(frozen=True)
class Assembled:
    built: Built
    diff_ids: tuple[str, ...]
    restored: bool = False  # the original layers and config, reassembled from the disk's tar-split records


@dataclass(frozen=True)
class Split:
    """A disk imgconv made with tar-split records: what the original layers are reassembled from."""

    config: bytes  # the original config's very bytes
    records: list[Path]
    files: DiskFiles
    max_raw: int


@dataclass(frozen=True)
class DiskLayer(WrittenLayer):
    split: Split | None = None


@dataclass(frozen=True)
class Found:
    opened: Opened
    scope: Filter
    used_bytes: int | None


DISK: Slot[Path] = Slot("disk")
DEST: Slot[str] = Slot("destination")
OPTIONS: Slot[ExportOptions] = Slot("options")


def check_inputs(ctx: Context) -> Inputs:
    options = ctx[OPTIONS]
    disk = Path(os.path.abspath(str(ctx[DISK])))
    dest = parse_reference(ctx[DEST])
    check_destination(dest)
    if options.compression not in ("gzip", "zstd"):
        raise UsageError(f"unknown compression {options.compression!r}; choose gzip or zstd")
    epoch = source_date_epoch(0 if options.reproducible else None)
    return Inputs(disk, dest, epoch, ctx.enter(scratch_dir()))


def check_disk(ctx: Context) -> CheckedDisk:
    disk = open_disk(ctx[check_inputs].disk)
    return CheckedDisk(disk, _Background(functools.partial(sha256_file, disk.path)))


def read_base(ctx: Context) -> Base | None:
    options = ctx[OPTIONS]
    if options.base is None:
        return None
    image = ctx.enter(open_image(parse_reference(options.base), platform=options.platform,
                                 tls_verify=options.tls_verify))
    config = ConfigFile.from_doc(image.config.doc, f"the base image {image.source}'s config")
    return Base(image, index_image(image), config)


def find_os(ctx: Context) -> Found:
    app, disk, options = ctx[APPLIANCE], ctx[check_inputs].disk, ctx[OPTIONS]
    opened = open_guest(app, disk, options.root)
    if opened.origin is None and opened.os is None:
        raise DiskError(f"no operating system found on {disk}")
    if opened.os is not None and opened.os.distro != "unknown":
        ctx.monitor.note(f"found {opened.os.product} ({opened.os.distro} {opened.os.version}) on {opened.os.root}")
    used = 0
    for mountpoint in opened.mountpoints:
        try:
            stats = app.g.statvfs(mountpoint)
        except RuntimeError:  # only for the progress bar's total
            continue
        used += (stats["blocks"] - stats["bfree"]) * stats["frsize"]
    return Found(opened, filter_for(opened, options.keep_boot), used or None)


def write_disk_layer(ctx: Context) -> DiskLayer:
    app, inputs, found, base = ctx[APPLIANCE], ctx[check_inputs], ctx[find_os], ctx[read_base]
    diff = DiffState(base=base.index) if base is not None else None
    layout = LayoutWriter(inputs.scratch / "layout")
    split = _read_records(ctx) if base is None and ctx[OPTIONS].overrides == ConfigOverrides() else None
    with ctx.monitor.bar("files", found.used_bytes) as bar, \
            LayerWriter(layout, ctx[OPTIONS].compression, clamp_mtime=inputs.epoch) as layer:
        sink = layer if split is None else cast(LayerWriter, split.files.attach(layer))
        through_fifo(inputs.scratch / "disk.fifo", "read",
                     lambda stream: write_layer(stream, sink, found.scope, diff, bar.update),
                     lambda path: app.call("read the disk's files", app.g.tar_out, "/", path, numericowner=True,
                                           xattrs=True, excludes=found.scope.patterns()))
        if diff is not None and diff.deferred:
            write_deferred_links(layer, diff, functools.partial(_read_again, ctx, inputs.scratch))
    if layer.result is None:  # LayerWriter sets it when the block ends normally
        raise LayerError("the layer was not finished")
    return DiskLayer(layer.result.descriptor, layer.result.diff_id, layer.result.entries, split)


def _read_records(ctx: Context) -> Split | None:
    """The tar-split records of a disk imgconv made (none on a foreign disk or one made before them), copied to
    the host: regular files only (no symlink followed), none larger than the disk, read through libguestfs
    inside the guest's root."""
    app, opened, scratch = ctx[APPLIANCE], ctx[find_os].opened, ctx[check_inputs].scratch
    limit = ctx[check_disk].disk.virtual_size
    if opened.origin is None or opened.config is None:
        return None
    diff_ids = ImageConfig.parse(opened.config, "the disk's embedded image config").diff_ids
    records = []
    (scratch / "tar-split").mkdir()
    for index in range(len(diff_ids)):
        name = f"/.imgconv/{record_name(index)}"
        if not app.g.is_file(name) or app.g.filesize(name) > limit:
            return None
        records.append(scratch / "tar-split" / record_name(index))
        app.call(f"read {name}", app.g.download, name, str(records[-1]))
    try:
        wanted = wanted_hashes(records, limit)
    except TarSplitError as exc:
        ctx.monitor.note(f"the disk's layer records are unusable ({clean_label(str(exc))}): new layers")
        return None
    return Split(opened.config, records, DiskFiles(None, scratch / "tar-split" / "spool", wanted), limit)


@contextmanager
def _read_again(ctx: Context, scratch: Path, path: str, sig: Signature) -> Iterator[IO[bytes]]:
    """A file the tar stream already passed, read again from the (read-only) disk and checked against it."""
    if path == "dev" or path.startswith("dev/"):
        # libguestfs' download does not look up /dev/* in the guest: it would read the appliance's own.
        raise DiskError(f"the disk's /{path} gained a hard link, but nothing under /dev can be read again from "
                        "a disk; export without --base")
    app = ctx[APPLIANCE]
    local = scratch / "read-again"
    try:
        app.call(f"read /{path} from the disk", app.g.download, f"/{path}", str(local))
    except UnicodeError as exc:  # the bindings pass names as UTF-8 text
        raise DiskError(f"the disk's {path!r} gained a hard link but its name is not UTF-8, so it cannot be read "
                        "again; export without --base") from exc
    try:
        with local.open("rb") as data:
            if hash_stream(data, sig.size + 1) != sig.sha256:
                raise LayerError(f"the disk's {path!r} read differently the second time")
            data.seek(0)
            yield data
    finally:
        local.unlink(missing_ok=True)


def image_config(ctx: Context, diff_ids: list[str]) -> ConfigFile:
    """The disk's own config (a disk imgconv made), else the base's, else a fresh one; then the flags."""
    opened, base, options, inputs = ctx[find_os].opened, ctx[read_base], ctx[OPTIONS], ctx[check_inputs]
    disk_sha = ctx[check_disk].sha256.result()
    if opened.config is not None:
        config = ConfigFile.parse(opened.config, "the disk's embedded image config")
    elif base is not None:
        config = base.config
    elif opened.os is not None:
        config = ConfigFile.fresh(normalise_arch(opened.os.arch), {
            f"{LABEL_PREFIX}.disk.sha256": disk_sha, f"{LABEL_PREFIX}.os.distro": opened.os.distro,
            f"{LABEL_PREFIX}.os.version": opened.os.version, f"{LABEL_PREFIX}.os.product": opened.os.product})
    else:  # find-os refuses a disk with neither
        raise DiskError(f"no operating system found on {inputs.disk}")
    entry = HistoryEntry(timestamp(inputs.epoch), f"imgconv {__version__} vm-to-oci",
                         f"from disk {inputs.disk.name} ({disk_sha})")
    return config.with_overrides(options.overrides).with_layers(diff_ids, entry, replaces_history=base is None)


def _restored(ctx: Context, split: Split) -> Assembled | None:
    """The original image if the disk's files are still the image's own; else None, having said why."""
    scratch = ctx[check_inputs].scratch
    (scratch / "restored").mkdir()
    diff_ids = list(ImageConfig.parse(split.config, "the disk's embedded image config").diff_ids)
    try:
        result = restore(split.records, diff_ids, split.files, scratch / "restored", split.max_raw)
    except (TarSplitError, LayerError) as exc:  # records (or layers from them) imgconv did not write as they are
        ctx.monitor.note(f"the disk's layer records are unusable ({clean_label(str(exc))}): new layers")
        return None
    if isinstance(result, str):  # (names from the disk: shown escaped)
        ctx.monitor.note(f"the disk's files differ from the image it was made from ({clean_label(result)}): new layers")
        return None
    ctx.monitor.note("the disk's files are the image's own: its original layers and image ID")
    layout = LayoutWriter(scratch / "layout")
    manifest, config, layers = write_restored(layout, result, split.config, ctx[OPTIONS].compression, WORK_TAG)
    return Assembled(Built(layout.root, manifest, config, tuple(layers)), tuple(diff_ids), restored=True)


def write_oci_image(ctx: Context) -> Assembled:
    base, written = ctx[read_base], ctx[write_disk_layer]
    if written.split is not None and (restored := _restored(ctx, written.split)) is not None:
        return restored
    layout = LayoutWriter(ctx[check_inputs].scratch / "layout")
    layers: list[Descriptor] = []
    diff_ids: list[str] = []
    if base is not None:
        for layer in base.image.layers:
            with base.image.store.open_blob(layer.descriptor.digest) as blob:
                copy_blob(blob, layout, layer.descriptor.digest)
            layers.append(layer.descriptor)
            diff_ids.append(layer.diff_id)
    layers.append(written.descriptor)
    diff_ids.append(written.diff_id)
    manifest, config = write_image(layout, image_config(ctx, diff_ids).doc, layers, WORK_TAG)
    return Assembled(Built(layout.root, manifest, config, tuple(layers)), tuple(diff_ids))


def deliver_image(ctx: Context) -> ExportRecord:
    inputs, assembled, written = ctx[check_inputs], ctx[write_oci_image], ctx[write_disk_layer]
    checked, built, opened = ctx[check_disk], assembled.built, ctx[find_os].opened
    pushed = deliver(built, inputs.dest, tls_verify=ctx[OPTIONS].tls_verify, scratch=inputs.scratch)
    os_record = None if opened.os is None else OsRecord(opened.os.distro, opened.os.version, opened.os.product,
                                                        opened.os.root)
    identity = ImageIdentity(str(inputs.dest), built.config.digest, pushed or built.manifest.digest, None,
                             tuple(LayerRecord(d.digest, d.media_type, d.size, diff_id)
                                   for d, diff_id in zip(built.layers, assembled.diff_ids, strict=True)))
    new = None if assembled.restored else NewLayer(written.descriptor.digest, written.diff_id, written.entries)
    return ExportRecord(
        identity, new,
        DiskSource(str(inputs.disk), checked.disk.format, checked.sha256.result(), checked.disk.virtual_size,
                   opened.origin is not None, os_record), assembled.restored,
    )


def _drives(ctx: Context) -> list[Drive]:
    disk = ctx[check_disk].disk
    return [Drive(disk.path, disk.format, True, disk.identity)]


PIPELINE: Pipeline[ExportRecord] = Pipeline("vm-to-oci", (
    Step("check-inputs", "checking the inputs", check_inputs, needs=(DISK, DEST, OPTIONS)),
    Step("open-disk", "checking the disk", check_disk, needs=(check_inputs,)),
    Step("read-base", "reading the base image", read_base, needs=(check_inputs,)),
    ApplianceSession(_drives, (
        Step("find-os", "finding the operating system", find_os, needs=(check_inputs,)),
        Step("write-layer", "writing the layer", write_disk_layer, needs=(find_os, read_base)),
    ), needs=(check_disk,)),
    Step("write-image", "writing the image", write_oci_image, needs=(write_disk_layer, read_base, find_os)),
    Step("deliver", "delivering the image", deliver_image, needs=(write_oci_image,)),
), result=deliver_image, given=(DISK, DEST, OPTIONS))


def export(disk: Path, dest: str, options: ExportOptions, monitor: Monitor) -> ExportRecord:
    return PIPELINE.run(monitor, disk=disk, destination=dest, options=options)
