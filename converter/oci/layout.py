"""The OCI image layout (`oci:DIR[:TAG]`): the transport in both directions.

Reading resolves `index.json` by the `org.opencontainers.image.ref.name` annotation. Writing is
append-only for blobs and atomic for `index.json`, so a reader never sees a half-written image
and an interrupted write leaves the previous state. A delivered image is complete or absent: a
new layout is staged beside its final name and renamed into place; an existing one gets its blobs
first and its `index.json` replaced last, under a lock so that concurrent writers lose no tag.

A layout is untrusted input: its `index.json` and blobs are read only if they are regular files
(a FIFO would block the open for ever) reached without leaving the layout (:func:`open_inside`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from converter.artifact import atomic_write
from converter.errors import BlobError, ImageError, UsageError
from converter.oci.image import Image, resolve
from converter.oci.localfile import NotRegularFile, open_regular
from converter.oci.model import Descriptor, Index, MediaType, Platform, canonical_json, sha256_digest
from converter.oci.reference import Reference

if TYPE_CHECKING:
    from converter.oci.transport import Built

REF_NAME = "org.opencontainers.image.ref.name"
LAYOUT_FILE = {"imageLayoutVersion": "1.0.0"}
INDEX_MAX = 16 << 20  # as for the other JSON documents of an image (manifest.json of an archive)


class LayoutStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def blob_path(self, digest: str) -> Path:
        algorithm, _, hexpart = digest.partition(":")
        return self.root / "blobs" / algorithm / hexpart

    def open_blob(self, digest: str) -> BinaryIO:
        try:
            return open_inside(self.root, self.blob_path(digest))
        except FileNotFoundError as exc:
            raise BlobError(f"blob {digest} is missing from {self.root}") from exc
        except OSError as exc:
            raise BlobError(f"blob {digest} in {self.root} cannot be read: {exc.strerror}") from exc

    def describe(self) -> str:
        return f"OCI layout {self.root}"


def check_layout(root: Path) -> None:
    if not root.is_dir():
        raise UsageError(f"{root} does not exist or is not a directory")
    marker = root / "oci-layout"
    if not marker.is_file():
        raise ImageError(f"{root} is not an OCI image layout (no oci-layout file)")


def open_inside(root: Path, path: Path) -> BinaryIO:
    """*path*, a file of the layout at *root*, opened if it is a regular file (never blocking on a FIFO) and, when
    symlinks lead to it, if it stays inside the layout.

    A blob's content is verified against its digest whatever the file is, so a symlink inside the layout (a
    layout deduplicated by hand) is harmless and followed; one leading out of it would make imgconv read, and
    report the digest and size of, a file of the host that is no part of the image: refused.
    """
    real, inside = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, inside]) != inside:
        raise NotRegularFile(errno.EXDEV, "it is a symlink leading out of the layout", str(path))
    return open_regular(path)


def read_index(root: Path) -> Index:
    try:
        with open_inside(root, root / "index.json") as f:
            raw = f.read(INDEX_MAX + 1)
    except FileNotFoundError as exc:
        raise ImageError(f"{root} is not an OCI image layout (no index.json)") from exc
    except OSError as exc:
        raise ImageError(f"{root}/index.json cannot be read: {exc.strerror}") from exc
    if len(raw) > INDEX_MAX:
        raise ImageError(f"{root}/index.json is larger than {INDEX_MAX} bytes, more than any image index needs")
    return Index.parse(raw, f"{root}/index.json")


def select_tagged(index: Index, tag: str | None, where: str) -> Descriptor:
    if tag is None:
        if len(index.manifests) == 1:
            return index.manifests[0]
        tags = sorted(d.annotations.get(REF_NAME, "?") for d in index.manifests)
        if not tags:
            raise ImageError(f"{where} holds no images")
        raise ImageError(f"{where} holds {len(tags)} images; name one with :TAG (tags: {', '.join(tags)})")
    for desc in index.manifests:
        if desc.annotations.get(REF_NAME) == tag:
            return desc
    tags = sorted(d.annotations[REF_NAME] for d in index.manifests if REF_NAME in d.annotations)
    raise ImageError(f"no image tagged {tag!r} in {where} (tags: {', '.join(tags) or 'none'})")


def open_layout(root: Path, tag: str | None, platform: Platform | None, source: str) -> Image:
    check_layout(root)
    top = select_tagged(read_index(root), tag, f"OCI layout {root}")
    return resolve(LayoutStore(root), top, platform, source)


class LayoutWriter:
    """Builds an OCI layout. Blobs are written beside their final name and renamed into place."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.store = LayoutStore(root)
        (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        marker = root / "oci-layout"
        if not marker.exists():
            atomic_write(marker, json.dumps(LAYOUT_FILE).encode(), mode=0o600)

    def temp_blob(self) -> tuple[BinaryIO, Path]:
        """An open temporary file inside the blob directory, for streamed blobs (see :meth:`commit_blob`)."""
        fd, name = tempfile.mkstemp(prefix=".tmp-", dir=self.root / "blobs" / "sha256")
        return os.fdopen(fd, "wb"), Path(name)

    def commit_blob(self, temp: Path, digest: str) -> None:
        os.replace(temp, self.store.blob_path(digest))

    def add_bytes(self, data: bytes, media_type: str) -> Descriptor:
        digest = sha256_digest(data)
        path = self.store.blob_path(digest)
        if not path.exists():
            atomic_write(path, data, mode=0o600)
        return Descriptor(media_type, digest, len(data))

    def add_manifest(self, manifest: bytes, media_type: str, tag: str | None) -> Descriptor:
        """Store the manifest blob and point `index.json` at it (replacing an entry with the same tag)."""
        desc = self.add_bytes(manifest, media_type)
        entries: list[dict[str, object]] = []
        index_path = self.root / "index.json"
        if index_path.exists():
            current = read_index(self.root)
            entries = [d.to_json() for d in current.manifests
                       if tag is None or d.annotations.get(REF_NAME) != tag]
        entry = desc.to_json()
        if tag:
            entry["annotations"] = {REF_NAME: tag}
        entries.append(entry)
        index = {"schemaVersion": 2, "mediaType": MediaType.OCI_INDEX, "manifests": entries}
        atomic_write(index_path, canonical_json(index), mode=0o600)
        return desc


class LayoutTransport:
    """`oci:DIR[:TAG]`."""

    @contextmanager
    def open(self, ref: Reference, *, platform: Platform | None, tls_verify: bool) -> Iterator[Image]:
        yield open_layout(_root(ref), ref.tag, platform, str(ref))

    def check_destination(self, ref: Reference, force: bool) -> None:
        # An existing layout gains an image (a tag moves), so --force has nothing to allow.
        root = _root(ref)
        if root.exists():
            check_layout(root)
        elif not root.parent.is_dir():
            raise UsageError(f"the directory of {root} does not exist")

    def write(self, built: Built, ref: Reference, *, tls_verify: bool, scratch: Path) -> str | None:
        _into_layout(built, _root(ref), ref.tag)
        return built.manifest.digest


TRANSPORT = LayoutTransport()


def _root(ref: Reference) -> Path:
    assert ref.path is not None  # parse_reference sets it for every oci: reference
    return Path(ref.path)


def _into_layout(built: Built, root: Path, tag: str | None) -> None:
    if not root.exists():
        # A fresh layout: staged beside its final name under a private name, tagged there, and renamed into
        # place at once. Another writer may have made it meanwhile: then the image is added to theirs.
        staged = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".imgconv-staging", dir=root.parent))
        try:
            shutil.copytree(built.layout, staged, dirs_exist_ok=True)
            writer = LayoutWriter(staged)
            manifest_raw = writer.store.blob_path(built.manifest.digest).read_bytes()
            _retag(writer, manifest_raw, built.manifest.media_type, tag)
            try:
                os.rename(staged, root)
                return
            except OSError:
                if not root.is_dir():
                    raise
            check_layout(root)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
    _add_to_layout(built, root, tag)


