"""Compare file trees given as tar streams: an image's layers flattened by us, a `docker export`, a VM's disk.

`tree_from_tar` reads a tar into {normalized path: Entry}; `diff_trees` lists the differences, one readable
line each. Hardlinks are compared by content like regular files (which name of a pair a tool writes first is
its own business); `hardlinks=True` also compares who is linked with whom.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import posixpath
import tarfile
import urllib.parse
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import IO, Literal

EntryType = Literal["file", "dir", "symlink", "char", "block", "fifo"]

# What `docker create` + `docker export` add to a container's filesystem that is not in the image: checked
# against a real export in tests/integration/test_world.py. A WorkingDir missing from the image is created
# too (with its parents), and an image without /etc gets one: those depend on the image, so they are not here.
docker_runtime_paths: frozenset[str] = frozenset({
    ".dockerenv",
    "dev", "dev/console", "dev/pts", "dev/shm",
    "etc/hostname", "etc/hosts", "etc/mtab", "etc/resolv.conf",
    "proc", "sys",
})

COMPARED_FIELDS = ("type", "mode", "uid", "gid", "size", "sha256", "linkname", "devmajor", "devminor", "xattrs")


@dataclass(frozen=True)
class Entry:
    """One path of a tree. A hardlink is a "file" with its target's content; `hardlink` says to what."""

    type: EntryType
    mode: int  # permission bits with setuid/setgid/sticky (mode & 0o7777)
    uid: int
    gid: int
    size: int | None = None  # regular files only
    sha256: str | None = None  # regular files only
    linkname: str | None = None  # symlinks only: the target as written
    hardlink: str | None = None  # the normalized path this entry was a hardlink to in the tar
    devmajor: int | None = None
    devminor: int | None = None
    xattrs: tuple[tuple[str, bytes], ...] = ()  # sorted (name, value)


def normalize(path: str) -> str:
    """'./a//b/' -> 'a/b'; the root itself is ''."""
    path = path.lstrip("/")
    while path.startswith("./"):
        path = path[2:].lstrip("/")
    path = posixpath.normpath(path) if path not in ("", ".") else ""
    return "" if path == "." else path


_TYPES: dict[bytes, EntryType] = {
    tarfile.REGTYPE: "file", tarfile.AREGTYPE: "file", tarfile.CONTTYPE: "file",
    tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink",
    tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo",
}


def _xattrs(info: tarfile.TarInfo) -> tuple[tuple[str, bytes], ...]:
    found: dict[str, bytes] = {}
    for key, value in info.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            found[key.removeprefix("SCHILY.xattr.")] = value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote(key.removeprefix("LIBARCHIVE.xattr."))
            found[name] = base64.b64decode(value + "=" * (-len(value) % 4))
    return tuple(sorted(found.items()))


def _digest(fileobj: IO[bytes] | None) -> str:
    digest = hashlib.sha256()
    if fileobj is not None:
        for chunk in iter(lambda: fileobj.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tree_from_tar(source: str | Path | IO[bytes], *, keep_root: bool = False) -> dict[str, Entry]:
    """Read a tar (path or binary file object, compressed or not, read as a stream) into a tree.

    A later entry for the same path replaces the earlier one. The root directory ("./") is left out unless
    `keep_root` (key ""). Whiteout files are kept as they are: this reads a tar, it does not apply a layer.
    """
    tree: dict[str, Entry] = {}
    opened = (tarfile.open(source, mode="r|*") if isinstance(source, str | Path)
              else tarfile.open(fileobj=source, mode="r|*"))
    with opened as tar:
        for info in tar:
            path = normalize(info.name)
            if path == "" and not keep_root:
                continue
            mode, uid, gid, xattrs = info.mode & 0o7777, info.uid, info.gid, _xattrs(info)
            if info.islnk():
                target = normalize(info.linkname)
                linked = tree.get(target)
                if linked is None or linked.type != "file":
                    raise ValueError(f"{path}: hardlink to {target!r}, which is not a file earlier in the tar")
                tree[path] = Entry("file", mode, uid, gid, linked.size, linked.sha256,
                                   hardlink=linked.hardlink or target, xattrs=xattrs)
                continue
            kind = _TYPES.get(info.type)
            if kind is None:
                raise ValueError(f"{path}: unsupported tar entry type {info.type!r}")
            if kind == "file":
                tree[path] = Entry(kind, mode, uid, gid, info.size, _digest(tar.extractfile(info)), xattrs=xattrs)
            elif kind == "symlink":
                tree[path] = Entry(kind, mode, uid, gid, linkname=info.linkname, xattrs=xattrs)
            elif kind in ("char", "block"):
                tree[path] = Entry(kind, mode, uid, gid, devmajor=info.devmajor, devminor=info.devminor,
                                   xattrs=xattrs)
            else:
                tree[path] = Entry(kind, mode, uid, gid, xattrs=xattrs)
    return tree


def hardlink_groups(tree: Mapping[str, Entry]) -> dict[str, tuple[str, ...]]:
    """path -> every path sharing its inode (sorted), for the paths that have a hardlink partner."""
    groups: dict[str, list[str]] = {}
    for path, entry in tree.items():
        if entry.hardlink is not None:
            groups.setdefault(entry.hardlink, [entry.hardlink]).append(path)
    return {path: tuple(sorted(members)) for members in groups.values() for path in members}


def _ignored(path: str, patterns: Collection[str]) -> bool:
    """A pattern (fnmatch) ignores the paths it matches and everything under them."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatchcase(prefix, pattern) for pattern in patterns for prefix in prefixes)


def _show(field: str, value: object) -> str:
    if field == "mode" and isinstance(value, int):
        return f"{value:04o}"
    if field == "sha256" and isinstance(value, str):
        return value[:12]
    return repr(value)


def diff_trees(a: Mapping[str, Entry], b: Mapping[str, Entry], ignore: Iterable[str] = (), *,
               ignore_fields: Iterable[str] = (), hardlinks: bool = False) -> list[str]:
    """One line per difference, sorted by path: 'only in a: p', 'only in b: p', 'p: field a=.. b=..'.

    `ignore`: path patterns (fnmatch, matched against normalized paths and each of their parents) left out
    on both sides, e.g. `docker_runtime_paths`. `ignore_fields`: Entry fields not compared (e.g. "xattrs"
    against a tool that drops them, "uid"/"gid" against an unprivileged extraction).
    """
    patterns = [normalize(p) for p in ignore]
    skip = set(ignore_fields)
    unknown = skip - set(COMPARED_FIELDS)
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}: choose from {COMPARED_FIELDS}")
    compared = [f.name for f in fields(Entry) if f.name in COMPARED_FIELDS and f.name not in skip]
    groups_a = hardlink_groups(a) if hardlinks else {}
    groups_b = hardlink_groups(b) if hardlinks else {}
    lines: list[str] = []
    for path in sorted(set(a) | set(b)):
        if _ignored(path, patterns):
            continue
        left, right = a.get(path), b.get(path)
        if right is None:
            lines.append(f"only in a: {path}")
            continue
        if left is None:
            lines.append(f"only in b: {path}")
            continue
        for name in compared:
            x, y = getattr(left, name), getattr(right, name)
            if x != y:
                lines.append(f"{path}: {name} a={_show(name, x)} b={_show(name, y)}")
        if hardlinks and groups_a.get(path, (path,)) != groups_b.get(path, (path,)):
            lines.append(f"{path}: hardlinked with a={groups_a.get(path, ())} b={groups_b.get(path, ())}")
    return lines
