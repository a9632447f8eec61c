"""Tar members written field by field, any field any way, valid or not: for fuzzing readers.

tarfile's writer cannot write most of what a hostile layer holds (a negative or non-numeric size, a PAX `uid=abc`,
an unknown type, a GNU long name before anything, a sparse map that lies), so headers are built here from bytes:

    header(...)         one 512-byte header block from raw field values (checksum computed unless given)
    octal / base256     the two encodings of a number field
    pax_records(...)    the body of a PAX extended header, each record's length computed
    Member + Encoding   a logical entry and how to spell it: name in the ustar field, split over the prefix, in a GNU
                        long name or a PAX `path`; numbers in octal, base-256 or PAX records; extra PAX records;
                        files written sparse (PAX 0.0, 0.1, 1.0 or old GNU 'S'). `encode(member, encoding)` gives the
                        member's bytes (headers, data, padding).

Every spelling an `Encoding` offers means the same entry to a reader that follows POSIX and GNU tar (and Go's
archive/tar, which is what Docker reads layers with); tests/unit/test_fuzz_layers.py relies on that.
"""

from __future__ import annotations

import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field

BLOCK = 512
END = b"\0" * (2 * BLOCK)
POSIX_MAGIC = b"ustar\x0000"
GNU_MAGIC = b"ustar  \x00"

# (start, end) of each ustar field.
FIELDS = {
    "name": (0, 100), "mode": (100, 108), "uid": (108, 116), "gid": (116, 124), "size": (124, 136),
    "mtime": (136, 148), "chksum": (148, 156), "type": (156, 157), "linkname": (157, 257), "magic": (257, 265),
    "uname": (265, 297), "gname": (297, 329), "devmajor": (329, 337), "devminor": (337, 345), "prefix": (345, 500),
}
# The old GNU header's sparse fields (they overlay the ustar prefix).
GNU_SPARSE_AT, GNU_ISEXTENDED, GNU_REALSIZE = 386, 482, (483, 495)


def pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % BLOCK)


def octal(value: int, width: int, style: str = "nul") -> bytes:
    """*value* in octal for a field of *width* bytes: "nul" (zero-padded, NUL-terminated, as tarfile writes),
    "space" (zero-padded, space and NUL, as old GNU tar), "blank" (right-aligned after spaces, NUL-terminated)."""
    digits = f"{value:o}"
    if style == "space":
        text = digits.rjust(width - 2, "0") + " \0"
    elif style == "blank":
        text = digits.rjust(width - 1) + "\0"
    else:
        text = digits.rjust(width - 1, "0") + "\0"
    if len(text) != width or value < 0:
        raise ValueError(f"{value} does not fit {width} bytes of octal")
    return text.encode()


def base256(value: int, width: int) -> bytes:
    """GNU's binary number field: 0x80 then big-endian for a positive value, two's complement (0xff...) for a
    negative one."""
    if value >= 0:
        return b"\x80" + value.to_bytes(width - 1, "big")
    return (value % (1 << (8 * width))).to_bytes(width, "big")


def fits_octal(value: int, width: int) -> bool:
    return 0 <= value < 8 ** (width - 1)


def header(fields: dict[str, bytes], *, signed_checksum: bool = False) -> bytes:
    """A header block holding *fields* (raw bytes, cut or NUL-padded to their slot). The checksum is computed
    (unsigned, or signed as some old tars did) unless *fields* gives one."""
    block = bytearray(BLOCK)
    for key, value in fields.items():
        start, end = FIELDS[key] if key in FIELDS else (int(key), int(key) + len(value))
        block[start:end] = value[: end - start].ljust(end - start, b"\0")
    if "chksum" not in fields:
        block[148:156] = b" " * 8
        total = sum(block) if not signed_checksum else sum(b - 256 if b > 127 else b for b in block)
        block[148:156] = f"{total % (8 ** 6):06o}".encode() + b"\0 "
    return bytes(block)


def pax_records(records: Sequence[tuple[bytes, bytes]]) -> bytes:
    """PAX records `LEN KEY=VALUE\\n`, LEN counting itself."""
    out = bytearray()
    for key, value in records:
        body = b" " + key + b"=" + value + b"\n"
        length = len(body) + 1
        while len(str(length)) + len(body) != length:
            length = len(str(length)) + len(body)
        out += str(length).encode() + body
    return bytes(out)


def special(type_: bytes, body: bytes, name: bytes = b"././@PaxHeader", *, size: int | None = None,
            magic: bytes = POSIX_MAGIC) -> bytes:
    """A special member (PAX 'x'/'g'/'X', GNU long name 'L' / long link 'K'): header, *body*, padding. *size* is
    what the header declares (the body's length unless given)."""
    declared = len(body) if size is None else size
    number = octal(declared, 12) if fits_octal(declared, 12) else base256(declared, 12)
    head = header({"name": name, "mode": octal(0o644, 8), "uid": octal(0, 8), "gid": octal(0, 8), "size": number,
                   "mtime": octal(0, 12), "type": type_, "magic": magic})
    return head + pad(body)


