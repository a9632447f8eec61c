"""Tar streams read as Go's archive/tar reads them: Docker and containerd parse layers with it, so a layer
must mean to imgconv exactly what it means to them, and what they refuse is refused.

CPython's tarfile is lenient where Go is strict: it reads an unparsable PAX number as 0, takes an invalid
header after the first for the end of the archive, applies global PAX headers and stray ``GNU.sparse.*``
records, and accepts sparse maps that overlap. A hostile layer so reads one way to Docker and another to
imgconv. This reader follows Go's rules (src/archive/tar/reader.go, strconv.go, common.go):

- A header's checksum (signed or unsigned) must match and its numeric fields parse (octal, trimmed of
  spaces and NULs, or base-256 within 64 bits); a zero block must be followed by another (the end).
- PAX records are ``LEN KEY=VALUE\\n`` exactly; no NUL in path, linkpath, uname, gname, nor in keys.
  uid, gid and size are decimal (Go's ParseInt: an optional sign, ASCII digits, 64 bits); atime, mtime and
  ctime are ``[-]digits[.digits]``. An empty record keeps the header's value.
- Global PAX headers are read (bounded, checked) and ignored, as Docker ignores them. Of two GNU long
  names (or PAX headers) for one entry the last counts; a GNU long name wins over a PAX path.
- Sparse files in the PAX formats 0.0, 0.1 and 1.0 are read with their holes as zeros; their maps must be
  sorted, disjoint and within the file, and their data exactly what the map stores. ``GNU.sparse.*``
  records without a version or a map mean nothing (a plain file).
- Only the types Docker extracts are entries: regular files, hard and symbolic links, devices,
  directories, FIFOs. Old GNU sparse files ('S'), contiguous files ('7') and any other type are refused
  (Docker's extraction fails on them: "unhandled tar header type").
- A stream that ends inside a header or an entry's data is refused; one that ends where a header
  would start (with or without the end-of-archive blocks) ends there.

Memory is bounded whatever the headers declare: a special header (PAX, GNU long name, a sparse map) holds
at most 1 MiB (Go's limit), one entry's special headers 2 MiB together and at most 32 of them.
"""

from __future__ import annotations

import tarfile
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

BLOCK = tarfile.BLOCKSIZE
BUFSIZE = 1 << 20
MAX_SPECIAL_HEADER = 1 << 20  # Go's archive/tar refuses special headers over 1 MiB too
_ENTRY_BUDGET = 2 * MAX_SPECIAL_HEADER  # all the special headers of one entry
_MAX_CHAIN = 32
_INT64 = 1 << 63
_ZEROS = bytes(BLOCK)
_HIGH = bytes(range(128, 256))

# The types moby's extraction (createTarFile) handles; anything else fails `docker pull` / `docker load`.
_HEADER_ONLY = {tarfile.LNKTYPE, tarfile.SYMTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.DIRTYPE,
                tarfile.FIFOTYPE}
_ENTRY_TYPES = _HEADER_ONLY | {tarfile.REGTYPE}
_SPECIAL = {tarfile.GNUTYPE_LONGNAME: "GNU long name", tarfile.GNUTYPE_LONGLINK: "GNU long link name",
            tarfile.XHDTYPE: "PAX", tarfile.SOLARIS_XHDTYPE: "PAX", tarfile.XGLTYPE: "global PAX"}
_PAX_STRINGS = {b"path", b"linkpath", b"uname", b"gname"}
_SPARSE_RUN_KEYS = (b"GNU.sparse.offset", b"GNU.sparse.numbytes")


class TarFormatError(tarfile.TarError):
    """A stream Go's archive/tar would refuse (or imgconv bounds); the message is one line naming the header
    (its byte offset, or the entry's name) and the field."""


class HeaderLimitError(TarFormatError):
    """Special headers beyond what imgconv reads: too large, or too many before one entry."""


def go_int(text: bytes | str) -> int | None:
    """Go's strconv.ParseInt(text, 10, 64): an optional sign and ASCII digits, within 64 bits; else None."""
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    body = text[1:] if text[:1] in ("+", "-") else text
    if not body or not body.isascii() or not body.isdigit():
        return None
    value = int(text)
    return value if -_INT64 <= value < _INT64 else None


