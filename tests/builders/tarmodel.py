"""What a stack of layers means, computed without tarfile: the reference the fuzz compares flatten's output with.

An `Op` is one layer entry as meant (kind, normalised path, content, owner, mode, mtime, xattrs, device numbers,
link target); `model(layers)` applies layers oldest first and returns the final tree, or raises `Refused` where
flatten must refuse. The semantics are the ones converter/oci/flatten.py documents, and tests/unit/test_flatten.py's
smaller model checks (whiteouts and opaque markers apply to lower layers only; a hard link shares the node its
target held when the link was met, its own layer first, else the lower layers' as they were before this layer's
whiteouts; writing beneath an older non-directory is refused unless the layer has a directory there; a layer that
contradicts itself is refused). On top of that model this one carries what headers can get wrong: owners, modes,
mtimes, xattrs and device numbers, and entries whose header is invalid once written (`Op.invalid`).

`compare(model_tree, extracted)` lists the differences with tests/builders/flattening.py's strict `extract()`.
"""

from __future__ import annotations

import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tests.builders.flattening import Node, link_groups
from tests.builders.rawtar import Member

MTIME = 1_600_000_000
MARKERS = ("whiteout", "opaque")


class Refused(Exception):
    """The model's verdict: flatten must raise an ImgconvError."""


@dataclass(frozen=True)
class Op:
    kind: str  # file dir symlink link char block fifo whiteout opaque root
    path: str  # normalised ("a/b"); non-UTF-8 bytes as surrogate escapes, as tarfile decodes them
    content: bytes = b""
    target: str = ""  # a symlink's target as written; a hard link's target, normalised
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int | str = MTIME
    device: tuple[int, int] = (0, 0)
    xattrs: tuple[tuple[str, str], ...] = ()  # (name without SCHILY.xattr., value)
    runs: tuple[tuple[int, int], ...] | None = None  # write the file sparse with these data runs (same meaning)
    invalid: str = ""  # why this entry's header cannot be written out (flatten refuses it where it survives)

    def member(self) -> Member:
        """The entry as a tar member (see tests/builders/rawtar.py for how it can be spelled)."""
        name = _marker_name(self) if self.kind in MARKERS else self.path
        type_ = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
                 "link": tarfile.LNKTYPE, "char": tarfile.CHRTYPE, "block": tarfile.BLKTYPE,
                 "fifo": tarfile.FIFOTYPE, "root": tarfile.DIRTYPE}.get(self.kind, tarfile.REGTYPE)
        if self.kind == "root":
            name = "."
        pax = tuple((f"SCHILY.xattr.{k}".encode("utf-8", "surrogateescape"), v.encode("utf-8", "surrogateescape"))
                    for k, v in self.xattrs)
        return Member(name=name.encode("utf-8", "surrogateescape"), type=type_,
                      data=self.content if self.kind == "file" else b"", mode=self.mode, uid=self.uid, gid=self.gid,
                      mtime=self.mtime, linkname=self.target.encode("utf-8", "surrogateescape"),
                      devmajor=self.device[0], devminor=self.device[1], pax=pax,
                      runs=self.runs if self.kind == "file" else None)


def _marker_name(op: Op) -> str:
    if op.kind == "opaque":
        return f"{op.path}/.wh..wh..opq" if op.path else ".wh..wh..opq"
    head, _, base = op.path.rpartition("/")
    return f"{head}/.wh.{base}" if head else f".wh.{base}"


@dataclass(eq=False)
class MNode:
    """A path of the final tree: the op that made its inode (None for a directory nobody wrote)."""

    kind: str
    op: Op | None = None