def _add_to_layout(built: Built, root: Path, tag: str | None) -> None:
    """Blobs first (each under a private temporary name), then index.json, under a lock so that concurrent
    imgconv runs adding to one layout do not lose each other's tags."""
    target = LayoutWriter(root)
    for desc in (built.config, *built.layers, built.manifest):
        dest = target.store.blob_path(desc.digest)
        if dest.exists():
            continue
        fd, name = tempfile.mkstemp(prefix=f".{dest.name[:16]}.", suffix=".imgconv-tmp", dir=dest.parent)
        os.close(fd)
        try:
            shutil.copyfile(built.layout / "blobs" / "sha256" / desc.digest.removeprefix("sha256:"), name)
            os.replace(name, dest)
        finally:
            Path(name).unlink(missing_ok=True)
    # Read back from the private layout: the destination's file may be one that was there before (and anything).
    manifest_raw = LayoutStore(built.layout).blob_path(built.manifest.digest).read_bytes()
    with _locked(root):
        target.add_manifest(manifest_raw, built.manifest.media_type, tag)


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _retag(writer: LayoutWriter, manifest_raw: bytes, media_type: str, tag: str | None) -> None:
    index = writer.root / "index.json"
    index.unlink(missing_ok=True)
    writer.add_manifest(manifest_raw, media_type, tag)