def go_time(text: bytes) -> float | int | None:
    """Go's parsePAXTime: ``[-]seconds[.digits]``; an int without a fraction, else a float; None if invalid."""
    seconds, dot, fraction = text.partition(b".")
    whole = go_int(seconds)
    if whole is None or (fraction and not (fraction.isascii() and fraction.isdigit())):
        return None
    return float(text) if dot else whole


def _octal(raw: bytes) -> int | None:
    raw = raw.strip(b" \0").split(b"\0", 1)[0]
    if not raw:
        return 0
    if raw.strip(b"01234567"):
        return None
    return int(raw, 8)


def numeric(raw: bytes) -> int | None:
    """Go's parseNumeric: base-256 (GNU's binary form, two's complement) or octal; None if invalid."""
    if not raw or not raw[0] & 0x80:
        return _octal(raw)
    invert = 0xFF if raw[0] & 0x40 else 0
    value = 0
    for i, byte in enumerate(raw):
        byte ^= invert
        if i == 0:
            byte &= 0x7F
        if value >> 56:
            return None
        value = value << 8 | byte
    if value >> 63:
        return None
    return ~value if invert else value


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _cstring(raw: bytes) -> bytes:
    return raw.split(b"\0", 1)[0]


@dataclass
class _Header:
    """One parsed header block, before PAX records and long names apply."""

    offset: int
    type: bytes
    name: bytes
    linkname: bytes
    numbers: dict[str, int]
    uname: bytes = b""
    gname: bytes = b""


def parse_header(block: bytes, offset: int) -> _Header:
    """A header block as Go's readHeader parses it; TarFormatError where it would return ErrHeader."""
    where = f"invalid tar header at byte {offset}"
    stored = _octal(block[148:156])
    unsigned = sum(block) - sum(block[148:156]) + 8 * 0x20
    if stored != unsigned:
        rest = block[:148] + block[156:]
        if stored != unsigned - 256 * (len(rest) - len(rest.translate(None, _HIGH))):
            raise TarFormatError(f"{where}: bad checksum")
    magic, version = block[257:263], block[263:265]
    fmt = "v7"
    if magic == b"ustar\0":
        fmt = "star" if block[508:512] == b"tar\0" else "ustar"
    elif magic == b"ustar " and version == b" \0":
        fmt = "gnu"
    fields = {"mode": (100, 108), "uid": (108, 116), "gid": (116, 124), "size": (124, 136), "mtime": (136, 148)}
    if fmt != "v7":
        fields |= {"devmajor": (329, 337), "devminor": (337, 345)}
    numbers: dict[str, int] = {}
    for key, (start, end) in fields.items():
        value = numeric(block[start:end])
        if value is None:
            field_text = _text(block[start:end].rstrip(bytes(1)))
            raise TarFormatError(f"{where}: its {key} field {field_text!r} is not a number")
        numbers[key] = value
    header = _Header(offset, block[156:157], _cstring(block[:100]), _cstring(block[157:257]), numbers)
    if fmt != "v7":
        header.uname, header.gname = _cstring(block[265:297]), _cstring(block[297:329])
        prefix = _prefix(block, fmt)
        if prefix:
            header.name = prefix + b"/" + header.name
    return header


def _prefix(block: bytes, fmt: str) -> bytes:
    """The ustar prefix of the name. GNU headers have atime and ctime there instead, unless those do not parse
    (Go < 1.8 wrote a prefix into GNU headers: Go reads it back then, if it is ASCII)."""
    if fmt == "ustar":
        return _cstring(block[345:500])
    if fmt == "star":
        return _cstring(block[345:476])
    times = [block[start:start + 12] for start in (345, 357)]
    if all(raw[0] == 0 or numeric(raw) is not None for raw in times):
        return b""
    prefix = _cstring(block[345:500])
    return prefix if prefix.isascii() else b""


def parse_pax(body: bytes, offset: int) -> dict[bytes, bytes]:
    """PAX records as Go's parsePAX reads them (0.0 sparse runs gathered into a GNU.sparse.map record)."""
    records: dict[bytes, bytes] = {}
    runs: list[bytes] = []
    pos = 0
    while pos < len(body):
        key, value, pos = _pax_record(body, pos, offset)
        if key in _SPARSE_RUN_KEYS:
            if key != _SPARSE_RUN_KEYS[len(runs) % 2] or b"," in value:
                raise TarFormatError(f"invalid PAX header at byte {offset}: GNU.sparse.offset and numbytes records "
                                     "out of order")
            runs.append(value)
        else:
            records[key] = value
    if runs:
        records[b"GNU.sparse.map"] = b",".join(runs)
    return records


