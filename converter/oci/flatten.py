"""Layer flattening: the ordered layers of an image become one tar stream of its final root filesystem.

One pass, newest layer first (as go-containerregistry's ``mutate.Extract``): an entry is written
the first time its path is met, and older entries are dropped when a newer layer already wrote
the path, whited it out (``.wh.NAME``), made a directory opaque (``.wh..wh..opq``, wherever the
marker sits in its tar), or replaced an ancestor with something that is not a directory. Memory
holds one record per path (never file contents); nothing is extracted anywhere.

Names are normalised (``./a//b/`` is ``a/b``) and confined: absolute names, ``..`` components and
writes beneath a symlink are refused with a :class:`LayerError` naming the layer and the path.

Hard links need care because a link may point at a file a newer layer replaced. A link whose
target is in an older layer is resolved when that layer is read (linked to the target if it
survives, given the target's content otherwise); a link to a file of its own layer that a newer
layer shadowed is resolved by re-reading that layer once (rare: only such links cost it).

The output has numeric owners only (empty uname/gname), because whoever extracts it must not
map names through *its* /etc/passwd.
"""

from __future__ import annotations

import base64
import io
import tarfile
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import IO, BinaryIO, Protocol

from converter.errors import LayerError

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"

DIR = "dir"
NONDIR = "nondir"

# tarfile's block size for streams: large reads keep the per-call overhead small.
_BUFSIZE = 1 << 20


class TarSink(Protocol):
    """Where flattened entries go: a ``tarfile.TarFile`` opened for writing, or anything with addfile."""

    def addfile(self, tarinfo: tarfile.TarInfo, fileobj: IO[bytes] | None = None) -> None: ...


@dataclass(frozen=True)
class LayerInput:
    """One layer to flatten: how to name it in errors and how to open its uncompressed tar."""

    what: str
    open: Callable[[], AbstractContextManager[BinaryIO]]


@dataclass
class FlatTree:
    """What the flattened root filesystem holds, without contents: enough to place files into it."""

    kinds: dict[str, str] = field(default_factory=dict)  # path -> DIR | NONDIR (implicit parents included)
    symlinks: dict[str, str] = field(default_factory=dict)  # path -> link target, for surviving symlinks
    dirs: dict[str, tarfile.TarInfo] = field(default_factory=dict)  # surviving explicit directory headers
    entries: int = 0
    content_bytes: int = 0


def normalize_name(name: str, what: str, *, link: bool = False) -> str:
    """`./usr//bin/` -> `usr/bin`; "" for the root itself. Absolute names and `..` are refused.

    A hard link's target may be written with a leading `/` by some tools (GNU tar -P); it
    still names a member of the same archive, so for link targets the slash is dropped.
    """
    if "\x00" in name:
        raise LayerError(f"{what}: entry name {name!r} contains a NUL byte")
    if name.startswith("/"):
        if not link:
            raise LayerError(f"{what}: absolute path {name!r} in layer; layer paths must be relative to the root")
        name = name.lstrip("/")
    parts = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            kind = "hard link target" if link else "path"
            raise LayerError(f"{what}: {kind} {name!r} contains '..' and could escape the root")
        parts.append(part)
    return "/".join(parts)


def parents(path: str) -> Iterator[str]:
    """Proper ancestors of *path*, nearest first: a/b/c -> a/b, a."""
    while "/" in path:
        path = path.rsplit("/", 1)[0]
        yield path


def whiteout_of(path: str) -> tuple[str, str] | None:
    """("opaque", dir) for an opaque marker, ("whiteout", target) for `.wh.NAME`, else None.

    Other `.wh..wh.` names (AUFS bookkeeping such as `.wh..wh.plnk`) give ("meta", path).
    """
    head, _, base = path.rpartition("/")
    if not base.startswith(WHITEOUT_PREFIX):
        return None
    if base == OPAQUE_MARKER:
        return ("opaque", head)
    if base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
        return ("meta", path)
    target = base[len(WHITEOUT_PREFIX):]
    if not target:
        return ("meta", path)
    return ("whiteout", f"{head}/{target}" if head else target)


