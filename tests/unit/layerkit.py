"""Builders for the foundation's unit tests: layer tars made in memory, flattened and read back like an
extractor would, and OCI image layouts written to a directory, good or deliberately broken.

Kept apart from tests/treecmp.py on purpose: these helpers must be able to write what no well-behaved tool
writes (raw headers, duplicate entries, hostile names) and to read flatten's output strictly.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from converter.oci.flatten import FlatTree, LayerInput, flatten
from converter.oci.tarutil import open_output

# -- layer entries --------------------------------------------------------------------------------------------

Spec = tuple[tarfile.TarInfo, bytes | None]


def _info(name: str, type_: bytes, mode: int, uid: int = 0, gid: int = 0, mtime: float = 1_600_000_000,
          pax: Mapping[str, str] | None = None, uname: str = "root", gname: str = "root") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = type_
    info.mode = mode
    info.uid, info.gid = uid, gid
    info.uname, info.gname = uname, gname
    info.mtime = mtime
    info.pax_headers = dict(pax or {})
    return info


def f(name: str, data: bytes | str = b"", mode: int = 0o644, **kw: Any) -> Spec:
    """A regular file."""
    body = data.encode() if isinstance(data, str) else data
    info = _info(name, tarfile.REGTYPE, mode, **kw)
    info.size = len(body)
    return info, body


def d(name: str, mode: int = 0o755, **kw: Any) -> Spec:
    return _info(name, tarfile.DIRTYPE, mode, **kw), None


def sym(name: str, target: str, **kw: Any) -> Spec:
    info = _info(name, tarfile.SYMTYPE, 0o777, **kw)
    info.linkname = target
    return info, None


def hl(name: str, target: str, mode: int = 0o644, **kw: Any) -> Spec:
    info = _info(name, tarfile.LNKTYPE, mode, **kw)
    info.linkname = target
    return info, None


def dev(name: str, kind: bytes = tarfile.CHRTYPE, major: int = 1, minor: int = 3, mode: int = 0o666) -> Spec:
    info = _info(name, kind, mode)
    info.devmajor, info.devminor = major, minor
    return info, None


def fifo(name: str, mode: int = 0o600) -> Spec:
    return _info(name, tarfile.FIFOTYPE, mode), None


def wh(path: str) -> Spec:
    """The whiteout that deletes *path* from lower layers."""
    head, _, base = path.rpartition("/")
    return f(f"{head}/.wh.{base}" if head else f".wh.{base}")


def opq(directory: str) -> Spec:
    """The marker that makes *directory* opaque."""
    return f(f"{directory}/.wh..wh..opq" if directory else ".wh..wh..opq")


def layer(*specs: Spec, format: int = tarfile.PAX_FORMAT) -> bytes:
    """A layer tar holding *specs* in exactly this order (duplicates and all)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=format) as tar:
        for info, data in specs:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def raw_header(name: bytes, type_: bytes = tarfile.REGTYPE, size: int = 0, linkname: bytes = b"",
               mode: int = 0o644) -> bytes:
    """A ustar header built by hand, for names tarfile would not write (NUL bytes, say)."""
    def octal(value: int, width: int) -> bytes:
        return f"{value:0{width - 1}o}".encode() + b"\0"

    block = bytearray(512)
    block[0:100] = name[:100].ljust(100, b"\0")
    block[100:108] = octal(mode, 8)
    block[108:116] = octal(0, 8)
    block[116:124] = octal(0, 8)
    block[124:136] = octal(size, 12)
    block[136:148] = octal(0, 12)
    block[148:156] = b" " * 8
    block[156:157] = type_
    block[157:257] = linkname[:100].ljust(100, b"\0")
    block[257:265] = b"ustar\x0000"
    checksum = sum(block)
    block[148:156] = f"{checksum:06o}".encode() + b"\0 "
    return bytes(block)


def pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


END = b"\0" * 1024


# -- flattening in memory -------------------------------------------------------------------------------------


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


# -- OCI image layouts ----------------------------------------------------------------------------------------

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def compress(data: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, mtime=0)
    if compression == "zstd":
        import zstandard

        return zstandard.ZstdCompressor().compress(data)
    return data


def config_json(diff_ids: Iterable[str], os_: str = "linux", arch: str = "amd64", **extra: Any) -> bytes:
    doc: dict[str, Any] = {"architecture": arch, "os": os_, "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
                           "config": {"Cmd": ["/bin/sh"]}}
    doc.update(extra)
    return json.dumps(doc).encode()


class Layout:
    """An OCI image layout under construction; every method writes straight to disk."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')

    def blob(self, data: bytes, media_type: str, **extra: Any) -> dict[str, Any]:
        digest = sha256(data)
        (self.root / "blobs" / "sha256" / digest.removeprefix("sha256:")).write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data), **extra}

    def blob_path(self, desc: Mapping[str, Any]) -> Path:
        return self.root / "blobs" / "sha256" / str(desc["digest"]).removeprefix("sha256:")

    def layer(self, tar: bytes, compression: str = "gzip", media_type: str | None = None) -> tuple[dict[str, Any], str]:
        """Store a layer; returns its descriptor and diff_id."""
        media_type = media_type or {"gzip": OCI_LAYER_GZIP, "zstd": OCI_LAYER_ZSTD, "none": OCI_LAYER}[compression]
        return self.blob(compress(tar, compression), media_type), sha256(tar)

    def manifest(self, layers: Sequence[bytes] = (), *, compression: str = "gzip", os_: str = "linux",
                 arch: str = "amd64", config: bytes | None = None, layer_type: str | None = None) -> dict[str, Any]:
        """Store config and manifest for *layers*; returns the manifest's descriptor (not yet in index.json)."""
        stored = [self.layer(t, compression, layer_type) for t in layers]
        config_bytes = config if config is not None else config_json([diff for _, diff in stored], os_, arch)
        config_desc = self.blob(config_bytes, OCI_CONFIG)
        doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config_desc,
               "layers": [desc for desc, _ in stored]}
        return self.blob(json.dumps(doc).encode(), OCI_MANIFEST)

    def index(self, *descs: Mapping[str, Any], raw: bytes | None = None) -> None:
        doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": list(descs)}
        (self.root / "index.json").write_bytes(raw if raw is not None else json.dumps(doc).encode())

    def image(self, layers: Sequence[bytes] = (), **kw: Any) -> dict[str, Any]:
        """One image, the only entry of index.json."""
        desc = self.manifest(layers, **kw)
        self.index(desc)
        return desc


def manifest_doc(layout: Layout, desc: Mapping[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(layout.blob_path(desc).read_bytes())
    return doc
