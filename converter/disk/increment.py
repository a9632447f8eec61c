"""Incremental rebuilds: a new version of a store tag made from an earlier version's disk, on the host.

When ``oci-to-qcow2 IMAGE store:NAME[:TAG]`` finds in the store a version built, with the same options, the same
imgconv and the same kernel, from an image whose layers are a prefix of IMAGE's, the conversion starts from that
version's disk instead of an empty one, and applies only what the new layers change. No appliance is started:
the changes are written into the ext4 filesystem by e2fsprogs' ``debugfs`` on the host, which reads and writes an
image file as any user may. That is what makes a rebuild after a one-layer change cost a fraction of a full
build, whose appliance alone takes seconds to boot under TCG.

What changes is worked out from the layers, never from the old disk's contents:

- the base's tree (the old layers flattened) and the final tree (all layers flattened: the same pass a full build
  makes, with the tar-split recorder, so the records under /.imgconv are a full build's) say what goes away: every
  path of the base that the final tree lacks or holds as another kind, removed with what is beneath it;
- the new layers flattened alone say what is written: their entries, contents, owners, modes, times and xattrs,
  hard links among them;
- a directory of the base that stays but whose header is no longer the base's (a new layer names it again, or an
  opaque marker or whiteout hid the base's entry) gets the final tree's attributes, and loses the base's xattrs.

Anything this cannot do as a full build would is not attempted: :class:`FullBuild` names why, and the conversion
builds in full (a new layer touching the kernel's files or imgconv's, a hard link into an older layer, names,
times or device numbers debugfs cannot be given, too little free space, another kernel or init than the base's).
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

from converter import __version__
from converter.errors import LayerError
from converter.guest import RESERVED
from converter.oci.flatten import DIR, NONDIR, FlatTree, flatten
from converter.oci.image import Image, LayerInput
from converter.oci.tarsplit import Recorder
from converter.oci.tarutil import parents
from converter.run import run
from converter.store.store import Store, Version

# A new layer that writes or removes these changes what the base chose as the kernel (or its modules): full build.
KERNEL_PATHS = re.compile(r"(boot|lib/modules|usr/lib/modules)(/.*)?|vmlinuz.*|initrd\.img.*")
# Free space kept beyond the new contents, for directories and metadata the new entries need.
SLACK_BLOCKS = 256
BLOCK = 4096


class FullBuild(Exception):
    """The incremental rebuild cannot give what a full build gives; the message says why."""


@dataclass(frozen=True)
class Base:
    """The store version a rebuild starts from, and how many of the new image's layers it already holds."""

    version: Version
    layers: int

    @property
    def sidecar(self) -> dict[str, Any]:
        return self.version.sidecar


def diff_ids(sidecar: dict[str, Any]) -> list[str]:
    """The diff_ids of the image a version was built from, as its sidecar (records.to_json) lists them."""
    layers = sidecar.get("layers", [])
    if not isinstance(layers, list):
        return []
    return [str(layer.get("diff_id", "")) for layer in layers if isinstance(layer, dict)]


def find_base(store: Store, image: Image, recorded_options: dict[str, Any]) -> tuple[str, int] | str:
    """The sha256 of the version with the longest strict prefix of *image*'s layers made with these options by
    this imgconv, and the prefix's length; or, when there is none, why (for the conversion's note)."""
    wanted = list(image.config.diff_ids)
    best: tuple[str, int] | None = None
    seen_prefix = False
    with store.locked(exclusive=False):
        shas = {entry.sha256 for tag in store.tags() for entry in tag.entries}
    for sha256 in sorted(shas):
        sidecar = store.sidecar(sha256)
        held = diff_ids(sidecar)
        if not held or len(held) >= len(wanted) or wanted[:len(held)] != held:
            continue
        seen_prefix = True
        if sidecar.get("imgconv") != __version__ or sidecar.get("options") != recorded_options:
            continue
        if sidecar.get("format") not in ("qcow2", "raw"):
            continue
        if best is None or len(held) > best[1]:
            best = (sha256, len(held))
    if best is not None:
        return best
    if seen_prefix:
        return "the versions built from the image's older layers were made with other options or another imgconv"
    return "no version in the store was built from the image's older layers"


# -- reading the base disk --------------------------------------------------------------------------------------


def guest_file(device: str, path: str, e2fs: str) -> bytes:
    """A file of the base's root filesystem (*device*: ``DISK?offset=N``), read with debugfs."""
    ran = run([e2fs, "-R", f'cat "/{path}"', device], purpose=f"read /{path} from the base version")
    if ran.stderr.strip() and not ran.stdout:
        raise FullBuild(f"the base version has no readable /{path}")
    return ran.stdout


