"""Tar streams as imgconv reads and writes them, whatever they hold: names, headers, xattrs, writers.

Nothing here knows about layers or whiteouts (that is :mod:`converter.oci.flatten`); these are the
pieces every tar-handling step shares: the image's layers, the appliance's tar-in and tar-out, the
layers `vm-to-oci` writes.

- Names are normalised (``./a//b/`` is ``a/b``) and confined: absolute names and ``..`` components
  are refused with a :class:`LayerError` that says which archive and which path.
- Headers written out are rebuilt (:func:`clean_header`) with numeric owners only, because whoever
  extracts them must not map names through *its* /etc/passwd.
- Extended attributes travel as ``SCHILY.xattr.`` PAX records, escaped as GNU tar (the appliance's
  tar) expects them.
- Streams are written and read without keeping every header: memory does not grow with file count.
- Reading follows Go's archive/tar (:mod:`converter.oci.tarread`), which Docker parses layers with, and is
  bounded whatever the headers declare: one entry's special headers (PAX records, GNU long names, sparse
  maps) at 1 MiB each and 2 MiB together, names and link targets at PATH_MAX, name components at NAME_MAX.
"""

from __future__ import annotations

import base64
import re
import tarfile
import urllib.parse
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from _typeshed import SupportsRead

from converter.errors import LayerError
from converter.oci.tarread import BUFSIZE, Entry, TarFormatError, TarReader

MAX_DEVICE = 8**7 - 1  # the ustar device fields have no PAX fallback
MAX_ID = 2**32 - 1  # uid_t and gid_t are 32 bits

PATH_MAX = 4096  # Linux's: no name or link target in a layer can be longer and still be extracted
NAME_MAX = 255  # Linux's: no file name (a path component) can be longer


def forget_members(tar: tarfile.TarFile | TarReader) -> None:
    """Drop the headers ``TarFile`` keeps for listing, so memory does not grow with the file count."""
    tar.members.clear()  # type: ignore[union-attr]  # (undeclared in typeshed for TarFile, public in CPython)


class StreamingTarFile(tarfile.TarFile):
    """A tar writer that forgets headers once written."""

    def addfile(self, tarinfo: tarfile.TarInfo, fileobj: SupportsRead[bytes] | None = None) -> None:
        super().addfile(tarinfo, fileobj)
        forget_members(self)


def open_output(stream: BinaryIO) -> tarfile.TarFile:
    """The tar writer imgconv writes trees with: PAX (long names, big ids, xattrs), streamed."""
    return StreamingTarFile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT, bufsize=BUFSIZE)


def abandon_output(tar: tarfile.TarFile) -> None:
    """Drop a stream writer after a failure without flushing it: its file may be closed already, and the
    finaliser of an unclosed stream would write to it and print a second, confusing error."""
    stream = tar.fileobj
    if stream is not None and hasattr(stream, "closed"):
        stream.closed = True
    tar.closed = True  # type: ignore[attr-defined]  # TarFile's own flag, set by close()


def _byte_length(text: str) -> int:
    try:
        return len(text.encode("utf-8", "surrogateescape"))  # the reader's own decoding, undone
    except UnicodeEncodeError:
        return len(text.encode("utf-8", "surrogatepass"))


def _check_names(member: tarfile.TarInfo, what: str) -> None:
    for kind, name in (("name", member.name), ("link target", member.linkname)):
        if _byte_length(name) > PATH_MAX:
            raise LayerError(f"{what}: the {kind} {name[:48]!r}... is longer than {PATH_MAX} bytes (PATH_MAX)")
    for part in member.name.split("/"):
        if _byte_length(part) > NAME_MAX:
            raise LayerError(f"{what}: the name {member.name[:48]!r}... has a component longer than {NAME_MAX} bytes "
                             "(NAME_MAX): no Linux filesystem can hold it")


def open_reader(stream: BinaryIO, size: int | None = None) -> TarReader:
    """A streaming tar reader that reads as Go's archive/tar does, in bounded memory (:mod:`converter.oci.tarread`);
    errors are :class:`tarfile.TarError` (``HeaderLimitError`` for what exceeds a bound), for callers that map them
    to their own."""
    return TarReader(stream, size)


def read_members(stream: BinaryIO, what: str) -> Iterator[tuple[Entry, TarReader]]:
    """Each member of the tar *stream* with the reader its data comes from, in bounded memory.

    A zero-length stream is an empty archive; what Go's archive/tar refuses, special headers beyond
    ``MAX_SPECIAL_HEADER``, names beyond :data:`PATH_MAX` and components beyond :data:`NAME_MAX` are a
    :class:`LayerError` naming *what*.
    """
    tar = open_reader(stream)
    read = 0
    while True:
        try:
            member = tar.next()
        except TarFormatError as exc:
            first = not read and str(exc).startswith("invalid tar header at byte 0:")
            raise LayerError(f"{what}: {'not a tar archive: ' if first else ''}{exc}") from exc
        if member is None:
            return
        read += 1
        _check_names(member, what)
        yield member, tar


# -- names ---------------------------------------------------------------------------------------------