def _pax_record(body: bytes, pos: int, offset: int) -> tuple[bytes, bytes, int]:
    space = body.find(b" ", pos)
    length = go_int(body[pos:space]) if space >= 0 else None
    end = pos + length if length is not None else 0
    if length is None or length < 5 or end > len(body) or end <= space + 1 or body[end - 1] != 0x0A:
        raise TarFormatError(f"invalid PAX header at byte {offset}: a malformed record {_text(body[pos:pos + 40])!r}")
    key, equals, value = body[space + 1:end - 1].partition(b"=")
    if not equals or not key:
        raise TarFormatError(f"invalid PAX header at byte {offset}: a record without a keyword")
    if b"\0" in (value if key in _PAX_STRINGS else key):
        raise TarFormatError(f"invalid PAX header at byte {offset}: a NUL byte in the {_text(key[:40])!r} record")
    return key, value, end


class Entry(tarfile.TarInfo):
    """A member as read: tarfile's header object, plus where its data is and, for a sparse file, its map."""

    __slots__ = ("runs", "stored")

    def __init__(self, name: str = "") -> None:
        super().__init__(name)
        self.runs: array[int] | None = None  # a sparse file's data runs, offset and length in turn
        self.stored = 0  # the bytes of data the stream holds for it (a sparse file's runs, after its map)


@dataclass
class _Pending:
    """The special headers read so far for the next entry."""

    pax: dict[bytes, bytes] = field(default_factory=dict)
    long_name: bytes = b""
    long_link: bytes = b""
    count: int = 0
    spent: int = 0
    last: str = ""

    def reset(self) -> None:
        self.pax, self.long_name, self.long_link, self.count, self.spent = {}, b"", b"", 0, 0


class _Source:
    """The stream, buffered, with the position in it; skipping seeks when the stream's *size* is known."""

    def __init__(self, stream: BinaryIO, size: int | None) -> None:
        self.stream, self.size = stream, size
        self.chunk = BUFSIZE if size is None else 16 * BLOCK  # a seekable file is read where needed only
        self.buf = b""
        self.at = 0
        self.pos = 0

    def read(self, n: int) -> bytes:
        """Up to *n* bytes; fewer only at the end of the stream."""
        if len(self.buf) - self.at < n:
            parts = [self.buf[self.at:]]
            have = len(parts[0])
            while have < n:
                chunk = self.stream.read(max(n - have, self.chunk))
                if not chunk:
                    break
                parts.append(chunk)
                have += len(chunk)
            self.buf, self.at = b"".join(parts), 0
        data = self.buf[self.at:self.at + n]
        self.at += len(data)
        self.pos += len(data)
        return data

    def skip(self, n: int) -> bool:
        """Skip *n* bytes; False if the stream ends first."""
        buffered = len(self.buf) - self.at
        if n <= buffered:
            self.at += n
            self.pos += n
            return True
        if self.size is not None:
            if self.pos + n > self.size:
                return False
            self.stream.seek(self.pos + n)
            self.buf, self.at, self.pos = b"", 0, self.pos + n
            return True
        while n > 0:
            got = len(self.read(min(n, BUFSIZE)))
            if not got:
                return False
            n -= got
        return True