def _xattr_headers(pax: Mapping[str, str]) -> dict[str, str]:
    """Keep extended attributes, in the SCHILY form GNU tar reads (libarchive's form is converted)."""
    kept: dict[str, str] = {}
    for key, value in pax.items():
        if key.startswith("SCHILY.xattr."):
            kept[key] = value
        elif key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote(key[len("LIBARCHIVE.xattr."):])
            try:
                raw = base64.b64decode(value + "=" * (-len(value) % 4))
            except ValueError:
                continue
            kept.setdefault(f"SCHILY.xattr.{name}", raw.decode("utf-8", "surrogateescape"))
    return kept


def clean_header(member: tarfile.TarInfo, name: str) -> tarfile.TarInfo:
    """A fresh header for *member* under *name*: numeric owners, no stale PAX path/size records."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.REGTYPE if member.type in (tarfile.AREGTYPE, tarfile.CONTTYPE) else member.type
    if member.isreg():
        info.type = tarfile.REGTYPE
    info.mode = member.mode & 0o7777
    info.uid, info.gid = member.uid, member.gid
    info.uname = info.gname = ""
    info.mtime = member.mtime
    info.size = member.size if info.type == tarfile.REGTYPE else 0
    info.linkname = member.linkname
    info.devmajor, info.devminor = member.devmajor, member.devminor
    info.pax_headers = _xattr_headers(member.pax_headers)
    return info


def _kind(member: tarfile.TarInfo) -> str:
    return DIR if member.isdir() else NONDIR


@dataclass
class _Pending:
    """A hard link waiting for its target: *info* is the link's own header (name is final)."""

    info: tarfile.TarInfo
    layer: str


