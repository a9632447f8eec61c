"""Layer tars from entries, in memory: regular files, directories, links, devices, whiteouts, and raw headers
for what tarfile would not write (NUL bytes in names, say). Everything is written in exactly the order given,
duplicates and all, so that tests can build what no well-behaved tool writes.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Mapping
from typing import Any

Spec = tuple[tarfile.TarInfo, bytes | None]

MTIME = 1_600_000_000


def entry(name: str, type_: bytes = tarfile.REGTYPE, data: bytes | str = b"", mode: int = 0o644, uid: int = 0,
          gid: int = 0, mtime: float = MTIME, *, uname: str = "root", gname: str = "root",
          pax: Mapping[str, str] | None = None, **fields: Any) -> Spec:
    """Any entry. A regular file carries *data* (its size set from it), other types carry none; *fields* are
    further TarInfo attributes (linkname, devmajor, devminor, ...)."""
    info = tarfile.TarInfo(name)
    info.type = type_
    info.mode = mode
    info.uid, info.gid = uid, gid
    info.uname, info.gname = uname, gname
    info.mtime = mtime
    info.pax_headers = dict(pax or {})
    for key, value in fields.items():
        setattr(info, key, value)
    if type_ not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        return info, None
    body = data.encode() if isinstance(data, str) else data
    info.size = len(body)
    return info, body


def f(name: str, data: bytes | str = b"", mode: int = 0o644, **kw: Any) -> Spec:
    """A regular file."""
    return entry(name, tarfile.REGTYPE, data, mode, **kw)


def d(name: str, mode: int = 0o755, **kw: Any) -> Spec:
    return entry(name, tarfile.DIRTYPE, mode=mode, **kw)


def sym(name: str, target: str, **kw: Any) -> Spec:
    return entry(name, tarfile.SYMTYPE, mode=0o777, linkname=target, **kw)


def hl(name: str, target: str, mode: int = 0o644, **kw: Any) -> Spec:
    return entry(name, tarfile.LNKTYPE, mode=mode, linkname=target, **kw)


def dev(name: str, kind: bytes = tarfile.CHRTYPE, major: int = 1, minor: int = 3, mode: int = 0o666) -> Spec:
    return entry(name, kind, mode=mode, devmajor=major, devminor=minor)


def fifo(name: str, mode: int = 0o600) -> Spec:
    return entry(name, tarfile.FIFOTYPE, mode=mode)


def wh(path: str) -> Spec:
    """The whiteout that deletes *path* from lower layers."""
    head, _, base = path.rpartition("/")
    return f(f"{head}/.wh.{base}" if head else f".wh.{base}")


def opq(directory: str) -> Spec:
    """The marker that makes *directory* opaque."""
    return f(f"{directory}/.wh..wh..opq" if directory else ".wh..wh..opq")


def layer(*specs: Spec, format: int = tarfile.PAX_FORMAT, encoding: str = "utf-8") -> bytes:
    """A layer tar holding *specs* in exactly this order (duplicates and all). Names are written in *encoding*
    whatever the host's locale, those that are not valid in it as their bytes (surrogateescape)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=format, encoding=encoding) as tar:
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