def free_space(device: str, dumpe2fs: str) -> tuple[int, int]:
    """Free blocks and free inodes of the base's root filesystem."""
    out = run([dumpe2fs, "-h", device], purpose="read the base version's free space").stdout.decode(errors="replace")

    def number(name: str) -> int:
        found = re.search(rf"^{name}:\s+(\d+)", out, re.M)
        if found is None:
            raise FullBuild(f"dumpe2fs did not say the base's {name.lower()}")
        return int(found.group(1))

    return number("Free blocks"), number("Free inodes")


# -- what changes -----------------------------------------------------------------------------------------------


@dataclass
class NewEntry:
    """An entry of the new layers flattened alone, its contents (regular files) spooled to *data*."""

    info: tarfile.TarInfo
    data: Path | None = None


class Collect:
    """A flattener sink keeping the new layers' entries, contents spooled to files (the layers are small)."""

    def __init__(self, spool: Path) -> None:
        self.spool = spool
        spool.mkdir(parents=True, exist_ok=True)
        self.entries: list[NewEntry] = []
        self.content = 0

    def addfile(self, tarinfo: tarfile.TarInfo, fileobj: IO[bytes] | None = None) -> None:
        data = None
        if tarinfo.isreg() and fileobj is not None:
            data = self.spool / str(len(self.entries))
            with data.open("wb") as out:
                while chunk := fileobj.read(1 << 20):
                    out.write(chunk)
            self.content += tarinfo.size
        self.entries.append(NewEntry(tarinfo, data))


class _Discard:
    def addfile(self, tarinfo: tarfile.TarInfo, fileobj: IO[bytes] | None = None) -> None:
        pass


@dataclass
class Delta:
    """What the new layers change in the base's tree."""

    final: FlatTree
    base_dirs: set[str] = field(default_factory=set)  # the base's directories
    # Directories of the base that stay but whose header is no longer the base's (a new layer names them, or an
    # opaque marker or whiteout hid the base's header): their attributes set again, the base's xattrs that the
    # new header lacks (these names) removed.
    restamped: dict[str, list[str]] = field(default_factory=dict)
    removed: list[tuple[str, str]] = field(default_factory=list)  # (path, kind), deepest first
    written: list[NewEntry] = field(default_factory=list)
    content: int = 0


def delta(image: Image, base_layers: int, scratch: Path, injected: Iterable[str]) -> Delta:
    """The base's tree, the final tree (recording tar-split into scratch/tar-split as a full build does) and the
    new layers' own entries; FullBuild when the new layers do what this module does not."""
    layers: Sequence[LayerInput] = image.layer_inputs()
    base = flatten(layers[:base_layers], _Discard())
    final = flatten(layers, _Discard(), tap=Recorder(scratch / "tar-split"))
    collect = Collect(scratch / "increment")
    try:
        flatten(layers[base_layers:], collect)
    except LayerError as exc:
        raise FullBuild(f"a new layer refers to an older layer's file ({exc})") from exc
    written = {entry.info.name.strip("/") for entry in collect.entries}
    doomed: set[str] = set()
    restamped: dict[str, list[str]] = {}
    for path in base.kinds:
        kind = base.kinds[path]
        now = final.kinds.get(path)
        if now is None or now != kind or (kind == NONDIR and path in written):
            doomed.add(path)
        elif kind == DIR and _dir_attributes(base.dirs.get(path)) != _dir_attributes(final.dirs.get(path)):
            old, new = _dir_attributes(base.dirs.get(path))[4], _dir_attributes(final.dirs.get(path))[4]
            restamped[path] = sorted({name for name, _ in old} - {name for name, _ in new})
    removed = [(path, base.kinds[path]) for path in base.kinds
               if path in doomed or any(parent in doomed for parent in parents(path))]
    removed.sort(key=lambda item: item[0].count("/"), reverse=True)
    _check(removed, written, injected)
    base_dirs = {path for path in base.kinds if base.kinds[path] == DIR}
    return Delta(final, base_dirs, restamped, removed, collect.entries, collect.content)


def _dir_attributes(header: tarfile.TarInfo | None) -> tuple[int, int, int, str, tuple[tuple[str, str], ...]]:
    """What a directory's header gives it on a full build's disk; None: a directory no layer names (made 0755,
    root's, time 0)."""
    if header is None:
        return 0o755, 0, 0, "0", ()
    xattrs = tuple(sorted((key[len("SCHILY.xattr."):], value) for key, value in header.pax_headers.items()
                          if key.startswith("SCHILY.xattr.")))
    return header.mode & 0o7777, header.uid, header.gid, _exact_mtime(header), xattrs