class _Layer:
    """Per-layer state: what this layer wrote, skipped, whited out. Merged after the layer ends."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.written: dict[str, str] = {}  # path -> kind, explicit entries kept from this layer
        self.implicit: set[str] = set()  # ancestors of kept entries not written by this layer
        self.skipped_files: set[str] = set()  # shadowed regular files (possible hard link targets)
        self.aliases: dict[str, str] = {}  # shadowed hard link -> its target
        self.symlinks: set[str] = set()
        self.whiteouts: set[str] = set()
        self.opaque: set[str] = set()
        self.waiting: dict[str, list[_Pending]] = {}  # skipped target -> links needing its content


class Flattener:
    def __init__(self, out: TarSink, on_bytes: Callable[[int], None] | None = None) -> None:
        self.out = out
        self.on_bytes = on_bytes
        self.tree = FlatTree()
        self.explicit: dict[str, str] = {}  # path -> kind, from newer layers
        self.implicit: set[str] = set()  # directories newer layers wrote beneath without an entry
        self.whiteouts: set[str] = set()
        self.opaque: set[str] = set()
        self.pending: dict[str, list[_Pending]] = {}  # hard links whose target is in an older layer

    # -- visibility -------------------------------------------------------------------------

    def _hidden(self, path: str) -> bool:
        """Is an entry at *path* from the layer being read hidden by a newer layer?"""
        if path in self.explicit or path in self.whiteouts:
            return True
        for parent in parents(path):
            if parent in self.whiteouts or parent in self.opaque or self.explicit.get(parent) == NONDIR:
                return True
        return False

    # -- the pass ---------------------------------------------------------------------------

    def run(self, layers: Sequence[LayerInput]) -> FlatTree:
        for layer in reversed(layers):
            self._layer(layer)
        if self.pending:
            target, links = next(iter(self.pending.items()))
            raise LayerError(f"{links[0].layer}: hard link {links[0].info.name!r} points to {target!r}, "
                             "which no layer provides")
        return self.tree

    def _members(self, stream: BinaryIO, what: str) -> Iterator[tuple[tarfile.TarInfo, tarfile.TarFile]]:
        counted = _Counting(stream, self.on_bytes)
        try:
            tar = tarfile.open(fileobj=counted, mode="r|", bufsize=_BUFSIZE)
        except tarfile.ReadError as exc:
            if "empty file" in str(exc):
                return  # a zero-length layer is an empty layer
            raise LayerError(f"{what}: not a tar archive: {exc}") from None
        try:
            while True:
                try:
                    member = tar.next()
                except tarfile.TarError as exc:
                    raise LayerError(f"{what}: malformed tar: {exc}") from None
                if member is None:
                    break
                yield member, tar
        finally:
            tar.close()

    def _layer(self, layer: LayerInput) -> None:
        state = _Layer(layer.what)
        with layer.open() as stream:
            try:
                for member, tar in self._members(stream, layer.what):
                    self._entry(state, member, tar)
            except (tarfile.TarError, EOFError) as exc:
                raise LayerError(f"{layer.what}: malformed tar: {exc}") from None
        if state.waiting:
            self._reread_for_links(layer, state)
        self._merge(state)

    def _entry(self, state: _Layer, member: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        what = state.what
        path = normalize_name(member.name, what)
        if not path:
            return  # the root directory itself
        marker = whiteout_of(path)
        if marker is not None:
            kind, target = marker
            if kind == "opaque":
                if target:
                    state.opaque.add(target)
            elif kind == "whiteout":
                state.whiteouts.add(target)
            return
        if member.islnk():
            self._hardlink(state, member, path)
            return
        # Older versions of a file a newer layer's link is waiting for.
        waiting_links = self.pending.pop(path, None)
        if self._hidden(path) or self._conflicts(state, member, path):
            if member.isreg():
                state.skipped_files.add(path)
                if waiting_links:
                    self._emit_links_with_content(waiting_links, member, tar.extractfile(member))
            elif waiting_links:
                raise LayerError(f"{waiting_links[0].layer}: hard link {waiting_links[0].info.name!r} "
                                 f"points to {path!r}, which is not a regular file")
            return
        self._write(state, member, path, tar)
        if waiting_links:
            if not member.isreg():
                raise LayerError(f"{waiting_links[0].layer}: hard link {waiting_links[0].info.name!r} "
                                 f"points to {path!r}, which is not a regular file")
            for link in waiting_links:
                link.info.linkname = path
                self._add(link.info, None)

    def _conflicts(self, state: _Layer, member: tarfile.TarInfo, path: str) -> bool:
        """Checks against entries from the same layer and symlinks from older layers.

        Returns True when the entry should be skipped; raises for layouts that cannot be
        represented without following a symlink.
        """
        for parent in parents(path):
            if parent in state.symlinks:
                raise LayerError(f"{state.what}: {path!r} is beneath the symlink {parent!r}; "
                                 "imgconv refuses paths that go through symlinks")
        if path in self.implicit and member.issym():
            raise LayerError(f"{state.what}: the symlink {path!r} is written through by a newer layer; "
                             "imgconv refuses paths that go through symlinks")
        if path in self.implicit and not member.isdir():
            return True  # newer layers need a directory here
        if path in state.implicit and not member.isdir():
            raise LayerError(f"{state.what}: {path!r} appears as a directory and as a "
                             f"{'symlink' if member.issym() else 'file'} in the same layer")
        previous = state.written.get(path)
        if previous is not None and previous != _kind(member):
            raise LayerError(f"{state.what}: {path!r} appears twice in the layer with different types")
        return False

    def _write(self, state: _Layer, member: tarfile.TarInfo, path: str, tar: tarfile.TarFile) -> None:
        info = clean_header(member, path)
        state.written[path] = _kind(member)
        for parent in parents(path):
            if parent not in state.written and parent not in self.explicit:
                state.implicit.add(parent)
        if member.issym():
            state.symlinks.add(path)
            self.tree.symlinks[path] = member.linkname
        else:
            self.tree.symlinks.pop(path, None)
        if member.isdir():
            self.tree.dirs[path] = info
        else:
            self.tree.dirs.pop(path, None)
        self._add(info, tar.extractfile(member) if member.isreg() else None)

    def _add(self, info: tarfile.TarInfo, data: IO[bytes] | None) -> None:
        self.out.addfile(info, data)
        self.tree.entries += 1
        if info.type == tarfile.REGTYPE:
            self.tree.content_bytes += info.size

    # -- hard links --------------------------------------------------------------------------

    def _hardlink(self, state: _Layer, member: tarfile.TarInfo, path: str) -> None:
        target = normalize_name(member.linkname, state.what, link=True)
        target = state.aliases.get(target, target)
        if not target or target == path:
            raise LayerError(f"{state.what}: hard link {path!r} has an invalid target {member.linkname!r}")
        if self._hidden(path) or self._conflicts(state, member, path):
            state.aliases[path] = target
            return
        info = clean_header(member, path)
        info.linkname = target
        state.written[path] = NONDIR
        for parent in parents(path):
            if parent not in state.written and parent not in self.explicit:
                state.implicit.add(parent)
        self.tree.symlinks.pop(path, None)
        if state.written.get(target) == NONDIR and target not in state.skipped_files:
            self._add(info, None)  # the usual case: target written earlier in this layer
            return
        # Deferred: later links to this link must join the same queue, hence the alias.
        state.aliases[path] = target
        if target in state.skipped_files:
            state.waiting.setdefault(target, []).append(_Pending(info, state.what))
        else:
            self.pending.setdefault(target, []).append(_Pending(info, state.what))

    def _emit_links_with_content(self, links: list[_Pending], target: tarfile.TarInfo,
                                 data: IO[bytes] | None) -> None:
        """The first waiting link becomes a regular file holding *target*'s content; the rest link to it."""
        first = links[0].info
        body = clean_header(target, first.name)
        self._add(body, data)
        for link in links[1:]:
            link.info.linkname = first.name
            self._add(link.info, None)

    def _reread_for_links(self, layer: LayerInput, state: _Layer) -> None:
        with layer.open() as stream:
            for member, tar in _quiet_members(stream, layer.what):
                path = normalize_name(member.name, layer.what)
                links = state.waiting.pop(path, None)
                if links and member.isreg():
                    self._emit_links_with_content(links, member, tar.extractfile(member))
                if not state.waiting:
                    break
        if state.waiting:
            target, links = next(iter(state.waiting.items()))
            raise LayerError(f"{layer.what}: hard link {links[0].info.name!r} points to {target!r}, "
                             "which is not a regular file of the layer")

    # -- end of a layer ------------------------------------------------------------------------

    def _merge(self, state: _Layer) -> None:
        for path, kind in state.written.items():
            self.explicit[path] = kind
            self.tree.kinds[path] = kind
            self.implicit.discard(path)
        for path in state.implicit:
            if path not in self.explicit:
                self.implicit.add(path)
                self.tree.kinds.setdefault(path, DIR)
        self.whiteouts |= state.whiteouts
        self.opaque |= state.opaque


