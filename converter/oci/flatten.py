"""Layer flattening: the ordered layers of an image become one tar stream of its final root filesystem.

One pass, newest layer first (as go-containerregistry's ``mutate.Extract``): an entry is written
the first time its path is met, and older entries are dropped when a newer layer already wrote
the path, whited it out (``.wh.NAME``), made a directory opaque (``.wh..wh..opq``, wherever the
marker sits in its tar), or replaced the path or an ancestor with something that is not a
directory. Whiteouts and opaque markers apply to lower layers only (OCI image-spec). Memory holds
one record per path (never file contents); nothing is extracted anywhere. The ancestors of a path are
known by fixed-size keys (:func:`path_keys`), never as strings of their own: a path of n components
costs O(n) memory and time, not the O(n^2) its ancestors' names would take (a 4 KiB path can have 2048).

Names are normalised and confined by :mod:`converter.oci.tarutil` (absolute names and ``..`` are
refused with a :class:`LayerError` naming the layer and the path); so are layers that
contradict themselves (one path as a directory and as a non-directory, an entry beneath the
layer's own symlink or file) and layers that write beneath an older layer's symlink or file
(Docker would follow the symlink, or fail).

Hard links follow tar semantics: a link shares the inode its target held when the link was met
(the lower layers' file if its own layer has not written the target yet). A link whose target
survives is written as a link after it; one whose target a newer layer replaced gets a copy of
the target's entry, which costs one more read of the target's layer (rare).

The output has numeric owners only (empty uname/gname), because whoever extracts it must not
map names through *its* /etc/passwd.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections import deque
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import IO, BinaryIO, Protocol, cast

from converter.errors import LayerError
from converter.oci.image import LayerInput
from converter.oci.tarread import Entry, TarReader
from converter.oci.tarutil import check_header, clean_header, normalize_name, read_members

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"

# What sparse files' holes may add to the output beyond a quarter of the layer bytes read (see Flattener._content).
SPARSE_SLACK = 1 << 20

DIR = "dir"
NONDIR = "nondir"


_ROOT = bytes(16)


def path_keys(path: str) -> list[bytes]:
    """A key for each prefix of the normalised *path*, shallowest first (the last is the path's own; none for the
    root, whose key is _ROOT). Each key hashes its parent's key and one component (blake2b, 128 bits: distinct
    paths never share one), so all of them cost O(len(path)) to compute and 16 bytes each to keep."""
    keys = []
    key = _ROOT
    if path:
        for part in path.split("/"):
            key = hashlib.blake2b(key + part.encode("utf-8", "surrogatepass"), digest_size=16).digest()
            keys.append(key)
    return keys


def path_key(path: str) -> bytes:
    return path_keys(path)[-1] if path else _ROOT


class PathKinds(MutableMapping[str, str]):
    """path -> DIR | NONDIR for the paths set, and DIR for each of their ancestors (the implicit parents), which are
    kept as keys: a deep path does not cost the names of all its ancestors."""

    def __init__(self) -> None:
        self.explicit: dict[str, str] = {}
        self.implicit: set[bytes] = set()

    def put(self, path: str, kind: str, keys: list[bytes]) -> None:
        """Set *path* whose :func:`path_keys` are *keys*."""
        self.explicit[path] = kind
        self.implicit.update(keys[:-1])

    def has(self, path: str, key: bytes) -> bool:
        return path in self.explicit or key in self.implicit

    def __getitem__(self, path: str) -> str:
        kind = self.explicit.get(path)
        if kind is not None:
            return kind
        if path and path_key(path) in self.implicit:
            return DIR
        raise KeyError(path)

    def __setitem__(self, path: str, kind: str) -> None:
        self.put(path, kind, path_keys(path))

    def __delitem__(self, path: str) -> None:
        del self.explicit[path]

    def __iter__(self) -> Iterator[str]:
        """The paths set, then their implicit parents (names made one at a time)."""
        yield from self.explicit
        seen: set[bytes] = set()
        for path in list(self.explicit):
            parts = path.split("/")
            for i, key in enumerate(path_keys(path)[:-1]):
                parent = "/".join(parts[:i + 1])
                if key not in seen and parent not in self.explicit:
                    seen.add(key)
                    yield parent

    def __len__(self) -> int:
        return sum(1 for _ in self)


class TarSink(Protocol):
    """Where flattened entries go: a ``tarfile.TarFile`` opened for writing, or anything with addfile."""

    def addfile(self, tarinfo: tarfile.TarInfo, fileobj: IO[bytes] | None = None) -> None: ...


class LayerTap(Protocol):
    """Sees each layer's raw bytes and which regular files are kept (what the disk will hold at their path):
    :mod:`converter.oci.tarsplit` records layers with it so that they can be given back byte for byte."""

    def layer(self, what: str, stream: BinaryIO) -> BinaryIO: ...

    def kept(self, member: tarfile.TarInfo, path: str) -> None: ...

    def end(self) -> None: ...


@dataclass
class FlatTree:
    """What the flattened root filesystem holds, without contents: enough to place files into it."""

    kinds: PathKinds = field(default_factory=PathKinds)  # path -> DIR | NONDIR (implicit parents included)
    symlinks: dict[str, str] = field(default_factory=dict)  # path -> link target, for surviving symlinks
    dirs: dict[str, tarfile.TarInfo] = field(default_factory=dict)  # surviving explicit directory headers
    entries: int = 0
    content_bytes: int = 0


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


def _kind(member: tarfile.TarInfo) -> str:
    return DIR if member.isdir() else NONDIR


# What a path of the layer being read holds, for hard links: the ordinal of the entry (file, symlink,
# device, fifo) whose inode it shares, _DIR_INODE for a directory, or a path of the older layers.
_Inode = int | str
_DIR_INODE = -1


@dataclass
class _Pending:
    """A hard link to write later: *info* is its own header (its name is final)."""

    info: tarfile.TarInfo
    layer: str
    cancelled: bool = False  # a later entry of the link's own layer replaced it


class _Layer:
    """Per-layer state: what this layer holds, wrote, hides. Merged after the layer ends."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.kinds: dict[str, str] = {}  # every entry of the layer, kept or not: path -> DIR | NONDIR
        self.symlinks: set[str] = set()  # entries of the layer that are symlinks
        self.kind_at: dict[bytes, str] = {}  # key -> DIR | NONDIR, of every entry of the layer (markers excluded)
        self.beneath: set[bytes] = set()  # keys of the proper ancestors of the layer's entries, markers excluded
        self.marked: set[bytes] = set()  # keys of the proper ancestors of the layer's whiteouts and opaque markers
        self.sources: list[str] = []  # the layer's entries with ancestors (to name them, see Flattener.implied)
        self.written: dict[str, str] = {}  # path -> kind, entries kept from this layer
        self.whiteouts: set[bytes] = set()  # keys of `.wh.` targets and the layer's non-directories: hidden below
        self.opaque: set[bytes] = set()  # keys of opaque directories (_ROOT for the root)
        self.inodes: dict[str, _Inode] = {}
        self.holders: dict[int, tuple[str, bool]] = {}  # entry ordinal -> (its path, kept?)
        self.linked: dict[int, deque[str]] = {}  # entry ordinal -> paths of links to it written to the output
        self.linked_at: dict[str, int] = {}  # path -> the entry ordinal its written link shares, until replaced
        self.symlink_of: dict[int, str] = {}  # entry ordinal of a symlink -> its target (links share it)
        self.waiting: dict[int, list[_Pending]] = {}  # shadowed entry -> links that need a copy of it
        self.older: dict[str, list[_Pending]] = {}  # links of this layer to paths of older layers
        self.deferred: dict[str, _Pending] = {}  # path -> this layer's not yet written link there