def _check(removed: list[tuple[str, str]], written: set[str], injected: Iterable[str]) -> None:
    touched = [path for path, _ in removed] + sorted(written)
    kernel = next((path for path in touched if KERNEL_PATHS.fullmatch(path)), None)
    if kernel is not None:
        raise FullBuild(f"a new layer changes /{kernel}, where the kernel or its modules may live")
    ours = set(injected)
    for path in touched:
        if path in ours or path == RESERVED or path.startswith(f"{RESERVED}/") \
                or any(p in ours for p in parents(path)) or any(p.startswith(f"{path}/") for p in ours):
            raise FullBuild(f"a new layer changes /{path}, where imgconv placed files of its own")
    check_names(touched)


def check_names(paths: Iterable[str]) -> None:
    """FullBuild when a path cannot be given to debugfs (its command parser takes no escapes)."""
    bad = next((path for path in paths if not _safe_name(path)), None)
    if bad is not None:
        raise FullBuild(f"the path {bad!r} cannot be written by debugfs (a quote, control character or non-UTF-8)")


def _safe_name(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return not any(ch == '"' or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in path)


# -- the debugfs script -----------------------------------------------------------------------------------------


def _q(path: str) -> str:
    return f'"/{path}"' if path else '"/"'


def _exact_mtime(info: tarfile.TarInfo) -> str:
    """A header's time as a full build's tar stream gives it to GNU tar: the layer's own PAX text where the
    flattener kept it, else what tarfile writes for the value (a float's shortest repr, not its binary value)."""
    return info.pax_headers.get("mtime") or str(info.mtime)


def _time(target: str, name: str, value: str) -> list[str]:
    """Set a time given as decimal text, to the nanosecond as GNU tar reads it (further digits dropped); other
    spellings (exponents, signs, spaces) are left to a full build's GNU tar."""
    exact = Decimal(value) if re.fullmatch(r"\d+(\.\d*)?", value) else Decimal(-1)
    if not 0 <= exact < 1 << 32:
        raise FullBuild(f"a time of {target} ({value}) is outside what this rebuild sets")
    seconds = int(exact)
    nanos = int((exact - seconds) * 1_000_000_000)
    return [f"sif {target} {name}_extra {nanos << 2}", f"sif {target} {name} @{seconds}"]


def _attributes(target: str, info: tarfile.TarInfo, type_bits: int, spool: Path, n: int) -> list[str]:
    commands = [f"sif {target} mode 0{type_bits | (info.mode & 0o7777):o}", f"sif {target} uid {info.uid}",
                f"sif {target} gid {info.gid}", *_time(target, "mtime", _exact_mtime(info))]
    for i, (key, value) in enumerate(sorted(info.pax_headers.items())):
        if key.startswith("SCHILY.xattr."):
            name = key[len("SCHILY.xattr."):]
            if not _safe_name(name) or " " in name:
                raise FullBuild(f"the xattr name {name!r} cannot be given to debugfs")
            held = spool / f"xattr-{n}-{i}"
            held.write_bytes(value.encode("utf-8", "surrogateescape"))
            commands.append(f"ea_set -f {held} {target} {name}")
    return commands


TYPE_BITS = {tarfile.REGTYPE: 0o100000, tarfile.AREGTYPE: 0o100000, tarfile.CONTTYPE: 0o100000,
             tarfile.SYMTYPE: 0o120000, tarfile.FIFOTYPE: 0o010000, tarfile.CHRTYPE: 0o020000,
             tarfile.BLKTYPE: 0o060000, tarfile.DIRTYPE: 0o040000}


def script(change: Delta, spool: Path) -> Iterator[str]:
    """debugfs commands that turn the base's tree into the final one: removals deepest first, new directories
    shallowest first, then files, links, everyone's attributes, link counts and the touched directories' times.
    Made as they are written (a full build's script is some 8 lines per entry: never held whole in memory)."""
    for path, kind in change.removed:
        yield f"rmdir {_q(path)}" if kind == DIR else f"rm {_q(path)}"
    gone = {path for path, _ in change.removed}
    # Hard links last: a link may be shallower than its target (/bin/x -> /usr/lib/x), which must exist first.
    entries = sorted(change.written, key=lambda e: (e.info.islnk(), e.info.name.strip("/").count("/")))
    written_dirs = {e.info.name.strip("/") for e in entries if e.info.isdir()}
    links: dict[str, int] = {}
    touched_parents: set[str] = set(parent_of(path) for path in gone)
    created: set[str] = set()
    for entry in entries:
        path = entry.info.name.strip("/")
        touched_parents.add(parent_of(path))
        for ancestor in reversed(list(parents(path))):  # implicit parents (tar would make them): shallowest first
            if ancestor not in created and (ancestor in gone or ancestor not in change.base_dirs) \
                    and ancestor not in written_dirs:
                yield f"mkdir {_q(ancestor)}"
                yield from _implicit_dir(ancestor, change)
                created.add(ancestor)
        if entry.info.isdir():
            created.add(path)
        yield from _create(entry, path, path in gone or path not in change.base_dirs, links)
    yield from _settle_attributes(change, entries, written_dirs, links, touched_parents, spool)


def _create(entry: NewEntry, path: str, new_dir: bool, links: dict[str, int]) -> list[str]:
    """The commands that make *entry* at *path* (a directory only when *new_dir*: else it stays and only its
    attributes change); a hard link counts one more name for its target in *links*."""
    info, parent, name = entry.info, parent_of(path), path.rsplit("/", 1)[-1]
    if info.isdir():
        return [f"mkdir {_q(path)}"] if new_dir else []
    if info.isreg():
        if entry.data is None:
            raise FullBuild(f"/{path} came without its contents")
        return [f'write "{entry.data}" {_q(path)}']
    if info.issym():
        if not _safe_name(info.linkname):
            raise FullBuild(f"the symlink /{path} points to a name debugfs cannot be given")
        return [f'symlink {_q(path)} "{info.linkname}"']
    if info.ischr() or info.isblk() or info.isfifo():
        if not info.isfifo() and (info.devmajor > 4095 or info.devminor > 65535):  # debugfs' mknod refuses
            raise FullBuild(f"the device /{path} is {info.devmajor}:{info.devminor}, past what debugfs makes")
        kind = "p" if info.isfifo() else ("c" if info.ischr() else "b")
        numbers = "" if info.isfifo() else f" {info.devmajor} {info.devminor}"
        return [f"cd {_q(parent)}", f'mknod "{name}" {kind}{numbers}', "cd /"]
    if info.islnk():
        target = info.linkname.strip("/")
        links[target] = links.get(target, 1) + 1
        return [f"ln {_q(target)} {_q(path)}"]
    raise FullBuild(f"/{path} is of a kind this rebuild does not write")


def _settle_attributes(change: Delta, entries: list[NewEntry], written_dirs: set[str], links: dict[str, int],
                       touched_parents: set[str], spool: Path) -> Iterator[str]:
    """Owners, modes, times and xattrs of what was written and of the base's directories whose header changed;
    link counts; the times of the directories whose entries changed."""
    for n, entry in enumerate(entries):
        info, path = entry.info, entry.info.name.strip("/")
        if info.islnk():
            continue
        header = change.final.dirs.get(path, info) if info.isdir() else info
        yield from _attributes(_q(path), header, TYPE_BITS[info.type], spool, n)
    for target, count in sorted(links.items()):
        yield f"sif {_q(target)} links_count {count}"
    for n, (path, stale) in enumerate(sorted(change.restamped.items()), start=len(entries)):
        kept = change.final.dirs.get(path)
        if path not in written_dirs:
            yield from _implicit_dir(path, change) if kept is None else _attributes(
                _q(path), kept, TYPE_BITS[tarfile.DIRTYPE], spool, n)
        for name in stale:
            if not _safe_name(name) or " " in name:
                raise FullBuild(f"the xattr name {name!r} cannot be given to debugfs")
            yield f"ea_rm {_q(path)} {name}"
    for parent in sorted(touched_parents):
        kept = change.final.dirs.get(parent)
        if kept is not None and parent:
            yield from _time(_q(parent), "mtime", _exact_mtime(kept))


def _implicit_dir(path: str, change: Delta) -> list[str]:
    """A directory no layer has an entry for, made as GNU tar makes a missing parent (root's, 0755) and with the
    time the flattened tree gives it."""
    kept = change.final.dirs.get(path)
    mtime = _exact_mtime(kept) if kept is not None else "0"
    return [f"sif {_q(path)} mode 040755", f"sif {_q(path)} uid 0", f"sif {_q(path)} gid 0",
            *_time(_q(path), "mtime", mtime)]


def parent_of(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""
