"""What a file tree holds, path by path, without its contents: for diffing a disk against an image.

A :class:`Signature` is everything `vm-to-oci --base` compares: type, mode, owners, size, content
hash, link target, device numbers and xattrs. Modification times are deliberately left out: a
file whose bytes and metadata are unchanged is unchanged, whatever its clock says.
"""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from converter.oci.flatten import flatten
from converter.oci.image import Image


@dataclass(frozen=True)
class Signature:
    type: bytes
    mode: int
    uid: int
    gid: int
    size: int
    sha256: str
    linkname: str
    device: tuple[int, int]
    xattrs: tuple[tuple[str, str], ...]


def kind_of(info: tarfile.TarInfo) -> bytes:
    if info.isreg():
        return tarfile.REGTYPE
    return info.type


def signature(info: tarfile.TarInfo, content_hash: str = "") -> Signature:
    xattrs = tuple(sorted((k, v) for k, v in info.pax_headers.items() if k.startswith("SCHILY.xattr.")))
    device = (info.devmajor, info.devminor) if info.ischr() or info.isblk() else (0, 0)
    return Signature(kind_of(info), info.mode & 0o7777, info.uid, info.gid, info.size if info.isreg() else 0,
                     content_hash, info.linkname if info.issym() else "", device, xattrs)


def read_upto(data: IO[bytes] | None, size: int) -> Iterator[bytes]:
    """The next *size* bytes of *data* (fewer if it ends first), in chunks of bounded size."""
    remaining = size
    while data is not None and remaining > 0:
        chunk = data.read(min(remaining, 1 << 20))
        if not chunk:
            return
        remaining -= len(chunk)
        yield chunk


def hash_stream(data: IO[bytes] | None, size: int) -> str:
    digest = hashlib.sha256()
    for chunk in read_upto(data, size):
        digest.update(chunk)
    return digest.hexdigest()


class SignatureIndex:
    """A tar sink: records each entry's signature; a hard link gets its target's (same inode)."""

    def __init__(self) -> None:
        self.entries: dict[str, Signature] = {}

    def addfile(self, tarinfo: tarfile.TarInfo, fileobj: IO[bytes] | None = None) -> None:
        name = tarinfo.name.strip("/")
        if tarinfo.islnk():
            target = self.entries.get(tarinfo.linkname.strip("/"))
            if target is not None:
                self.entries[name] = target
            return
        content = hash_stream(fileobj, tarinfo.size) if tarinfo.isreg() else ""
        self.entries[name] = signature(tarinfo, content)


def index_image(image: Image) -> dict[str, Signature]:
    """The final tree of *image*, as signatures (its layers are read, verified, once)."""
    sink = SignatureIndex()
    flatten(image.layer_inputs(), sink)
    return sink.entries
