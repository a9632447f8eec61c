"""`imgconv vm-to-oci`: a VM disk becomes an OCI image that Docker, skopeo and registries accept.

Steps:

1. open safely: format from magic, then explicit; backing files, external data and corruption
   refused (see :mod:`converter.disk.inspect`); the disk's sha256 is computed meanwhile;
2. in one read-only appliance, find what to export: a disk imgconv made (its embedded config
   and the list of what it injected) or a foreign operating system, mounted at its mountpoints;
3. tar the root filesystem out through a FIFO, filter it, and stream it into a compressed layer
   (digests on the fly, bounded memory). With `--base`, only what differs from the base image
   goes into one new layer, with whiteouts for deletions;
4. write config, manifest and index into a private layout, then deliver it to DEST.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tarfile
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, BinaryIO

from converter import __version__
from converter.artifact import sha256_file
from converter.disk.appliance import Appliance, launch
from converter.disk.build import run_interruptibly
from converter.disk.fifo import StreamBroken, through_fifo
from converter.disk.inspect import Opened, check_disk, exclude_patterns, open_guest, probe_format
from converter.errors import DiskError, LayerError, UsageError
from converter.oci.deliver import WORK_TAG, Built, check_destination, deliver
from converter.oci.flatten import clean_header, forget_members, gnu_xattrs_decoded, normalize_name, parents, whiteout_of
from converter.oci.image import Image
from converter.oci.layout import LayoutWriter
from converter.oci.model import Descriptor, ImageConfig, Platform, normalise_arch
from converter.oci.reference import parse_reference
from converter.oci.source import open_image, scratch_dir
from converter.oci.tree import Signature, hash_stream, index_image, read_upto, signature
from converter.oci.writer import LayerWriter, WrittenLayer, copy_blob, write_image
from converter.progress import Monitor

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
RUNTIME_DIRS = ("proc", "sys", "dev", "run", "tmp")
BOOT_TREES = ("boot", "lib/modules", "usr/lib/modules")
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
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    env: tuple[str, ...] = ()
    workdir: str | None = None
    user: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    expose: tuple[str, ...] = ()


def source_date_epoch(reproducible: bool) -> int | None:
    value = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if value:
        if not value.isdigit():
            raise UsageError(f"SOURCE_DATE_EPOCH must be a number of seconds, not {value!r}")
        return int(value)
    return 0 if reproducible else None


def timestamp(epoch: int | None) -> str:
    moment = datetime.fromtimestamp(epoch, UTC) if epoch is not None else datetime.now(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


# -- what leaves the disk ----------------------------------------------------------------------------------


@dataclass
class Filter:
    """Which tar-out entries become part of the image. The appliance already excluded most of them."""

    dropped: set[str] = field(default_factory=set)  # whole subtrees left out
    emptied: set[str] = field(default_factory=set)  # directories kept, their contents left out

    def keeps(self, path: str) -> bool:
        if path in self.dropped:
            return False
        return not any(parent in self.dropped or parent in self.emptied for parent in parents(path))

    def covers(self, path: str) -> bool:
        """Was *path* outside what was scanned (so its absence proves nothing)?"""
        return not self.keeps(path) or path in self.emptied

    def patterns(self) -> list[str]:
        return exclude_patterns(sorted(self.dropped)) + [p + "/*" for p in exclude_patterns(sorted(self.emptied))]


def filter_for(opened: Opened, keep_boot: bool) -> Filter:
    if opened.origin is not None:
        # A disk imgconv made: take out exactly what oci-to-qcow2 put in, nothing else.
        injected = {str(p).strip("/") for p in opened.origin.get("injected", [])}
        return Filter(dropped=injected | {".imgconv"})
    result = Filter(emptied=set(RUNTIME_DIRS))
    for mountpoint in opened.mountpoints:
        base = mountpoint.strip("/")
        result.dropped.add(f"{base}/lost+found" if base else "lost+found")
    if not keep_boot:
        result.emptied |= set(BOOT_TREES)
    return result


# -- streaming the disk into a layer ----------------------------------------------------------------------


def tar_members(stream: BinaryIO) -> Iterator[tuple[tarfile.TarInfo, tarfile.TarFile]]:
    try:
        tar = tarfile.open(fileobj=stream, mode="r|", bufsize=1 << 20)
    except tarfile.ReadError as exc:
        raise StreamBroken(f"the disk's files could not be read: {exc}") from None
    try:
        for member in tar:
            yield member, tar
            forget_members(tar)  # bounded memory whatever the number of files
    except tarfile.TarError as exc:
        raise StreamBroken(f"the disk's files could not be read: {exc}") from None
    finally:
        tar.close()


@dataclass
class DiffState:
    """--base: what the disk has that the base image has not, and what it lost."""

    base: dict[str, Signature]
    seen: set[str] = field(default_factory=set)
    written: set[str] = field(default_factory=set)
    signatures: dict[str, Signature] = field(default_factory=dict)
    # New hard links to files this layer does not hold, by target: the target is written into the layer
    # after the stream (its content read from the disk again), because Docker's overlay2 applies a layer
    # on its own and refuses a link into a lower layer ("link ...: no such file or directory").
    deferred: dict[str, list[tarfile.TarInfo]] = field(default_factory=dict)

    def whiteouts(self, scope: Filter) -> list[str]:
        """Topmost base paths the disk no longer has (a deleted directory needs one whiteout).

        None beneath a path the disk holds as a non-directory: the layer's own entry there (a symlink, a
        file) already replaces the base's whole directory, and a whiteout beneath it would be applied
        through the symlink (Docker deletes the target's file) or refused ("not a directory").
        """
        gone = [p for p in self.base if p not in self.seen and not scope.covers(p)]
        gone_set = set(gone)
        return sorted(p for p in gone if not any(parent in gone_set or self._replaced(parent)
                                                  for parent in parents(p)))

    def _replaced(self, path: str) -> bool:
        sig = self.signatures.get(path)
        return sig is not None and sig.type != tarfile.DIRTYPE


def write_layer(stream: BinaryIO, layer: LayerWriter, scope: Filter, diff: DiffState | None,
                on_bytes: Callable[[int], None]) -> None:
    """tar-out entries -> the layer: filtered, normalised, and (with --base) only what changed."""
    for member, tar in tar_members(stream):
        path = normalize_name(member.name, "the disk")
        if not path or not scope.keeps(path):
            continue
        if whiteout_of(path) is not None:
            raise DiskError(f"the disk holds /{path}, a name OCI layers reserve for deletions (.wh.*): "
                            "no image can carry it; rename it first")
        member.pax_headers = gnu_xattrs_decoded(member.pax_headers)
        if member.islnk():
            target = normalize_name(member.linkname, "the disk", link=True)
            if not scope.keeps(target):
                raise LayerError(f"the disk's {path!r} is a hard link into a left-out path {target!r}")
        info = clean_header(member, path)
        if member.islnk():
            info.linkname = normalize_name(member.linkname, "the disk", link=True)
        data = tar.extractfile(member) if member.isreg() else None
        on_bytes(member.size if member.isreg() else 512)
        if diff is None:
            layer.add(info, data)
            continue
        diff.seen.add(path)
        if member.islnk():
            # Same inode, same signature as its target.
            sig = diff.signatures.get(info.linkname)
            if sig is None or diff.base.get(path) != sig or info.linkname in diff.written:
                if sig is None or info.linkname in diff.written:
                    layer.add(info, None)
                else:  # the target is unchanged: not in this layer (yet)
                    diff.deferred.setdefault(info.linkname, []).append(info)
                diff.written.add(path)
            if sig is not None:
                diff.signatures[path] = sig
            continue
        if member.isreg():
            # The content is needed both for the hash and, if changed, for the layer: spool it.
            spool, content_hash = _spool(data, member.size)
            sig = signature(info, content_hash)
        else:
            spool, sig = None, signature(info)
        diff.signatures[path] = sig
        if diff.base.get(path) != sig:
            layer.add(info, spool)
            diff.written.add(path)
        if spool is not None:
            spool.close()
    if diff is not None:
        for gone in diff.whiteouts(scope):
            head, _, name = gone.rpartition("/")
            marker = tarfile.TarInfo(f"{head}/.wh.{name}" if head else f".wh.{name}")
            marker.mode = 0o644
            layer.add(marker, None)


def write_deferred_links(layer: LayerWriter, diff: DiffState,
                         fetch: Callable[[str, Signature], AbstractContextManager[IO[bytes]]]) -> None:
    """--base: each unchanged file that gained a hard link is written into the layer (its content from
    *fetch*), then its new links, so that no link of the layer points into a lower one."""
    for target, links in diff.deferred.items():
        sig = diff.signatures[target]
        info = tarfile.TarInfo(target)
        info.type = tarfile.REGTYPE
        info.mode, info.uid, info.gid, info.size = sig.mode, sig.uid, sig.gid, sig.size
        info.mtime = links[0].mtime  # one inode: the links' times are the target's
        info.uname = info.gname = ""
        info.pax_headers = dict(sig.xattrs)
        with fetch(target, sig) as data:
            layer.add(info, data)
        for link in links:
            layer.add(link, None)


def _spool(data: IO[bytes] | None, size: int) -> tuple[IO[bytes], str]:
    """Keep a file's content (in memory up to 8 MiB, then on disk) and hash it in the same pass."""
    import tempfile

    spool = tempfile.SpooledTemporaryFile(max_size=8 << 20)
    digest = hashlib.sha256()
    for chunk in read_upto(data, size):
        spool.write(chunk)
        digest.update(chunk)
    spool.seek(0)
    return spool, digest.hexdigest()


# -- config ----------------------------------------------------------------------------------------------------


def _apply_flags(cfg: dict[str, Any], options: ExportOptions) -> None:
    if options.entrypoint is not None:
        cfg["Entrypoint"] = list(options.entrypoint) or None
    if options.cmd is not None:
        cfg["Cmd"] = list(options.cmd) or None
    if options.env:
        env = list(cfg.get("Env") or [])
        for item in options.env:
            key = item.split("=", 1)[0]
            env = [e for e in env if e.split("=", 1)[0] != key] + [item]
        cfg["Env"] = env
    if options.workdir is not None:
        cfg["WorkingDir"] = options.workdir
    if options.user is not None:
        cfg["User"] = options.user
    if options.labels:
        cfg["Labels"] = {**(cfg.get("Labels") or {}), **dict(options.labels)}
    if options.expose:
        cfg["ExposedPorts"] = {**(cfg.get("ExposedPorts") or {}), **{p: {} for p in options.expose}}


def build_config(opened: Opened, base: Image | None, options: ExportOptions, diff_ids: list[str],
                 disk_sha: str, disk: Path, epoch: int | None) -> dict[str, Any]:
    created = timestamp(epoch)
    entry = {"created": created, "created_by": f"imgconv {__version__} vm-to-oci",
             "comment": f"from disk {disk.name} ({disk_sha})"}
    if opened.config is not None:
        doc = dict(ImageConfig.parse(opened.config, "the disk's embedded image config").doc)
    elif base is not None:
        doc = dict(base.config.doc)
    else:
        assert opened.os is not None
        doc = {
            "architecture": normalise_arch(opened.os.arch),
            "os": "linux",
            "config": {"Env": [DEFAULT_PATH], "Cmd": ["/bin/sh"]},
        }
        labels = {
            f"{LABEL_PREFIX}.disk.sha256": disk_sha,
            f"{LABEL_PREFIX}.os.distro": opened.os.distro,
            f"{LABEL_PREFIX}.os.version": opened.os.version,
            f"{LABEL_PREFIX}.os.product": opened.os.product,
        }
        doc["config"]["Labels"] = labels
    cfg = dict(doc.get("config") or {})
    _apply_flags(cfg, options)
    doc["config"] = cfg
    doc["created"] = created
    history = [dict(h) for h in doc.get("history") or []]
    if base is None:
        # One flattened layer replaces whatever layers the history describes.
        for h in history:
            h["empty_layer"] = True
    doc["history"] = [*history, entry]
    doc["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
    return doc


# -- the conversion ------------------------------------------------------------------------------------------------


def export(disk: Path, dest: str, options: ExportOptions, monitor: Monitor) -> dict[str, Any]:
    # Absolute, so that no tool reads the name as anything but a file: qemu-img takes `vm-1:2.qcow2` for a
    # protocol, `file:x` for another file, and `-x` for an option.
    disk = Path(os.path.abspath(disk))
    ref = parse_reference(dest)
    check_destination(ref)
    if options.compression not in ("gzip", "zstd"):
        raise UsageError(f"unknown compression {options.compression!r}; choose gzip or zstd")
    epoch = source_date_epoch(options.reproducible)
    with monitor.step(f"checking {disk}"):
        fmt = probe_format(disk)
        info = check_disk(disk, fmt)
    hashed: dict[str, str] = {}
    hasher = threading.Thread(target=lambda: hashed.setdefault("sha", sha256_file(disk)), daemon=True)
    hasher.start()
    with scratch_dir() as scratch:
        base_ctx = open_image(parse_reference(options.base), platform=options.platform,
                              tls_verify=options.tls_verify) if options.base else None
        base = base_ctx.__enter__() if base_ctx is not None else None
        try:
            base_index = None
            if base is not None:
                with monitor.step(f"reading the base image {base.source}"):
                    base_index = index_image(base)
            layout = LayoutWriter(scratch / "layout")
            result: dict[str, Any] = {}

            def work() -> None:
                with monitor.step("starting the appliance"):
                    app_cm = launch([(disk, fmt, True)])
                    app = app_cm.__enter__()
                try:
                    _export_in_appliance(app, disk, options, layout, scratch, base_index, monitor, result)
                except BaseException as exc:
                    app_cm.__exit__(type(exc), exc, exc.__traceback__)
                    raise
                app_cm.__exit__(None, None, None)

            run_interruptibly(work)
            written: WrittenLayer = result["layer"]
            opened: Opened = result["opened"]
            hasher.join()
            layers: list[Descriptor] = []
            diff_ids: list[str] = []
            if base is not None:
                with monitor.step("copying the base layers"):
                    for layer in base.layers:
                        with base.store.open_blob(layer.descriptor.digest) as blob:
                            copy_blob(blob, layout, layer.descriptor.digest)
                        layers.append(layer.descriptor)
                        diff_ids.append(layer.diff_id)
            layers.append(written.descriptor)
            diff_ids.append(written.diff_id)
            config = build_config(opened, base, options, diff_ids, hashed.get("sha", "unknown"), disk, epoch)
            manifest, config_desc = write_image(layout, config, layers, WORK_TAG)
            built = Built(layout.root, manifest, config_desc, tuple(layers))
            with monitor.step(f"writing {ref}"):
                pushed = deliver(built, ref, tls_verify=options.tls_verify, scratch=scratch)
        finally:
            if base_ctx is not None:
                base_ctx.__exit__(None, None, None)
    return {
        "destination": str(ref),
        "manifest_digest": pushed or manifest.digest,
        "image_id": config_desc.digest,
        "layers": [d.to_json() for d in layers],
        "new_layer": {"digest": written.descriptor.digest, "diff_id": written.diff_id, "entries": written.entries},
        "source": {"disk": str(disk), "format": fmt, "sha256": hashed.get("sha"),
                   "virtual_size": info.get("virtual-size"),
                   "made_by_imgconv": opened.origin is not None,
                   "os": None if opened.os is None else {"distro": opened.os.distro, "version": opened.os.version,
                                                         "product": opened.os.product, "root": opened.os.root}},
    }


def _export_in_appliance(app: Appliance, disk: Path, options: ExportOptions, layout: LayoutWriter, scratch: Path,
                         base_index: dict[str, Signature] | None, monitor: Monitor, result: dict[str, Any]) -> None:
    g = app.g
    with monitor.step("finding the operating system"):
        opened = open_guest(app, disk, options.root)
    if opened.origin is None and opened.os is None:
        raise DiskError(f"no operating system found on {disk}")
    result["opened"] = opened
    if opened.os is not None and opened.os.distro != "unknown":
        monitor.note(f"found {opened.os.product} ({opened.os.distro} {opened.os.version}) on {opened.os.root}")
    scope = filter_for(opened, options.keep_boot)
    used = 0
    for mountpoint in opened.mountpoints:
        try:
            stats = g.statvfs(mountpoint)
            used += (stats["blocks"] - stats["bfree"]) * stats["frsize"]
        except RuntimeError:
            continue
    fifo = scratch / "disk.fifo"
    epoch = source_date_epoch(options.reproducible)
    diff = DiffState(base=base_index) if base_index is not None else None
    with monitor.step("writing the layer"), monitor.bar("files", used or None) as bar, \
            LayerWriter(layout, options.compression, clamp_mtime=epoch) as layer:
        through_fifo(fifo, "read",
                     functools.partial(_consume, layer=layer, scope=scope, diff=diff, on_bytes=bar.update),
                     lambda path: app.call("read the disk's files", g.tar_out, "/", path, numericowner=True,
                                           xattrs=True, excludes=scope.patterns()))
        if diff is not None and diff.deferred:
            write_deferred_links(layer, diff, functools.partial(_read_again, app, scratch))
    assert layer.result is not None
    result["layer"] = layer.result


@contextmanager
def _read_again(app: Appliance, scratch: Path, path: str, sig: Signature) -> Iterator[IO[bytes]]:
    """A file the tar stream already passed, read again from the (read-only) disk and checked against it."""
    local = scratch / "read-again"
    try:
        app.call(f"read /{path} from the disk", app.g.download, f"/{path}", str(local))
    except UnicodeError:  # the bindings pass names as UTF-8 text
        raise DiskError(f"the disk's {path!r} gained a hard link but its name is not UTF-8, so it cannot be read "
                        "again; export without --base") from None
    try:
        with local.open("rb") as data:
            if hash_stream(data, sig.size + 1) != sig.sha256:
                raise LayerError(f"the disk's {path!r} read differently the second time")
            data.seek(0)
            yield data
    finally:
        local.unlink(missing_ok=True)


def _consume(stream: BinaryIO, *, layer: LayerWriter, scope: Filter, diff: DiffState | None,
             on_bytes: Callable[[int], None]) -> None:
    write_layer(stream, layer, scope, diff, on_bytes)

