"""`docker-archive:PATH[:NAME:TAG]`: the tarball `docker save` writes and `docker load` reads.

Reading accepts both shapes Docker has written: the legacy one (`<id>/layer.tar`, `<hex>.json`)
and the Docker 25+ one (an OCI layout plus `manifest.json`). `manifest.json` is the common
ground, so it is what selects the image. A legacy archive has no registry manifest: the image
is described by a synthesised one whose layer digests are the diff_ids, which the layer
verifier checks.

The archive is untrusted, and read so that it cannot make imgconv loop, hang or fill memory or disk:

* Only a regular file is opened (a FIFO would block), and its members are read by the reader layers are
  read with (:mod:`converter.oci.tarread`: Go's archive/tar's rules, which `docker load` follows, and
  its bounds): a negative size (CVE-2025-8194: tarfile would step back and loop for ever), special
  headers over 1 MiB and a member declaring more than the file holds are refused; so is an archive
  of more than MAX_MEMBERS members (their headers are kept in memory).
* A plain archive is read in place: its headers once, its blobs on demand (no copy).
* A compressed one (`docker save | gzip`, which `docker load` accepts) is read as one stream, and
  its members are copied into a plain tar in scratch space for random access. Which members the
  chosen image needs is known only from `manifest.json`, which `docker save` writes *after* the
  blobs, so every member a manifest could name is kept (regular files and links, less the
  bookkeeping files of the known writers), and the rest is skipped. What is inflated, kept or
  skipped, counts against MAX_RATIO times the compressed size, the most deflate can produce: a
  member declaring more than is left of that is refused at its header, before its data is read,
  and the stream is cut off when it goes past it. Scratch space and time are so bounded by the
  input's size; a tar of zeros is an empty archive, found at its first block.

`manifest.json` and the config are JSON documents parsed whole: each is read only if it is no larger than
the archive file itself (or 64 KiB) and than its cap, and only if its count of JSON values is plausible for
its size, so a small compressed archive cannot make either take hundreds of MiB once parsed.

Writing produces an archive that is both: an OCI layout with a `manifest.json` beside it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from converter.errors import BlobError, ImageError, ReferenceError_, ToolError, UsageError
from converter.oci.blobs import sniff_compression
from converter.oci.image import Image, from_manifest
from converter.oci.localfile import open_regular
from converter.oci.model import (
    Descriptor,
    Manifest,
    MediaType,
    Platform,
    load_json,
)
from converter.oci.reference import DockerName, Reference, parse_docker_name
from converter.oci.tarread import Entry, TarFormatError, TarReader
from converter.scratch import scratch_dir

if TYPE_CHECKING:
    from converter.oci.transport import Built

_HEX_NAME = re.compile(r"(?:^|/)(?:blobs/sha256/)?([a-f0-9]{64})(?:\.json)?$")

_MAX_LINK_HOPS = 16

# Deflate never inflates more than 1032 times (a 258-byte match costs at least 2 bits), so a genuine gzip archive
# is never refused; zstd can (a GiB of zeros fits in 32 KiB), but no saved image does.
MAX_RATIO = 1032
_RATIO_SLACK = 1 << 20  # the headers and end-of-archive padding of a tiny archive
MAX_MEMBERS = 100_000  # docker save writes a few per layer and image
MANIFEST_MAX = 16 << 20
CONFIG_MAX = 64 << 20
_JSON_SMALL = 64 << 10  # a JSON document this small is read from any archive, however small
# What the known writers (docker save, skopeo, go-containerregistry) add for other readers; no manifest names it.
_BOOKKEEPING = re.compile(r"(?:repositories|oci-layout|index\.json|[^/]+/(?:json|VERSION))\Z")
_BUFSIZE = 1 << 20

_LAYER_TYPE = {"none": MediaType.DOCKER_LAYER, "gzip": MediaType.DOCKER_LAYER_GZIP,
               "zstd": MediaType.OCI_LAYER_ZSTD}


class ArchiveStore:
    """Blobs are tar members; the synthesised digests map to member names."""

    def __init__(self, path: Path, file: BinaryIO, members: dict[str, Entry]) -> None:
        self.path = path
        self.file = file
        self.members = members
        self.input_size = 0  # of the archive as given (compressed, if it is): what bounds its JSON documents
        self.by_digest: dict[str, str] = {}

    def resolve(self, name: str) -> Entry:
        """The member *name* leads to, through symlinks and hard links (Docker dedups identical layers so)."""
        info = self.members.get(name)
        current = name
        for _hop in range(_MAX_LINK_HOPS):
            if info is None:
                where = "" if current == name else f" (it leads to {current}, which is not there)"
                raise BlobError(f"{name} is missing from {self.path}{where}")
            if not (info.issym() or info.islnk()):
                return info
            current = _member_target(current, info)
            info = self.members.get(current)
        raise BlobError(f"{name} in {self.path} is a loop of links")

    def member_stream(self, name: str) -> BinaryIO:
        info = self.resolve(name)
        if not info.isreg():
            raise BlobError(f"{name} in {self.path} is not a regular file")
        return _Slice(self.file.fileno(), info.offset_data, info.size)  # type: ignore[return-value]

    def open_blob(self, digest: str) -> BinaryIO:
        name = self.by_digest.get(digest)
        if name is None:
            raise BlobError(f"blob {digest} is missing from {self.path}")
        return self.member_stream(name)

    def describe(self) -> str:
        return f"docker archive {self.path}"

    def member_size(self, name: str) -> int:
        return self.resolve(name).size


def _member_target(name: str, info: tarfile.TarInfo) -> str:
    if info.islnk():
        return info.linkname
    base = name.rsplit("/", 1)[0] if "/" in name else ""
    parts: list[str] = []
    for part in f"{base}/{info.linkname}".split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            continue
        parts.append(part)
    return "/".join(parts)


def _normal(name: str) -> str:
    return name.removeprefix("./")


class ArchiveTransport:
    """`docker-archive:PATH[:NAME:TAG|:@N]`."""

    def open(self, ref: Reference, *, platform: Platform | None,
             tls_verify: bool) -> AbstractContextManager[Image]:
        return read_archive(_path(ref), ref.name, ref.index, platform, str(ref))

    def check_destination(self, ref: Reference, force: bool) -> None:
        path = _path(ref)
        if path.is_dir():
            raise UsageError(f"{path} is a directory; a docker archive is a file")
        if not path.parent.is_dir():
            raise UsageError(f"the directory of {path} does not exist")
        if path.exists() and not force:
            raise UsageError(f"{path} already exists")

    def write(self, built: Built, ref: Reference, *, tls_verify: bool, scratch: Path) -> str | None:
        write_archive(built, [ref.name.familiar()] if ref.name else [], _path(ref))
        return None  # an archive keeps no manifest digest (`manifest.json` names blobs, not a manifest)


TRANSPORT = ArchiveTransport()


def _path(ref: Reference) -> Path:
    assert ref.path is not None  # parse_reference sets it for every docker-archive: reference
    return Path(ref.path)


@contextmanager
def read_archive(
    path: Path, name: DockerName | None, position: int | None, platform: Platform | None, source: str,
) -> Iterator[Image]:
    """The image *name* (or the *position*-th, or the only one) in the archive at *path*; the archive stays
    open, and what was kept of a compressed one exists, only as long as the block."""
    with scratch_dir() as scratch, _opened(path, scratch) as store:
        yield _image(store, name, position, platform, source)


@contextmanager
def _opened(path: Path, scratch: Path) -> Iterator[ArchiveStore]:
    """A plain archive is read in place; of a compressed one, only what a manifest could name is kept."""
    with _open_file(path) as source:
        compression = sniff_compression(source.read(4))
        source.seek(0)
        input_size = os.fstat(source.fileno()).st_size
        if compression == "none":
            with _indexed(source, path) as store:
                store.input_size = input_size
                yield store
            return
        kept = scratch / "kept.tar"
        _keep_members(source, compression, path, kept)
        with kept.open("rb") as plain, _indexed(plain, path) as store:
            store.input_size = input_size
            yield store


def _open_file(path: Path) -> BinaryIO:
    try:
        return open_regular(path)
    except FileNotFoundError as exc:
        raise UsageError(f"{path} does not exist") from exc
    except IsADirectoryError as exc:
        raise UsageError(f"{path} is a directory; a docker archive is a tar file") from exc
    except OSError as exc:
        raise UsageError(f"{path} cannot be read: {exc.strerror}") from exc


@contextmanager
def _indexed(plain: BinaryIO, path: Path) -> Iterator[ArchiveStore]:
    """Every member header of a plain archive, read once (seeking past the data); blobs are read on demand."""
    reader = TarReader(plain, os.fstat(plain.fileno()).st_size)
    members = {_normal(m.name): m for m in _members(reader, path)}
    yield ArchiveStore(path, plain, members)


def _members(reader: TarReader, path: Path) -> Iterator[Entry]:
    """The archive's members, at most MAX_MEMBERS of them, each refused if its header is (see tarread).

    A member is yielded before its data is skipped, so a streamed reader can check the size it declares first."""
    count = 0
    while True:
        try:
            member = reader.next()
        except TarFormatError as exc:
            raise ImageError(f"{path} is not a readable tar archive: {exc}") from exc
        if member is None:
            return
        count += 1
        if count > MAX_MEMBERS:
            raise ImageError(f"{path} has more than {MAX_MEMBERS} members; no docker archive has that many")
        if member.runs is not None:
            raise ImageError(f"{path}: member {member.name!r} is a sparse file; no docker archive holds one")
        yield member


def _keep_members(source: BinaryIO, compression: str, path: Path, kept: Path) -> None:
    """Stream the decompressed archive once, copying into *kept* (a plain tar) the members a manifest could name.

    Nothing is kept or even inflated beyond MAX_RATIO times the compressed size (see the module docstring), and a
    member declaring more than what is left of that is refused at its header, before its data is read.
    """
    limit = os.fstat(source.fileno()).st_size * MAX_RATIO + _RATIO_SLACK
    plain = _Inflated(source, compression, limit, path)
    reader = TarReader(plain)  # type: ignore[arg-type]  # (a RawIOBase: read is all it needs)
    with kept.open("wb") as sink, tarfile.open(fileobj=sink, mode="w", format=tarfile.PAX_FORMAT) as out:
        for member in _members(reader, path):
            if member.stored > limit - plain.count:
                raise ImageError(f"{path}: member {member.name!r} declares {member.stored} bytes, more than the "
                                 f"archive can hold at {MAX_RATIO} times its compressed size")
            if _wanted(member):
                _keep(reader, member, out, path)


def _wanted(member: tarfile.TarInfo) -> bool:
    """Regular files and links a manifest.json could name: the bookkeeping of the known writers is not kept."""
    if not (member.isreg() or member.issym() or member.islnk()):
        return False
    return not _BOOKKEEPING.match(_normal(member.name))


def _keep(reader: TarReader, member: Entry, out: tarfile.TarFile, path: Path) -> None:
    # A fresh header with only what the store reads: name, type, link target, size.
    info = tarfile.TarInfo(member.name)
    info.type = tarfile.REGTYPE if member.isreg() else member.type
    info.linkname = member.linkname
    info.size = member.size if member.isreg() else 0
    try:
        out.addfile(info, reader.extractfile(member) if member.isreg() else None)
    except TarFormatError as exc:
        raise ImageError(f"{path} is not a readable tar archive: {exc}") from exc
    except OSError as exc:
        raise ToolError(f"cannot keep {member.name!r} of {path} in scratch space: {exc.strerror}") from exc
    out.members.clear()  # type: ignore[attr-defined]


class _Slice(io.RawIOBase):
    """A member's data in the archive file, read in place (pread: members share the file's descriptor)."""

    def __init__(self, fd: int, start: int, size: int) -> None:
        super().__init__()
        self.fd, self.start, self.size, self.pos = fd, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self.size - self.pos)
        if n <= 0:
            return 0
        data = os.pread(self.fd, n, self.start + self.pos)
        memoryview(buffer)[:len(data)] = data
        self.pos += len(data)
        return len(data)


class _Inflated(io.RawIOBase):
    """The decompressed archive, refused the moment it inflates past *limit* bytes."""

    def __init__(self, source: BinaryIO, compression: str, limit: int, path: Path) -> None:
        super().__init__()
        self._errors: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error, ValueError)
        self._inner: BinaryIO
        if compression == "gzip":
            self._inner = gzip.GzipFile(fileobj=source, mode="rb")  # type: ignore[assignment]
        else:
            import zstandard

            self._inner = zstandard.ZstdDecompressor().stream_reader(source, read_across_frames=True)
            self._errors += (zstandard.ZstdError,)
        self._compression, self._limit, self._path = compression, limit, path
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        try:
            data = self._inner.read(min(len(buffer), self._limit - self.count + 1))
        except self._errors as exc:
            raise ImageError(f"{self._path}: corrupt {self._compression} data: {exc}") from exc
        self.count += len(data)
        if self.count > self._limit:
            raise ImageError(f"{self._path} inflates to more than {MAX_RATIO} times its size, which no saved image "
                             "does (decompress it first to read it anyway)")
        memoryview(buffer)[:len(data)] = data
        return len(data)


def _image(store: ArchiveStore, name: DockerName | None, position: int | None, platform: Platform | None,
           source: str) -> Image:
    path = store.path
    if "manifest.json" not in store.members:
        raise ImageError(f"{path} is not a docker archive (no manifest.json)")
    raw = _read_json_member(store, "manifest.json", MANIFEST_MAX)
    try:
        entries = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ImageError(f"{path}: manifest.json is not valid JSON: {exc}") from exc
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise ImageError(f"{path}: manifest.json holds no images")
    entry = _select(entries, name, position, path)
    manifest = _synthesise(store, entry, path)
    return from_manifest(store, manifest, source, platform)


def _read_json_member(store: ArchiveStore, name: str, cap: int) -> bytes:
    """A JSON document of the archive, read only if parsing it whole costs memory in proportion to the archive: no
    larger than *cap* nor than the archive file (or 64 KiB), and with no more JSON values than a real document of
    its size has (an empty object takes 3 bytes to write and about 25 times that once parsed)."""
    size = store.member_size(name)
    if size > cap or size > max(_JSON_SMALL, store.input_size):
        raise ImageError(f"{store.path}: {name} is implausibly large ({size} bytes, in an archive of "
                         f"{store.input_size})")
    with store.member_stream(name) as stream:
        raw = stream.read()
    values = raw.count(b",") + raw.count(b"{") + raw.count(b"[")
    if values > 4096 + len(raw) // 16:
        raise ImageError(f"{store.path}: {name} holds implausibly many JSON values ({values} in {len(raw)} bytes)")
    return raw


def _select(entries: list[dict[str, Any]], name: DockerName | None, position: int | None, path: Path) -> dict[str, Any]:
    if position is not None:
        if position >= len(entries):
            raise ImageError(f"{path} holds {len(entries)} images; there is no @{position}")
        return entries[position]
    tags = [t for e in entries for t in _repo_tags(e)]
    if name is None:
        if len(entries) == 1:
            return entries[0]
        raise ImageError(
            f"{path} holds {len(entries)} images; name one as docker-archive:PATH:NAME:TAG or :@N "
            f"(tags: {', '.join(tags) or 'none'})"
        )
    for entry in entries:
        for tag in _repo_tags(entry):
            try:
                if parse_docker_name(tag) == name:
                    return entry
            except ReferenceError_:
                continue  # a tag Docker would not have written: it names nothing the user can ask for
    raise ImageError(f"no image tagged {name.familiar()} in {path} (tags: {', '.join(tags) or 'none'})")


def _repo_tags(entry: dict[str, Any]) -> list[str]:
    tags = entry.get("RepoTags")
    return [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else []


def _synthesise(store: ArchiveStore, entry: dict[str, Any], path: Path) -> Manifest:
    config_name = entry.get("Config")
    layer_names = entry.get("Layers")
    if not isinstance(config_name, str) or not isinstance(layer_names, list):
        raise ImageError(f"{path}: manifest.json entry lacks Config or Layers")
    config_name = _normal(config_name)
    if config_name not in store.members:
        raise BlobError(f"{path}: config {config_name} is missing")
    config_raw = _read_json_member(store, config_name, CONFIG_MAX)
    named = _HEX_NAME.search(config_name)
    config_digest = f"sha256:{named.group(1)}" if named else None
    actual = "sha256:" + hashlib.sha256(config_raw).hexdigest()
    if config_digest is not None and actual != config_digest:
        raise BlobError(f"{path}: config {config_name} has digest {actual}, expected {config_digest}")
    store.by_digest[actual] = config_name
    config_doc = load_json(config_raw, f"{path}: config {config_name}")
    rootfs = config_doc.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list):
        diff_ids = []  # from_manifest refuses the config with a proper message
    layers: list[Descriptor] = []
    for i, member in enumerate(layer_names):
        if not isinstance(member, str):
            raise ImageError(f"{path}: manifest.json layer {i} is not a path")
        member = _normal(member)
        if member not in store.members:
            raise BlobError(f"{path}: layer {i} ({member}) is missing")
        with store.member_stream(member) as stream:
            compression = sniff_compression(stream.read(4))
        named = _HEX_NAME.search(member)
        if named and member.startswith("blobs/"):
            digest = f"sha256:{named.group(1)}"  # content-addressed (Docker 25+ archives)
        elif compression == "none" and i < len(diff_ids) and isinstance(diff_ids[i], str):
            digest = diff_ids[i]  # uncompressed: the blob *is* the diff, checked as it is read
        else:
            digest = _hash_member(store, member)
        store.by_digest[digest] = member
        layers.append(Descriptor(_LAYER_TYPE[compression], digest, store.member_size(member)))
    config = Descriptor(MediaType.DOCKER_CONFIG, actual, len(config_raw))
    return Manifest(MediaType.DOCKER_MANIFEST, config, tuple(layers), raw=None)


def _hash_member(store: ArchiveStore, member: str) -> str:
    digest = hashlib.sha256()
    with store.member_stream(member) as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def write_archive(built: Built, repo_tags: list[str], dest: Path) -> None:
    """Pack *built*'s layout plus `manifest.json` into *dest*, atomically (temp file, then rename)."""
    blob_dir = built.layout / "blobs" / "sha256"
    entry = [{
        "Config": f"blobs/sha256/{built.config.digest.removeprefix('sha256:')}",
        "RepoTags": repo_tags,
        "Layers": [f"blobs/sha256/{d.digest.removeprefix('sha256:')}" for d in built.layers],
    }]
    fd, temp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    temp = Path(temp_name)
    try:
        with open(fd, "wb") as out, tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            def add_bytes(name: str, data: bytes) -> None:
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))

            for name in ("oci-layout", "index.json"):
                add_bytes(name, (built.layout / name).read_bytes())
            for desc in [built.manifest, built.config, *built.layers]:
                blob = blob_dir / desc.digest.removeprefix("sha256:")
                info = tarfile.TarInfo(f"blobs/sha256/{blob.name}")
                info.size, info.mode, info.mtime = blob.stat().st_size, 0o644, 0
                with blob.open("rb") as f:
                    tar.addfile(info, f)
            add_bytes("manifest.json", json.dumps(entry).encode())
        temp.replace(dest)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