class Flattener:
    def __init__(self, out: TarSink, on_bytes: Callable[[int], None] | None = None,
                 tap: LayerTap | None = None) -> None:
        self.out = out
        self.on_bytes = on_bytes
        self.tap = tap
        self.read_bytes = 0  # of layer, both reads
        self.holes = 0  # bytes of sparse files' holes written out
        self.tree = FlatTree()
        self.explicit: dict[bytes, str] = {}  # path key -> kind, kept from newer layers
        self.whiteouts: set[bytes] = set()
        self.opaque: set[bytes] = set()
        # Keys of paths newer layers wrote beneath without an entry for them: an older layer must have a
        # directory there, unless a layer between them settled the path (had an entry there, or removed it or
        # an ancestor). Value: the nearest such newer layer (its index in the pass, its name for the message).
        self.beneath: dict[bytes, int] = {}
        self.names: list[str] = []  # of the layers, by index in the pass (newest first)
        self.index = -1  # of the layer being read
        self.settled: dict[bytes, int] = {}  # key -> the last layer with an entry or a whiteout at the path
        self.cleared: dict[bytes, int] = {}  # key -> the last layer removing what is beneath the path
        self.pending: dict[str, list[_Pending]] = {}  # hard links whose target is in an older layer
        # Keys of directories layers imply by writing beneath them (Docker's MkdirAll): written at the end
        # if nothing else in the output makes them exist (their contents were all removed later), named
        # from the entries beneath them (implied_sources).
        self.implied: set[bytes] = set()
        self.implied_sources: list[str] = []

    # -- visibility -------------------------------------------------------------------------

    def _hidden(self, keys: list[bytes]) -> bool:
        """Is an entry (whose :func:`path_keys` are *keys*) of the layer being read hidden by a newer layer?"""
        own = keys[-1]
        if own in self.explicit or own in self.whiteouts or _ROOT in self.opaque:
            return True
        return any(self._hides_below(key) for key in keys[:-1])

    def _hides_below(self, key: bytes) -> bool:
        return key in self.whiteouts or key in self.opaque or self.explicit.get(key) == NONDIR

    # -- the pass ---------------------------------------------------------------------------

    def run(self, layers: Sequence[LayerInput]) -> FlatTree:
        for layer in reversed(layers):
            self._layer(layer)
        for target, links in self.pending.items():
            raise LayerError(f"{links[0].layer}: hard link {links[0].info.name!r} points to {target!r}, "
                             "which no layer provides")
        self._write_implied()
        return self.tree

    def _write_implied(self) -> None:
        """The implied directories nothing else in the output makes exist, shallowest first."""
        for source in self.implied_sources:
            parts = source.split("/")
            keys = path_keys(source)
            for i, key in enumerate(keys[:-1]):
                path = "/".join(parts[:i + 1])
                if key not in self.implied or self.tree.kinds.has(path, key):
                    continue
                info = tarfile.TarInfo(path)
                info.type, info.mode, info.uname, info.gname = tarfile.DIRTYPE, 0o755, "", ""
                self._add(info, None)
                self.tree.kinds.put(path, DIR, keys[:i + 1])
                self.tree.dirs[path] = info

    def _members(self, stream: BinaryIO, what: str, *, count: bool = True
                 ) -> Iterator[tuple[tarfile.TarInfo, TarReader]]:
        return read_members(cast(BinaryIO, _Counting(stream, self._counted if count else self._recounted)), what)

    def _counted(self, n: int) -> None:
        self.read_bytes += n
        if self.on_bytes is not None:
            self.on_bytes(n)

    def _recounted(self, n: int) -> None:
        self.read_bytes += n  # a second read costs like the first: it earns its sparse files' holes too

    def _content(self, tar: TarReader, member: tarfile.TarInfo, what: str, path: str) -> IO[bytes] | None:
        """The data of a regular file; a sparse file's holes are spent from the budget (SPARSE_SLACK, and a
        quarter of the layer bytes read so far): the disk is sized from the layers, and holes take disk, time
        and output that the layer does not."""
        if not member.isreg():
            return None
        if isinstance(member, Entry) and member.runs is not None:
            holes = member.size - member.stored
            budget = self.read_bytes // 4 + SPARSE_SLACK - self.holes
            if holes > budget:
                raise LayerError(f"{what}: the sparse file {path!r} has {holes} bytes of holes; imgconv expands "
                                 f"holes up to a quarter of the layer bytes read before them plus "
                                 f"{SPARSE_SLACK >> 20} MiB ({budget} bytes left)")
            self.holes += holes
        return cast(IO[bytes], _Content(tar.extractfile(member), member.size, what, path))

    def _layer(self, layer: LayerInput) -> None:
        self.index += 1
        self.names.append(layer.what)
        state = _Layer(layer.what)
        with layer.open() as opened:
            stream = opened if self.tap is None else self.tap.layer(layer.what, opened)
            try:
                for ordinal, (member, tar) in enumerate(self._members(stream, layer.what)):
                    self._entry(state, member, tar, ordinal)
                if self.tap is not None:
                    self.tap.end()
            except (tarfile.TarError, EOFError) as exc:
                raise LayerError(f"{layer.what}: malformed tar: {exc}") from exc
        self._resolve_pending(state)
        if state.waiting:
            self._reread_for_links(layer, state)
        self._merge(state)

    def _entry(self, state: _Layer, member: tarfile.TarInfo, tar: TarReader, ordinal: int) -> None:
        what = state.what
        path = normalize_name(member.name, what)
        if not path:
            return  # the root directory itself
        dirs = path.split("/")[:-1]
        if dirs and dirs[0].startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            return  # inside AUFS bookkeeping (`.wh..wh.plnk/...`): skipped, as Docker does
        if any(part.startswith(WHITEOUT_PREFIX) for part in dirs):
            raise LayerError(f"{what}: {path!r} is beneath a whiteout; a whiteout is a marker, not a directory")
        marker = whiteout_of(path)
        keys = path_keys(path)
        self._check_layer(state, member, path, keys, marker is not None)
        if marker is not None:
            kind, target = marker
            if kind == "opaque":
                state.opaque.add(path_key(target))
            elif kind == "whiteout":
                if target.rsplit("/", 1)[-1] in (".", ".."):
                    raise LayerError(f"{what}: whiteout {path!r} names '.' or '..' and could escape the root")
                state.whiteouts.add(path_key(target))
            return
        kind = _kind(member)
        if kind == NONDIR:
            self._check_older(state, member, path, keys)
            state.whiteouts.add(keys[-1])  # whatever older layers have at or beneath path is gone
        if member.islnk():
            self._hardlink(state, member, path, keys)
            return
        state.inodes[path] = _DIR_INODE if kind == DIR else ordinal
        kept = not self._hidden(keys)
        if kind == NONDIR:
            state.holders[ordinal] = (path, kept)
            if member.issym():
                state.symlink_of[ordinal] = member.linkname
        if kept:
            self._write(state, member, path, tar)

    def _check_layer(self, state: _Layer, member: tarfile.TarInfo, path: str, keys: list[bytes],
                     marker: bool) -> None:
        """Refuse a layer that contradicts itself (its entries must describe one tree)."""
        for i, key in enumerate(keys[:-1]):
            if state.kind_at.get(key) == NONDIR:
                parent = "/".join(path.split("/")[:i + 1])
                if parent in state.symlinks:
                    raise LayerError(f"{state.what}: {path!r} is beneath the symlink {parent!r}; "
                                     "imgconv refuses paths that go through symlinks")
                raise LayerError(f"{state.what}: {path!r} is beneath {parent!r}, which the same layer has as a file")
        if marker:
            state.marked.update(keys[:-1])
            return
        kind = _kind(member)
        previous = state.kinds.get(path)
        if previous is not None and previous != kind:
            raise LayerError(f"{state.what}: {path!r} appears twice in the layer with different types")
        if kind == NONDIR and (keys[-1] in state.beneath or keys[-1] in state.marked):
            raise LayerError(f"{state.what}: {path!r} appears as a directory and as a "
                             f"{'symlink' if member.issym() else 'file'} in the same layer")
        state.kinds[path] = kind
        state.kind_at[keys[-1]] = kind
        if member.issym():
            state.symlinks.add(path)
        else:
            state.symlinks.discard(path)
        if len(keys) > 1:
            state.beneath.update(keys[:-1])
            state.sources.append(path)

    def _check_older(self, state: _Layer, member: tarfile.TarInfo, path: str, keys: list[bytes]) -> None:
        """Refuse a non-directory that a newer layer wrote beneath (through a symlink, or into a file), unless a
        layer between them replaced or removed it."""
        writer = self.beneath.get(keys[-1])
        if writer is None:
            return
        newer = self.names[writer]
        last = max([self.settled.get(keys[-1], -1), self.cleared.get(_ROOT, -1),
                    *(self.cleared.get(key, -1) for key in keys[:-1])])
        if last > writer:
            return
        if member.issym():
            raise LayerError(f"{newer} writes beneath {path!r}, which is a symlink in {state.what}; "
                             "imgconv refuses paths that go through symlinks")
        raise LayerError(f"{newer} writes beneath {path!r}, which is not a directory in {state.what}")

    def _keep(self, state: _Layer, path: str, kind: str) -> None:
        """Book-keeping for an entry about to be written under *path*."""
        state.written[path] = kind
        state.linked_at.pop(path, None)  # whatever link this path held in the output, the entry replaces it
        superseded = state.deferred.pop(path, None)
        if superseded is not None:
            superseded.cancelled = True  # an earlier link of this layer at path: this entry replaces it

    def _write(self, state: _Layer, member: tarfile.TarInfo, path: str, tar: TarReader) -> None:
        check_header(member, path, state.what)
        info = clean_header(member, path)
        self._keep(state, path, _kind(member))
        if member.issym():
            self.tree.symlinks[path] = member.linkname
        else:
            self.tree.symlinks.pop(path, None)
        if member.isdir():
            self.tree.dirs[path] = info
        else:
            self.tree.dirs.pop(path, None)
        if self.tap is not None and member.isreg():
            self.tap.kept(member, path)
        self._add(info, self._content(tar, member, state.what, path))

    def _add(self, info: tarfile.TarInfo, data: IO[bytes] | None) -> None:
        self.out.addfile(info, data)
        self.tree.entries += 1
        if info.type == tarfile.REGTYPE:
            self.tree.content_bytes += info.size

    # -- hard links --------------------------------------------------------------------------

    def _hardlink(self, state: _Layer, member: tarfile.TarInfo, path: str, keys: list[bytes]) -> None:
        target = normalize_name(member.linkname, state.what, link=True)
        if not target or target == path:
            raise LayerError(f"{state.what}: hard link {path!r} has an invalid target {member.linkname!r}")
        inode = state.inodes.get(target, target)  # not yet in this layer: the older layers' file
        if inode == _DIR_INODE:
            raise LayerError(f"{state.what}: hard link {path!r} points to {target!r}, which is a directory")
        held = self._holds(state, path, inode)  # before this link: does *path* hold the inode already?
        state.inodes[path] = inode
        if self._hidden(keys):
            if isinstance(inode, str):  # not written, but a link to nothing is still a broken layer
                state.older.setdefault(inode, []).append(_Pending(tarfile.TarInfo(path), state.what, cancelled=True))
            return
        check_header(member, path, state.what)
        info = clean_header(member, path)
        info.type = tarfile.LNKTYPE
        self._keep(state, path, NONDIR)
        self.tree.symlinks.pop(path, None)
        self.tree.dirs.pop(path, None)
        pending = _Pending(info, state.what)
        if not self._link(state, pending, inode, state.older, held=held):
            state.deferred[path] = pending

    @staticmethod
    def _holds(state: _Layer, path: str, inode: _Inode) -> bool:
        """Does *path* hold *inode* in the output: its writer's entry, or a link to it, not replaced since?"""
        if isinstance(inode, str) or state.inodes.get(path) != inode:
            return False
        holder, kept = state.holders[inode]
        return (kept and holder == path) or state.linked_at.get(path) == inode

    def _link(self, state: _Layer, link: _Pending, inode: _Inode, older: dict[str, list[_Pending]],
              *, held: bool = False) -> bool:
        """Write *link* to *inode* now if a path of the output holds it; else queue it. True if written.

        *held*: the link's own path already holds the inode (a link to itself would break tar -x).
        """
        if isinstance(inode, str):
            older.setdefault(inode, []).append(link)  # even if cancelled: its target must still exist
            return False
        if link.cancelled:
            return True
        target = None if held else self._live_holder(state, inode, link.info.name)
        if target is None and not held:
            state.waiting.setdefault(inode, []).append(link)
            return False
        if inode in state.symlink_of:  # a hard link to a symlink is that symlink
            self.tree.symlinks[link.info.name] = state.symlink_of[inode]
        if target is not None:
            link.info.linkname = target
            self._add(link.info, None)
            state.linked.setdefault(inode, deque()).append(link.info.name)
        state.linked_at[link.info.name] = inode  # (held: _keep forgot it, but the output still has it there)
        return True

    def _live_holder(self, state: _Layer, inode: int, path: str) -> str | None:
        """A path of the output, other than *path*, that holds *inode*: its writer, else a link written to it.
        Links replaced since are dropped as they are met, so a hostile layer cannot make this quadratic."""
        holder = state.holders[inode][0]
        if holder != path and self._holds(state, holder, inode):
            return holder
        links = state.linked.get(inode)
        while links and (links[0] == path or not self._holds(state, links[0], inode)):
            links.popleft()
        return links[0] if links else None

    def _resolve_pending(self, state: _Layer) -> None:
        """Links of newer layers to paths this layer may provide: written now, or queued further down."""
        carried: dict[str, list[_Pending]] = {}
        for target, links in self.pending.items():
            inode = state.inodes.get(target)
            if inode is None:
                keys = path_keys(target)
                gone = (keys[-1] in state.whiteouts or keys[-1] in state.beneath or _ROOT in state.opaque
                        or any(k in state.whiteouts or k in state.opaque for k in keys[:-1]))
                if gone:
                    kind = "a directory" if keys[-1] in state.beneath else "removed"
                    raise LayerError(f"{links[0].layer}: hard link {links[0].info.name!r} points to {target!r}, "
                                     f"which is {kind} in {state.what}")
                carried.setdefault(target, []).extend(links)
                continue
            for link in links:
                if inode == _DIR_INODE:
                    raise LayerError(f"{link.layer}: hard link {link.info.name!r} points to {target!r}, "
                                     f"which is a directory in {state.what}")
                self._link(state, link, inode, carried)
        for target, links in state.older.items():
            carried.setdefault(target, []).extend(links)
        self.pending = carried

    def _emit_copies(self, links: list[_Pending], target: tarfile.TarInfo, data: IO[bytes] | None) -> None:
        """The first link becomes a copy of *target*'s entry (its inode); the rest link to it."""
        live = [link for link in links if not link.cancelled]
        if not live:
            return
        first = live[0].info
        check_header(target, first.name, live[0].layer)
        self._add(clean_header(target, first.name), data)
        if target.issym():
            self.tree.symlinks[first.name] = target.linkname
        for link in live[1:]:
            link.info.linkname = first.name
            if target.issym():
                self.tree.symlinks[link.info.name] = target.linkname
            self._add(link.info, None)

    def _reread_for_links(self, layer: LayerInput, state: _Layer) -> None:
        with layer.open() as stream:
            for ordinal, (member, tar) in enumerate(self._members(stream, layer.what, count=False)):
                links = state.waiting.pop(ordinal, None)
                if links:
                    path = normalize_name(member.name, layer.what)
                    self._emit_copies(links, member, self._content(tar, member, layer.what, path))
                if not state.waiting:
                    break
        if state.waiting:
            raise LayerError(f"{layer.what}: changed between two reads")

    # -- end of a layer ------------------------------------------------------------------------

    def _merge(self, state: _Layer) -> None:
        for path, kind in state.written.items():
            keys = path_keys(path)  # (computed again: keeping each entry's keys would cost more than this)
            self.explicit[keys[-1]] = kind
            self.tree.kinds.put(path, kind, keys)
        self._imply(state)
        for key in [*state.kind_at, *state.whiteouts]:
            self.settled[key] = self.index
        for key in state.whiteouts | state.opaque:
            self.cleared[key] = self.index
        self.whiteouts |= state.whiteouts
        self.opaque |= state.opaque

    def _imply(self, state: _Layer) -> None:
        """What the layer's entries say of their ancestors. An ancestor without an entry of its own that no newer
        layer hides is an implied directory; one the layer itself does not settle (an entry there, or a whiteout
        there or above) must be a directory in older layers (self.beneath). Both are decided along each path from
        the root down, in one pass (O(n) for n components)."""
        for source in state.sources:
            blocked = _ROOT in self.opaque
            cleared = _ROOT in state.opaque
            found = False
            for key in path_keys(source)[:-1]:
                hidden = blocked or key in self.explicit or key in self.whiteouts
                if not hidden and key not in state.kind_at and key not in self.implied:
                    self.implied.add(key)
                    found = True
                if not (cleared or key in state.kind_at or key in state.whiteouts):
                    self.beneath[key] = self.index
                blocked = blocked or self._hides_below(key)
                cleared = cleared or key in state.whiteouts or key in state.opaque
            if found:
                self.implied_sources.append(source)


class _Content(io.RawIOBase):
    """A member's data as the sink reads it: a short or failing read is the layer's fault, said so."""

    def __init__(self, data: IO[bytes], size: int, what: str, path: str) -> None:
        super().__init__()
        self.data, self.remaining, self.what, self.path = data, size, what, path

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        wanted = self.remaining if size is None or size < 0 else min(size, self.remaining)
        try:
            chunk = self.data.read(wanted)
        except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
            raise LayerError(f"{self.what}: cannot read {self.path!r}: {exc}") from exc
        if len(chunk) < wanted:
            raise LayerError(f"{self.what}: the layer ends in the middle of {self.path!r}")
        self.remaining -= len(chunk)
        return chunk

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        chunk = self.read(len(buffer))
        memoryview(buffer)[: len(chunk)] = chunk
        return len(chunk)


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
            on_bytes: Callable[[int], None] | None = None, tap: LayerTap | None = None) -> FlatTree:
    """Write the final root filesystem of *layers* (oldest first) into *out*; return what it holds.

    *out* stays open so the caller can add its own entries before closing it.
    """
    return Flattener(out, on_bytes, tap).run(layers)
