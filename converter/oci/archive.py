"""`docker-archive:PATH[:NAME:TAG]`: the tarball `docker save` writes and `docker load` reads.

Reading accepts both shapes Docker has written: the legacy one (`<id>/layer.tar`, `<hex>.json`)
and the Docker 25+ one (an OCI layout plus `manifest.json`). `manifest.json` is the common
ground, so it is what selects the image. A legacy archive has no registry manifest: the image
is described by a synthesised one whose layer digests are the diff_ids, which the layer
verifier checks.

Writing produces an archive that is both: an OCI layout with a `manifest.json` beside it.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from converter.errors import BlobError, ImageError, ReferenceError_, UsageError
from converter.oci.blobs import open_layer_stream, sniff_compression
from converter.oci.image import Image, from_manifest
from converter.oci.model import (
    Descriptor,
    Manifest,
    MediaType,
    Platform,
    load_json,
)
from converter.oci.reference import DockerName, Reference, parse_docker_name
from converter.scratch import scratch_dir

if TYPE_CHECKING:
    from converter.oci.transport import Built

_HEX_NAME = re.compile(r"(?:^|/)(?:blobs/sha256/)?([a-f0-9]{64})(?:\.json)?$")

_MAX_LINK_HOPS = 16

_LAYER_TYPE = {"none": MediaType.DOCKER_LAYER, "gzip": MediaType.DOCKER_LAYER_GZIP,
               "zstd": MediaType.OCI_LAYER_ZSTD}


class ArchiveStore:
    """Blobs are tar members; the synthesised digests map to member names."""

    def __init__(self, path: Path, tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo]) -> None:
        self.path = path
        self.tar = tar
        self.members = members
        self.by_digest: dict[str, str] = {}

    def resolve(self, name: str) -> tarfile.TarInfo:
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
        stream = self.tar.extractfile(self.resolve(name))
        if stream is None:
            raise BlobError(f"{name} in {self.path} is not a regular file")
        return stream  # type: ignore[return-value]

    def open_blob(self, digest: str) -> BinaryIO:
        name = self.by_digest.get(digest)
        if name is None:
            raise BlobError(f"blob {digest} is missing from {self.path}")
        return self.member_stream(name)

    def describe(self) -> str:
        return f"docker archive {self.path}"

    def member_size(self, name: str) -> int:
        return self.resolve(name).size

    def close(self) -> None:
        self.tar.close()


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
    open, and a decompressed copy exists, only as long as the block."""
    with scratch_dir() as scratch:
        store = _open_store(path, scratch)
        try:
            yield _image(store, name, position, platform, source)
        finally:
            store.close()


def _open_store(path: Path, scratch: Path) -> ArchiveStore:
    path = _plain_archive(path, scratch)
    try:
        tar = tarfile.open(path, "r:")
        members = {_normal(m.name): m for m in tar.getmembers()}
    except (tarfile.TarError, OSError) as exc:
        raise ImageError(f"{path} is not a readable tar archive: {exc}") from None
    return ArchiveStore(path, tar, members)


def _image(store: ArchiveStore, name: DockerName | None, position: int | None, platform: Platform | None,
           source: str) -> Image:
    path = store.path
    if "manifest.json" not in store.members:
        raise ImageError(f"{path} is not a docker archive (no manifest.json)")
    raw = _read_member(store, "manifest.json", limit=16 << 20)
    try:
        entries = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ImageError(f"{path}: manifest.json is not valid JSON: {exc}") from None
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise ImageError(f"{path}: manifest.json holds no images")
    entry = _select(entries, name, position, path)
    manifest = _synthesise(store, entry, path)
    return from_manifest(store, manifest, source, platform)


def _plain_archive(path: Path, scratch: Path) -> Path:
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a directory; a docker archive is a tar file") from None
    except OSError as exc:
        raise UsageError(f"{path} cannot be read: {exc.strerror}") from None
    compression = sniff_compression(head)
    if compression == "none":
        return path
    # `docker save | gzip` is common and `docker load` accepts it; tar needs random access, so
    # decompress once into scratch space (disk, not memory).
    plain = scratch / "archive.tar"
    with open_layer_stream(lambda: path.open("rb"), digest=None, size=None, compression=compression,
                           diff_id=None, what=str(path)) as stream, plain.open("wb") as out:
        shutil.copyfileobj(stream, out, 1 << 20)
    return plain


def _read_member(store: ArchiveStore, name: str, limit: int) -> bytes:
    if store.member_size(name) > limit:
        raise ImageError(f"{store.path}: {name} is implausibly large")
    with store.member_stream(name) as stream:
        return stream.read()


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
    config_raw = _read_member(store, config_name, limit=64 << 20)
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