class TarReader:
    """Members of a tar stream, one at a time, in bounded memory (see the module docstring).

    *size*: the stream's length, for a seekable file read in place (skipping seeks, and a member declaring
    more than the file holds is refused at its header)."""

    def __init__(self, stream: BinaryIO, size: int | None = None) -> None:
        self.source = _Source(stream, size)
        self.members: list[tarfile.TarInfo] = []  # never filled: for callers that clear tarfile's listing
        self.current: Entry | None = None
        self.remaining = 0  # bytes of the current entry's data not read yet
        self.padding = 0
        self.done = False

    def __iter__(self) -> Iterator[Entry]:
        while (member := self.next()) is not None:
            yield member

    def close(self) -> None:
        self.done = True

    def next(self) -> Entry | None:
        """The next entry, or None at the end of the archive."""
        if self.done:
            return None
        self._skip_rest()
        pending = _Pending()
        while True:
            header = self._read_header()
            if header is None:
                if pending.count:
                    raise TarFormatError(f"the archive ends after a {pending.last} header, without its entry")
                self.done = True
                return None
            kind = _SPECIAL.get(header.type)
            if kind is None:
                entry = self._entry(header, pending)
                self.current = entry
                return entry
            self._special(header, kind, pending)

    def _skip_rest(self) -> None:
        if self.remaining and not self.source.skip(self.remaining):
            name = self.current.name if self.current is not None else "?"
            raise TarFormatError(f"the archive ends in the middle of the data of {name!r}")
        self.remaining = 0
        self.source.read(self.padding)  # Go: the end of the stream in padding is the end of the archive
        self.padding = 0

    def _read_header(self) -> _Header | None:
        offset = self.source.pos
        block = self.source.read(BLOCK)
        if not block:
            return None
        if len(block) < BLOCK:
            raise TarFormatError(f"the archive ends in the middle of a header at byte {offset}")
        if block == _ZEROS:
            second = self.source.read(BLOCK)
            if second and second != _ZEROS:
                raise TarFormatError(f"invalid tar header at byte {offset}: a zero block, then not the end")
            self.done = True
            return None
        return parse_header(block, offset)

    def _special(self, header: _Header, kind: str, pending: _Pending) -> None:
        size = header.numbers["size"]
        if not 0 <= size <= MAX_SPECIAL_HEADER:
            raise HeaderLimitError(f"a {kind} header of {size} bytes at byte {header.offset}; imgconv reads special "
                                   f"headers of at most {MAX_SPECIAL_HEADER >> 20} MiB")
        pending.count += 1
        pending.spent += size
        if pending.count > _MAX_CHAIN:
            raise HeaderLimitError(f"more than {_MAX_CHAIN} special headers for one entry at byte {header.offset}")
        if pending.spent > _ENTRY_BUDGET:
            raise HeaderLimitError(f"the headers of one entry take more than {_ENTRY_BUDGET >> 20} MiB")
        body = self.source.read(size)
        if len(body) < size:
            raise TarFormatError(f"the archive ends in the middle of a {kind} header at byte {header.offset}")
        self.source.read(-size % BLOCK)
        pending.last = kind
        if header.type == tarfile.XGLTYPE:
            parse_pax(body, header.offset)  # checked as Go does, then ignored as Docker does
            pending.reset()  # Go returns it as an entry of its own: nothing carries over to the next
        elif header.type == tarfile.GNUTYPE_LONGNAME:
            pending.long_name = _cstring(body)
        elif header.type == tarfile.GNUTYPE_LONGLINK:
            pending.long_link = _cstring(body)
        else:
            pending.pax = parse_pax(body, header.offset)  # a second PAX header replaces the first, as in Go

    def _entry(self, header: _Header, pending: _Pending) -> Entry:
        entry = _merged(header, pending)
        if entry.type not in _ENTRY_TYPES:
            type_ = entry.type.decode("latin-1")
            raise TarFormatError(f"{entry.name!r} has type {type_!r}, which Docker does not extract "
                                 "(\"unhandled tar header type\")")
        physical = 0 if entry.type in _HEADER_ONLY else entry.size
        if physical < 0:
            raise TarFormatError(f"{entry.name!r} declares a negative size ({physical})")
        entry.offset, entry.offset_data = header.offset, self.source.pos
        entry.stored = physical
        self.remaining, self.padding = physical, -physical % BLOCK
        if self.source.size is not None and self.source.pos + physical > self.source.size:
            raise TarFormatError(f"{entry.name!r} declares {physical} bytes, more than the archive holds after it")
        self._sparse(entry, pending.pax)
        return entry

    def _sparse(self, entry: Entry, pax: dict[bytes, bytes]) -> None:
        """Go's readGNUSparsePAXHeaders: a PAX sparse file's name, real size and map."""
        major, minor = pax.get(b"GNU.sparse.major", b""), pax.get(b"GNU.sparse.minor", b"")
        if (major, minor) in ((b"0", b"0"), (b"0", b"1"), (b"1", b"0")):
            version_1 = major == b"1"
        elif major or minor or not pax.get(b"GNU.sparse.map"):
            return  # not a sparse file (or a version nobody reads): a plain one
        else:
            version_1 = False
        if pax.get(b"GNU.sparse.name"):
            entry.name = _text(pax[b"GNU.sparse.name"])
        size_text = pax.get(b"GNU.sparse.size") or pax.get(b"GNU.sparse.realsize")
        if size_text:
            size = go_int(size_text)
            if size is None:
                raise TarFormatError(f"{entry.name!r}: its sparse size {_text(size_text[:40])!r} is not a number")
            entry.size = size
        runs = self._map_1_0(entry) if version_1 else _map_0_1(entry, pax)
        if entry.type in _HEADER_ONLY or not _valid_runs(runs, entry.size):
            raise TarFormatError(f"{entry.name!r}: its sparse map is not sorted, disjoint and within its size "
                                 f"{entry.size}")
        data = sum(runs[1::2])
        if data != self.remaining:
            raise TarFormatError(f"{entry.name!r}: its sparse map stores {data} bytes, its data is {self.remaining}")
        entry.runs, entry.stored = runs, data

    def _map_1_0(self, entry: Entry) -> array[int]:
        """The 1.0 map, at the start of the data: decimal numbers a line each, padded to a block."""
        text = bytearray()
        lines, wanted = 0, 1
        while lines < wanted:
            if len(text) + BLOCK > MAX_SPECIAL_HEADER:
                raise HeaderLimitError(f"{entry.name!r}: its sparse map takes more than 1 MiB of headers")
            if self.remaining < BLOCK:
                raise TarFormatError(f"{entry.name!r}: its sparse map is longer than its data")
            block = self.source.read(BLOCK)
            if len(block) < BLOCK:
                raise TarFormatError(f"the archive ends in the middle of the sparse map of {entry.name!r}")
            self.remaining -= BLOCK
            text += block
            lines += block.count(b"\n")
            if wanted == 1 and lines >= 1:
                count = go_int(bytes(text[:text.index(b"\n")]))
                if count is None or count < 0:
                    raise TarFormatError(f"{entry.name!r}: its sparse map's entry count is not a number")
                wanted = 1 + 2 * count
        self.padding = -self.remaining % BLOCK
        tokens = _tokens(bytes(text), b"\n")
        next(tokens)
        return _numbers(tokens, wanted - 1, entry.name)

    def extractfile(self, member: tarfile.TarInfo) -> BinaryIO:
        """The data of *member*, which must be the entry last returned (the stream moves on at the next one)."""
        if member is not self.current:
            raise TarFormatError(f"the data of {member.name!r} is behind the stream")
        return _Data(self, self.current)  # type: ignore[return-value]  # (a RawIOBase: read, readinto, close)