def normalize_name(name: str, what: str, *, link: bool = False) -> str:
    """`./usr//bin/` -> `usr/bin`; "" for the root itself. Absolute names and `..` are refused.

    A hard link's target may be written with a leading `/` by some tools (GNU tar -P); it
    still names a member of the same archive, so for link targets the slash is dropped.
    """
    if "\x00" in name:
        raise LayerError(f"{what}: entry name {name!r} contains a NUL byte")
    if name.startswith("/"):
        if not link:
            raise LayerError(f"{what}: absolute path {name!r} in layer; layer paths must be relative to the root")
        name = name.lstrip("/")
    parts = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            kind = "hard link target" if link else "path"
            raise LayerError(f"{what}: {kind} {name!r} contains '..' and could escape the root")
        parts.append(part)
    return "/".join(parts)


def parents(path: str) -> Iterator[str]:
    """Proper ancestors of *path*, nearest first: a/b/c -> a/b, a."""
    while "/" in path:
        path = path.rsplit("/", 1)[0]
        yield path


# -- extended attributes -------------------------------------------------------------------------------


def _xattr_headers(pax: Mapping[str, str]) -> dict[str, str]:
    """Keep extended attributes, in the SCHILY form GNU tar reads (libarchive's form is converted)."""
    kept: dict[str, str] = {}
    for key, value in pax.items():
        if key.startswith("SCHILY.xattr."):
            kept[key] = value
        elif key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote(key[len("LIBARCHIVE.xattr."):])
            if "=" in name:
                continue  # a PAX keyword ends at the first "=": only libarchive's encoded form can hold it
            try:
                raw = base64.b64decode(value + "=" * (-len(value) % 4))
            except ValueError:
                continue
            kept.setdefault(f"SCHILY.xattr.{name}", raw.decode("utf-8", "surrogateescape"))
    return kept


# GNU tar (the appliance's tar, for tar-in and tar-out) escapes "%" and "=" in the xattr names of its
# SCHILY.xattr records as %25 and %3D, and decodes them when it reads; other writers (Go, Python) write
# names as they are. So names are encoded on the way into the appliance and decoded on the way out.
_GNU_ESCAPES = re.compile("%(25|3D)")
_XATTR = "SCHILY.xattr."


def gnu_xattrs_encoded(pax: Mapping[str, str]) -> dict[str, str]:
    """PAX records with xattr names escaped as GNU tar reads them."""
    return {(_XATTR + key[len(_XATTR):].replace("%", "%25") if key.startswith(_XATTR) else key): value
            for key, value in pax.items()}


def gnu_xattrs_decoded(pax: Mapping[str, str]) -> dict[str, str]:
    """PAX records from GNU tar with xattr names unescaped; a name holding "=" cannot be a PAX keyword in
    any other tar, so it is left out (as the flattener leaves out libarchive's)."""
    out: dict[str, str] = {}
    for key, value in pax.items():
        if key.startswith(_XATTR):
            name = _GNU_ESCAPES.sub(lambda m: "%" if m.group(1) == "25" else "=", key[len(_XATTR):])
            if "=" in name:
                continue
            key = _XATTR + name
        out[key] = value
    return out


# -- headers -------------------------------------------------------------------------------------------


def clean_header(member: tarfile.TarInfo, name: str) -> tarfile.TarInfo:
    """A fresh header for *member* under *name*: numeric owners, no stale PAX path/size records."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.REGTYPE if member.type in (tarfile.AREGTYPE, tarfile.CONTTYPE) else member.type
    if member.isreg():
        info.type = tarfile.REGTYPE
    info.mode = member.mode & 0o7777
    info.uid, info.gid = member.uid, member.gid
    info.uname = info.gname = ""
    info.mtime = member.mtime
    info.size = member.size if info.type == tarfile.REGTYPE else 0
    info.linkname = member.linkname
    if member.ischr() or member.isblk():
        info.devmajor, info.devminor = member.devmajor, member.devminor
    info.pax_headers = _xattr_headers(member.pax_headers)
    exact_mtime = member.pax_headers.get("mtime")
    if exact_mtime is not None and _float_or_none(exact_mtime) == member.mtime:
        info.pax_headers["mtime"] = exact_mtime  # tarfile's float would round nanoseconds away
    return info


def _float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def check_header(member: tarfile.TarInfo, path: str, what: str) -> None:
    """Values a tar header can hold but an extractor would refuse (or tarfile could not write)."""
    if member.uid < 0 or member.gid < 0:
        raise LayerError(f"{what}: {path!r} has a negative owner ({member.uid}:{member.gid})")
    if member.uid > MAX_ID or member.gid > MAX_ID:  # Docker's chown would truncate them, GNU tar refuses them
        raise LayerError(f"{what}: {path!r} has an owner no Linux file can have ({member.uid}:{member.gid})")
    for key in member.pax_headers:
        if key.startswith(("SCHILY.xattr.", "LIBARCHIVE.xattr.")) and not key.isascii():
            try:
                key.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise LayerError(f"{what}: {path!r} has an extended attribute whose name is not UTF-8 "
                                 f"({key[:60]!r}); imgconv cannot write it into a PAX header") from exc
    if (member.ischr() or member.isblk()) and not (
            0 <= member.devmajor <= MAX_DEVICE and 0 <= member.devminor <= MAX_DEVICE):
        raise LayerError(f"{what}: device {path!r} has out-of-range numbers {member.devmajor},{member.devminor}")