def _quiet_members(stream: BinaryIO, what: str) -> Iterator[tuple[tarfile.TarInfo, tarfile.TarFile]]:
    tar = tarfile.open(fileobj=stream, mode="r|", bufsize=_BUFSIZE)
    try:
        for member in tar:
            yield member, tar
    finally:
        tar.close()


class _Counting(io.RawIOBase):
    """Reports how many bytes of layer have been read, for progress bars."""

    def __init__(self, inner: BinaryIO, on_bytes: Callable[[int], None] | None) -> None:
        super().__init__()
        self.inner, self.on_bytes = inner, on_bytes

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.inner.read(size)
        if self.on_bytes is not None and data:
            self.on_bytes(len(data))
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        memoryview(buffer)[: len(data)] = data
        return len(data)


def flatten(layers: Sequence[LayerInput], out: TarSink,
            on_bytes: Callable[[int], None] | None = None) -> FlatTree:
    """Write the final root filesystem of *layers* (oldest first) into *out*; return what it holds.

    *out* stays open so the caller can add its own entries before closing it.
    """
    return Flattener(out, on_bytes).run(layers)


def open_output(stream: BinaryIO) -> tarfile.TarFile:
    """The tar writer flatten expects: PAX (long names, big ids, xattrs), streamed."""
    return tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT, bufsize=_BUFSIZE)
