"""Flattening in memory, and reading the result back strictly: layers (oldest first) go through
converter.oci.flatten into one tar, which `extract` applies like `tar -x` into an empty directory would, refusing
anything an extractor would trip over. Kept apart from tests/treecmp.py on purpose: it must read flatten's output
strictly, not normalise it.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from converter.oci.flatten import FlatTree, LayerInput, flatten
from converter.oci.tarutil import open_output


def inputs(layers: Sequence[bytes]) -> list[LayerInput]:
    def opener(data: bytes) -> Any:
        @contextmanager
        def open_() -> Iterator[BinaryIO]:
            yield io.BytesIO(data)

        return open_

    return [LayerInput(f"layer {i}", opener(data)) for i, data in enumerate(layers)]


def flatten_bytes(*layers: bytes) -> tuple[bytes, FlatTree]:
    """Flatten *layers* (oldest first) into one tar; returns its bytes and flatten's summary."""
    out = io.BytesIO()
    tar = open_output(out)
    try:
        tree = flatten(inputs(layers), tar)
    finally:
        tar.close()  # also on failure, so that nothing is flushed into a closed buffer later
    return out.getvalue(), tree


@dataclass
class Node:
    """One path of an extracted tree. Hard links share an inode number (and so their content)."""

    kind: str  # file dir symlink char block fifo
    mode: int | None = None  # None: a directory nobody wrote (created as a parent)
    uid: int = 0
    gid: int = 0
    content: bytes | None = None
    linkname: str = ""
    device: tuple[int, int] = (0, 0)
    xattrs: dict[str, str] = field(default_factory=dict)
    inode: int = 0
    info: tarfile.TarInfo | None = None

    @property
    def implicit(self) -> bool:
        return self.kind == "dir" and self.mode is None


_KINDS = {tarfile.REGTYPE: "file", tarfile.AREGTYPE: "file", tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink",
          tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo"}


class NotExtractable(AssertionError):
    """flatten's output is not a tar an extractor can apply without surprises."""


def extract(data: bytes) -> tuple[dict[str, Node], list[tarfile.TarInfo]]:
    """Apply a flattened tar like `tar -x` into an empty directory, strictly.

    Returns {path: Node} (implicit parents included) and the raw headers in order. Raises NotExtractable for
    anything an extractor would trip over: a name that is not normalised, a write beneath a non-directory, a
    type change over an existing path, a hard link to nothing.
    """
    tree: dict[str, Node] = {}
    headers: list[tarfile.TarInfo] = []
    next_inode = iter(range(1, 1 << 30))
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for info in tar:
            headers.append(info)
            path = info.name
            if not path or path.startswith(("/", "./")) or "//" in path or path.endswith("/") or any(
                    part in (".", "..") for part in path.split("/")):
                raise NotExtractable(f"name not normalised: {path!r}")
            parts = path.split("/")
            for i in range(1, len(parts)):
                parent = "/".join(parts[:i])
                existing = tree.get(parent)
                if existing is None:
                    tree[parent] = Node("dir")
                elif existing.kind != "dir":
                    raise NotExtractable(f"{path!r} is written beneath the {existing.kind} {parent!r}")
            previous = tree.get(path)
            xattrs = {k: v for k, v in info.pax_headers.items() if k.startswith("SCHILY.xattr.")}
            if info.islnk():
                target = tree.get(info.linkname)
                if target is None or target.kind == "dir":
                    raise NotExtractable(f"hard link {path!r} -> {info.linkname!r}: no such file yet")
                node = Node(target.kind, target.mode, target.uid, target.gid, target.content, target.linkname,
                            target.device, target.xattrs, target.inode, info)
            else:
                kind = _KINDS.get(info.type)
                if kind is None:
                    raise NotExtractable(f"{path!r} has unexpected type {info.type!r}")
                content = tar.extractfile(info).read() if kind == "file" else None  # type: ignore[union-attr]
                node = Node(kind, info.mode, info.uid, info.gid, content, info.linkname if kind == "symlink" else "",
                            (info.devmajor, info.devminor) if kind in ("char", "block") else (0, 0), xattrs,
                            next(next_inode), info)
            if previous is not None and (previous.kind == "dir") != (node.kind == "dir"):
                raise NotExtractable(f"{path!r} changes type from {previous.kind} to {node.kind}")
            if previous is not None and previous.kind == "dir":
                # A directory entry over an existing directory only sets its metadata.
                node.inode = previous.inode
            tree[path] = node
    return tree, headers


def flat(*layers: bytes) -> dict[str, Node]:
    """The extracted final tree of *layers*, oldest first."""
    tree, _ = extract(flatten_bytes(*layers)[0])
    return tree


def summary(tree: Mapping[str, Node]) -> dict[str, Any]:
    """path -> a short comparable description (content for files, target for symlinks, "dir" for dirs)."""
    out: dict[str, Any] = {}
    for path, node in tree.items():
        if node.kind == "file":
            out[path] = node.content
        elif node.kind == "symlink":
            out[path] = ("->", node.linkname)
        else:
            out[path] = node.kind
    return out


def link_groups(tree: Mapping[str, Node]) -> set[frozenset[str]]:
    """Sets of paths sharing one inode (only the groups of two or more)."""
    groups: dict[int, set[str]] = {}
    for path, node in tree.items():
        if node.kind != "dir":
            groups.setdefault(node.inode, set()).add(path)
    return {frozenset(g) for g in groups.values() if len(g) > 1}