def _merged(header: _Header, pending: _Pending) -> Entry:
    """The entry's header with its PAX records and GNU long names applied, in Go's order (mergePAX, then the long
    names; an old regular file named with a slash is a directory)."""
    entry = Entry(_text(header.name))
    numbers = dict(header.numbers)
    mtime: float = numbers["mtime"]
    name, linkname, uname, gname = header.name, header.linkname, header.uname, header.gname
    for key, value in pending.pax.items():
        if not value:
            continue  # an empty record keeps the header's value
        if key == b"path":
            name = value
        elif key == b"linkpath":
            linkname = value
        elif key == b"uname":
            uname = value
        elif key == b"gname":
            gname = value
        elif key in (b"uid", b"gid", b"size"):
            number = go_int(value)
            if number is None:
                raise TarFormatError(f"{_text(name)!r}: its PAX {key.decode()} {_text(value[:40])!r} is not a number")
            numbers[key.decode()] = number
        elif key in (b"atime", b"mtime", b"ctime"):
            when = go_time(value)
            if when is None:
                raise TarFormatError(f"{_text(name)!r}: its PAX {key.decode()} {_text(value[:40])!r} is not a time")
            if key == b"mtime":
                mtime = when
    name = pending.long_name or name
    linkname = pending.long_link or linkname
    type_ = header.type
    if type_ == tarfile.AREGTYPE:
        type_ = tarfile.DIRTYPE if name.endswith(b"/") else tarfile.REGTYPE
    if type_ == tarfile.DIRTYPE:
        name = name.rstrip(b"/")  # as tarfile does: "/" is the root, not an absolute name
    entry.name, entry.linkname, entry.type = _text(name), _text(linkname), type_
    entry.uname, entry.gname = _text(uname), _text(gname)
    entry.mode, entry.uid, entry.gid = numbers["mode"], numbers["uid"], numbers["gid"]
    entry.size, entry.mtime = numbers["size"], mtime
    entry.devmajor, entry.devminor = numbers.get("devmajor", 0), numbers.get("devminor", 0)
    entry.pax_headers = {_text(k): _text(v) for k, v in pending.pax.items()}
    return entry