def parents(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _remove(tree: dict[str, MNode], path: str, keep_self: bool = False) -> None:
    for p in [p for p in tree if (p == path and not keep_self) or p.startswith(path + "/") or path == ""]:
        del tree[p]


def _entry_name(op: Op) -> str:
    return _marker_name(op) if op.kind in MARKERS else op.path


def check_layer(ops: Sequence[Op]) -> None:
    """Refused if the layer contradicts itself: one path as a directory and a non-directory, or anything beneath a
    non-directory of the same layer (markers included)."""
    kinds: dict[str, str] = {}
    ancestors: set[str] = set()
    for op in ops:
        if op.kind == "root":
            continue
        name = _entry_name(op)
        if any(kinds.get(p) == "nondir" for p in parents(name)):
            raise Refused(f"{name} beneath a non-directory of its own layer")
        ancestors.update(parents(name))
        if op.kind in MARKERS:
            continue
        k = "dir" if op.kind == "dir" else "nondir"
        if kinds.get(op.path, k) != k or (k == "nondir" and op.path in ancestors):
            raise Refused(f"{op.path} is a directory and a non-directory in one layer")
        kinds[op.path] = k


def hidden(layers: Sequence[Sequence[Op]], index: int, path: str) -> bool:
    """Does a layer newer than *index* hide *path* (an entry there, a whiteout or non-directory at it or above, an
    opaque directory above)?"""
    for ops in layers[index + 1:]:
        for op in ops:
            if op.kind == "root":
                continue
            if op.kind == "opaque":
                if op.path == "" or path.startswith(op.path + "/"):
                    return True
            elif op.kind == "whiteout" or op.kind != "dir":
                if op.path == path or path.startswith(op.path + "/"):
                    return True
            elif op.path == path:
                return True
    return False


def model(layers: Sequence[Sequence[Op]]) -> dict[str, MNode]:
    """The final tree of *layers* (oldest first), or Refused."""
    tree: dict[str, MNode] = {}
    for index, ops in enumerate(layers):
        check_layer(ops)
        for op in ops:
            if op.invalid and op.kind not in (*MARKERS, "root") and not hidden(layers, index, op.path):
                raise Refused(f"{op.path}: {op.invalid}")
        lower = dict(tree)
        for op in ops:
            if op.kind == "whiteout":
                _remove(tree, op.path)
            elif op.kind == "opaque":
                _remove(tree, op.path, keep_self=True)
        for op in ops:
            if op.kind == "dir" and op.path in tree and tree[op.path].kind != "dir":
                _remove(tree, op.path)
        written: set[str] = set()
        for op in ops:
            if op.kind in (*MARKERS, "root"):
                continue
            for parent in parents(op.path):
                node = tree.get(parent)
                if node is None:
                    tree[parent] = MNode("dir")
                elif node.kind != "dir":
                    raise Refused(f"{op.path} is written beneath the older {node.kind} {parent}")
            if op.kind == "link":
                source = tree.get(op.target) if op.target in written else lower.get(op.target)
                if source is None or source.kind == "dir" or op.target == op.path:
                    raise Refused(f"hard link {op.path} to {op.target}: no such file")
                _remove(tree, op.path)
                tree[op.path] = source
            elif op.kind == "dir":
                node = tree.get(op.path)
                if node is not None:
                    node.op = op  # a directory over a directory sets its metadata
                else:
                    tree[op.path] = MNode("dir", op)
            else:
                _remove(tree, op.path)
                tree[op.path] = MNode(op.kind, op)
            written.add(op.path)
    for path, node in tree.items():
        if node.op is not None and node.op.invalid:
            raise Refused(f"{path}: {node.op.invalid}")
    return tree


def compare(expected: Mapping[str, MNode], tree: Mapping[str, Node]) -> list[str]:
    """Differences between the model's tree and an extracted one (tests/builders/flattening.py), one line each.

    A directory nobody wrote may come out implicit (created as a parent) or as an explicit root-owned 0755 entry
    (flatten writes those whose contents were all removed later); hard links are compared as groups; the mtime is
    compared where the entry that made the inode is the one extracted (a hard link's own header carries its own).
    """
    lines: list[str] = []
    for path in sorted(set(expected) | set(tree), key=repr):
        want, got = expected.get(path), tree.get(path)
        if want is None or got is None:
            lines.append(f"{path!r}: expected {want and want.kind}, got {got and got.kind}")
            continue
        if want.kind != got.kind:
            lines.append(f"{path!r}: expected a {want.kind}, got a {got.kind}")
            continue
        op = want.op
        if op is None:
            if not (got.implicit or (got.mode, got.uid, got.gid, got.xattrs) == (0o755, 0, 0, {})):
                lines.append(f"{path!r}: an implied directory came out {oct(got.mode or 0)} {got.uid}:{got.gid}")
            continue
        have: dict[str, Any] = {"mode": got.mode, "uid": got.uid, "gid": got.gid,
                                "xattrs": {k.removeprefix("SCHILY.xattr."): v for k, v in got.xattrs.items()}}
        meant: dict[str, Any] = {"mode": op.mode & 0o7777, "uid": op.uid, "gid": op.gid, "xattrs": dict(op.xattrs)}
        if want.kind == "file":
            have["content"], meant["content"] = got.content, op.content
        elif want.kind == "symlink":
            have["target"], meant["target"] = got.linkname, op.target
        elif want.kind in ("char", "block"):
            have["device"], meant["device"] = got.device, op.device
        if got.info is not None and not got.info.islnk():
            have["mtime"], meant["mtime"] = got.info.mtime, float(op.mtime)
        for key in meant:
            if have[key] != meant[key]:
                lines.append(f"{path!r}: {key} expected {meant[key]!r}, got {have[key]!r}")
    groups: dict[int, set[str]] = {}
    for path, node in expected.items():
        if node.kind != "dir":
            groups.setdefault(id(node), set()).add(path)
    want_groups = {frozenset(g) for g in groups.values() if len(g) > 1}
    got_groups = link_groups(tree)
    if want_groups != got_groups:
        lines.append(f"hard link groups: expected {sorted(map(sorted, want_groups))}, "
                     f"got {sorted(map(sorted, got_groups))}")
    return lines