# -- logical members and their spellings ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """One entry as a reader should understand it. *name* and *linkname* are bytes as stored (non-UTF-8 allowed);
    *mtime* is an int, or a decimal string with a fraction (only a PAX record can hold that). A regular file's
    *data* is its content; *holes* (a sparse file's map, (offset, length) of the data runs) say which parts of
    *data* are stored, the rest being zeros a sparse encoding leaves out."""

    name: bytes
    type: bytes = tarfile.REGTYPE
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int | str = 1_600_000_000
    linkname: bytes = b""
    devmajor: int = 0
    devminor: int = 0
    uname: bytes = b"root"
    gname: bytes = b"root"
    pax: tuple[tuple[bytes, bytes], ...] = ()  # records that carry meaning (xattrs), always written
    runs: tuple[tuple[int, int], ...] | None = None  # a sparse file's data runs (offset, length); None: not sparse


@dataclass(frozen=True)
class Encoding:
    """How to spell a Member. Choices that cannot hold the value (a 300-byte name in the ustar field, a uid of
    2**40 in octal) fall back to one that can, so every Encoding can spell every Member."""

    magic: str = "posix"  # posix | gnu | v7 (v7: no magic, used only where nothing else needs one)
    name_via: str = "field"  # field | prefix | gnu | pax
    link_via: str = "field"  # field | gnu | pax
    numbers: str = "nul"  # nul | space | blank | base256 (base-256 for uid, gid, size, mtime)
    pax_numbers: tuple[str, ...] = ()  # of uid, gid, size, mtime: written as PAX records as well
    pax_type: bytes = tarfile.XHDTYPE  # 'x', or Solaris' 'X'
    extra_pax: tuple[tuple[bytes, bytes], ...] = ()  # records that mean nothing to the entry (comment, atime...)
    sparse: str = "pax1.0"  # for members with runs: pax1.0 | pax0.1 | pax0.0 | oldgnu
    signed_checksum: bool = False
    spelling: str = ""  # a prefix for the stored name: "", "./", or "/" for hard link targets only
    dir_slash: bool = False  # a directory's name stored with a trailing slash


_V7_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.LNKTYPE, tarfile.SYMTYPE, tarfile.DIRTYPE)


def _number(value: int, width: int, style: str) -> bytes:
    if style != "base256" and fits_octal(value, width):
        try:
            return octal(value, width, style)
        except ValueError:  # "space" holds one digit less
            return octal(value, width)
    return base256(value, width)


def _split_prefix(name: bytes) -> tuple[bytes, bytes] | None:
    """(prefix, name) for the ustar prefix field, if *name* can be split so."""
    for i in range(len(name) - 1, -1, -1):
        if name[i:i + 1] == b"/" and i <= 155 and len(name) - i - 1 <= 100 and i > 0 and i < len(name) - 1:
            return name[:i], name[i + 1:]
    return None


def _stored(member: Member) -> bytes:
    """The data stored after the header: the content, or a sparse file's runs (1.0 adds its map first)."""
    if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE) or member.runs is None:
        return member.data if member.type in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE) else b""
    return b"".join(member.data[offset:offset + length] for offset, length in member.runs)


def encode(member: Member, enc: Encoding) -> bytes:
    """The member's bytes: its special headers, its header, its data and padding."""
    name = enc.spelling.encode() + member.name
    if enc.dir_slash and member.type == tarfile.DIRTYPE:
        name += b"/"
    records: list[tuple[bytes, bytes]] = list(enc.extra_pax)
    pre = b""
    fields: dict[str, bytes] = {}
    sparse = member.runs is not None and member.type in (tarfile.REGTYPE, tarfile.AREGTYPE)
    stored = _stored(member)
    type_, magic, name_via, pax_numbers = member.type, enc.magic, enc.name_via, enc.pax_numbers
    if sparse:
        stored, type_, name, fields, sparse_records = _sparse(member, enc, name, stored)
        records += sparse_records
        # A PAX size (or path, for 1.0's stand-in name) would compete with the sparse records: tarfile applies
        # whichever comes last, Go's archive/tar the sparse ones. GNU tar writes neither; nor does this.
        pax_numbers = tuple(k for k in pax_numbers if k != "size")
        if enc.sparse == "pax1.0":
            name_via = "field"
        if enc.sparse == "oldgnu":
            magic = "gnu"  # old GNU sparse headers exist only in the GNU format (Go refuses them elsewhere)
    if name_via == "field" and len(name) > 100:
        name_via = "prefix"
    if name_via == "prefix":
        split = _split_prefix(name)
        if split is None or magic == "gnu":
            name_via = "pax"
        else:
            fields["prefix"], fields["name"] = split
    if name_via == "gnu":
        pre += special(tarfile.GNUTYPE_LONGNAME, name + b"\0", b"././@LongLink", magic=GNU_MAGIC)
        fields["name"] = name[:100]
    elif name_via == "pax":
        records.append((b"path", name))
        fields["name"] = name[:100]
    elif name_via == "field":
        fields["name"] = name
    link_via = enc.link_via if member.linkname else "field"
    if link_via == "field" and len(member.linkname) > 100:
        link_via = "pax"
    if link_via == "gnu":
        pre += special(tarfile.GNUTYPE_LONGLINK, member.linkname + b"\0", b"././@LongLink", magic=GNU_MAGIC)
        fields["linkname"] = member.linkname[:100]
    elif link_via == "pax":
        records.append((b"linkpath", member.linkname))
        fields["linkname"] = member.linkname[:100]
    else:
        fields["linkname"] = member.linkname
    numbers = {"uid": member.uid, "gid": member.gid, "size": len(stored)}
    mtime = member.mtime
    if isinstance(mtime, str):
        records.append((b"mtime", mtime.encode()))
        numbers["mtime"] = int(float(mtime))
    else:
        numbers["mtime"] = mtime
    for key, value in numbers.items():
        width = 12 if key in ("size", "mtime") else 8
        if key in pax_numbers and not (key == "mtime" and isinstance(mtime, str)):
            records.append((key.encode(), str(value).encode()))
        fields[key] = _number(value, width, enc.numbers)
    fields["mode"] = _number(member.mode, 8, "nul" if enc.numbers == "base256" else enc.numbers)
    fields["type"] = type_
    fields["uname"], fields["gname"] = member.uname, member.gname
    if magic == "v7" and (pre or records or member.pax or "prefix" in fields or type_ not in _V7_TYPES):
        magic = "posix"  # a V7 header has no device numbers (Go does not read them there) and stands alone
    if magic != "v7":
        fields["devmajor"] = _number(member.devmajor, 8, enc.numbers)
        fields["devminor"] = _number(member.devminor, 8, enc.numbers)
    fields["magic"] = {"posix": POSIX_MAGIC, "gnu": GNU_MAGIC, "v7": b""}[magic]
    records += member.pax
    if records:
        pre += special(enc.pax_type, pax_records(records))
    ext = fields.pop("_extension", b"")
    return pre + header(fields, signed_checksum=enc.signed_checksum) + ext + pad(stored)


