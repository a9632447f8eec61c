"""What leaves a disk for vm-to-oci's layer: which entries (:class:`Filter`), and, with ``--base``, only
what differs from the base image (:class:`DiffState`), with whiteouts for what the disk no longer has.

The tar-out stream of the disk is read once, in bounded memory; a file whose content must be both hashed
(to compare with the base) and, if changed, written is spooled (in memory up to 8 MiB, then on disk).
"""

from __future__ import annotations

import hashlib
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import IO, BinaryIO

from converter.disk.fifo import StreamBroken
from converter.disk.inspect import Opened, exclude_patterns
from converter.errors import DiskError, LayerError
from converter.guest import BOOT_TREES, RESERVED, RUNTIME_DIRS
from converter.oci.flatten import whiteout_of
from converter.oci.tarread import TarReader
from converter.oci.tarutil import (
    clean_header,
    forget_members,
    gnu_xattrs_decoded,
    normalize_name,
    open_reader,
    parents,
)
from converter.oci.tree import Signature, read_upto, signature
from converter.oci.writer import LayerWriter


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
        return Filter(dropped=injected | {RESERVED})
    result = Filter(emptied=set(RUNTIME_DIRS))
    for mountpoint in opened.mountpoints:
        base = mountpoint.strip("/")
        result.dropped.add(f"{base}/lost+found" if base else "lost+found")
    if not keep_boot:
        result.emptied |= set(BOOT_TREES)
    return result


def tar_members(stream: BinaryIO) -> Iterator[tuple[tarfile.TarInfo, TarReader]]:
    """The disk's tar-out stream, bounded as layers are (special headers, name lengths): the disk is untrusted."""
    try:
        tar = open_reader(stream)
    except tarfile.TarError as exc:
        raise StreamBroken(f"the disk's files could not be read: {exc}") from exc
    try:
        for member in tar:
            yield member, tar
            forget_members(tar)  # bounded memory whatever the number of files
    except tarfile.TarError as exc:
        raise StreamBroken(f"the disk's files could not be read: {exc}") from exc
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

    def whiteout_markers(self, scope: Filter) -> Iterator[tarfile.TarInfo]:
        for gone in self.whiteouts(scope):
            head, _, name = gone.rpartition("/")
            marker = tarfile.TarInfo(f"{head}/.wh.{name}" if head else f".wh.{name}")
            marker.mode = 0o644
            yield marker

    def add(self, info: tarfile.TarInfo, data: IO[bytes] | None, layer: LayerWriter) -> None:
        """Write *info* into *layer* if the base does not have it as it is now."""
        self.seen.add(info.name)
        if info.islnk():
            self._add_link(info, layer)
            return
        if info.isreg():
            # The content is needed both for the hash and, if changed, for the layer: spool it.
            spool, content_hash = _spool(data, info.size)
            sig = signature(info, content_hash)
        else:
            spool, sig = None, signature(info)
        self.signatures[info.name] = sig
        if self.base.get(info.name) != sig:
            layer.add(info, spool)
            self.written.add(info.name)
        if spool is not None:
            spool.close()

    def _add_link(self, info: tarfile.TarInfo, layer: LayerWriter) -> None:
        # Same inode, same signature as its target.
        sig = self.signatures.get(info.linkname)
        if sig is None or self.base.get(info.name) != sig or info.linkname in self.written:
            if sig is None or info.linkname in self.written:
                layer.add(info, None)
            else:  # the target is unchanged: not in this layer (yet)
                self.deferred.setdefault(info.linkname, []).append(info)
            self.written.add(info.name)
        if sig is not None:
            self.signatures[info.name] = sig

    def _replaced(self, path: str) -> bool:
        sig = self.signatures.get(path)
        return sig is not None and sig.type != tarfile.DIRTYPE


def write_layer(stream: BinaryIO, layer: LayerWriter, scope: Filter, diff: DiffState | None,
                on_bytes: Callable[[int], None]) -> None:
    """tar-out entries -> the layer: filtered, normalised, and (with --base) only what changed."""
    for member, tar in tar_members(stream):
        info = _kept(member, scope)
        if info is None:
            continue
        data = tar.extractfile(member) if member.isreg() else None
        on_bytes(member.size if member.isreg() else 512)
        if diff is None:
            layer.add(info, data)
        else:
            diff.add(info, data, layer)
    if diff is not None:
        for marker in diff.whiteout_markers(scope):
            layer.add(marker, None)


def _kept(member: tarfile.TarInfo, scope: Filter) -> tarfile.TarInfo | None:
    """The layer's header for a tar-out entry, or None when the entry stays out."""
    path = normalize_name(member.name, "the disk")
    if not path or not scope.keeps(path):
        return None
    if whiteout_of(path) is not None:
        raise DiskError(f"the disk holds /{path}, a name OCI layers reserve for deletions (.wh.*): "
                        "no image can carry it; rename it first")
    member.pax_headers = gnu_xattrs_decoded(member.pax_headers)
    info = clean_header(member, path)
    if member.islnk():
        info.linkname = normalize_name(member.linkname, "the disk", link=True)
        if not scope.keeps(info.linkname):
            raise LayerError(f"the disk's {path!r} is a hard link into a left-out path {info.linkname!r}")
    return info


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
    spool = tempfile.SpooledTemporaryFile(max_size=8 << 20)
    digest = hashlib.sha256()
    for chunk in read_upto(data, size):
        spool.write(chunk)
        digest.update(chunk)
    spool.seek(0)
    return spool, digest.hexdigest()