def _tokens(text: bytes, separator: bytes) -> Iterator[bytes]:
    """The pieces of *text* between separators, one at a time (a list of them could be many times *text*)."""
    start = 0
    while True:
        end = text.find(separator, start)
        if end < 0:
            yield text[start:]
            return
        yield text[start:end]
        start = end + 1


def _numbers(tokens: Iterator[bytes], count: int, name: str) -> array[int]:
    runs = array("q")
    for _ in range(count):
        value = go_int(next(tokens, b""))
        if value is None:
            raise TarFormatError(f"{name!r}: its sparse map holds something that is not a number")
        runs.append(value)
    return runs


def _map_0_1(entry: Entry, pax: dict[bytes, bytes]) -> array[int]:
    """The 0.0 and 0.1 map: GNU.sparse.numblocks pairs in GNU.sparse.map (0.0's runs were gathered there)."""
    count = go_int(pax.get(b"GNU.sparse.numblocks", b""))
    text = pax.get(b"GNU.sparse.map", b"")
    found = text.count(b",") + 1 if text else 0
    if count is None or count < 0 or found != 2 * count:
        raise TarFormatError(f"{entry.name!r}: its sparse map does not hold GNU.sparse.numblocks pairs of numbers")
    return _numbers(_tokens(text, b","), found, entry.name)


def _valid_runs(runs: array[int], size: int) -> bool:
    """Go's validateSparseEntries: runs in order, disjoint, within the file."""
    if size < 0:
        return False
    end = 0
    for i in range(0, len(runs), 2):
        offset, length = runs[i], runs[i + 1]
        if offset < 0 or length < 0 or offset > _INT64 - 1 - length or offset + length > size or end > offset:
            return False
        end = offset + length
    return True


class _Data:
    """An entry's data as a file: read in order from the stream; a sparse file's holes read as zeros."""

    def __init__(self, reader: TarReader, entry: Entry) -> None:
        self.reader, self.entry = reader, entry
        self.runs = entry.runs
        self.pos = 0  # in the file's content
        self.run = 0  # the next data run (sparse files)

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        pass

    def __enter__(self) -> _Data:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def read(self, size: int | None = -1) -> bytes:
        left = self.entry.size - self.pos if self.runs is not None else self.reader.remaining
        if self.reader.current is not self.entry:
            raise TarFormatError(f"the data of {self.entry.name!r} is behind the stream")
        n = left if size is None or size < 0 else min(size, left)
        if n <= 0:
            return b""
        if self.runs is None:
            data = self._stored(n)
            self.pos += n
            return data
        pieces = []
        while n > 0:
            piece = self._sparse(n)
            pieces.append(piece)
            self.pos += len(piece)
            n -= len(piece)
        return b"".join(pieces)

    def readinto(self, buffer: bytearray | memoryview) -> int:
        data = self.read(len(buffer))
        memoryview(buffer)[:len(data)] = data
        return len(data)

    def _stored(self, n: int) -> bytes:
        data = self.reader.source.read(n)
        self.reader.remaining -= len(data)
        if len(data) < n:
            raise TarFormatError(f"the archive ends in the middle of the data of {self.entry.name!r}")
        return data

    def _sparse(self, n: int) -> bytes:
        assert self.runs is not None
        runs = self.runs
        while self.run < len(runs) and runs[self.run] + runs[self.run + 1] <= self.pos:
            self.run += 2
        if self.run >= len(runs) or self.pos < runs[self.run]:  # in a hole: zeros up to the next run
            upto = runs[self.run] if self.run < len(runs) else self.entry.size
            return bytes(min(n, upto - self.pos, BUFSIZE))
        return self._stored(min(n, runs[self.run] + runs[self.run + 1] - self.pos))