def _sparse(member: Member, enc: Encoding, name: bytes, stored: bytes
            ) -> tuple[bytes, bytes, bytes, dict[str, bytes], list[tuple[bytes, bytes]]]:
    """A sparse file's stored data, type, stored name, extra header fields and PAX records."""
    runs = member.runs or ()
    realsize = len(member.data)
    if enc.sparse == "oldgnu":
        fields: dict[str, bytes] = {}
        area = bytearray()
        for offset, length in runs[:4]:
            area += _number(offset, 12, "nul") + _number(length, 12, "nul")
        fields[str(GNU_SPARSE_AT)] = bytes(area)
        fields[str(GNU_REALSIZE[0])] = _number(realsize, 12, "nul")
        rest = list(runs[4:])
        extension = bytearray()
        if rest:
            fields[str(GNU_ISEXTENDED)] = b"\x01"
        while rest:
            chunk, rest = rest[:21], rest[21:]
            block = bytearray(BLOCK)
            for i, (offset, length) in enumerate(chunk):
                block[i * 24:(i + 1) * 24] = _number(offset, 12, "nul") + _number(length, 12, "nul")
            block[504] = 1 if rest else 0
            extension += block
        fields["_extension"] = bytes(extension)
        return stored, tarfile.GNUTYPE_SPARSE, name, fields, []
    if enc.sparse == "pax1.0":
        sparse_map = f"{len(runs)}\n".encode() + b"".join(f"{o}\n{n}\n".encode() for o, n in runs)
        records = [(b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0"), (b"GNU.sparse.name", name),
                   (b"GNU.sparse.realsize", str(realsize).encode())]
        return pad(sparse_map) + stored, tarfile.REGTYPE, b"GNUSparseFile.0/sparse", {}, records
    if enc.sparse == "pax0.1":
        flat = ",".join(f"{o},{n}" for o, n in runs).encode()
        records = [(b"GNU.sparse.size", str(realsize).encode()), (b"GNU.sparse.numblocks", str(len(runs)).encode()),
                   (b"GNU.sparse.map", flat)]
        return stored, tarfile.REGTYPE, name, {}, records
    records = [(b"GNU.sparse.size", str(realsize).encode()), (b"GNU.sparse.numblocks", str(len(runs)).encode())]
    for offset, length in runs:
        records += [(b"GNU.sparse.offset", str(offset).encode()), (b"GNU.sparse.numbytes", str(length).encode())]
    return stored, tarfile.REGTYPE, name, {}, records


@dataclass
class Stream:
    """A tar stream assembled from members and raw pieces, with what was meant to end it."""

    parts: list[bytes] = field(default_factory=list)

    def add(self, data: bytes) -> None:
        self.parts.append(data)

    def bytes(self, end: str = "marker") -> bytes:
        """end: "marker" (two zero blocks), "record" (padded to tar's 10240-byte record), "none" (EOF at a member
        boundary, which Go's reader and tarfile both take as the end)."""
        data = b"".join(self.parts)
        if end == "none":
            return data
        data += END
        if end == "record":
            data += b"\0" * (-len(data) % tarfile.RECORDSIZE)
        return data
