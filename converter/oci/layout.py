"""The OCI image layout (`oci:DIR[:TAG]`): read and write.

Reading resolves `index.json` by the `org.opencontainers.image.ref.name` annotation. Writing is
append-only for blobs and atomic for `index.json`, so a reader never sees a half-written image
and an interrupted write leaves the previous state.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import BinaryIO

from converter.errors import BlobError, ImageError, UsageError
from converter.oci.image import Image, resolve
from converter.oci.model import Descriptor, Index, MediaType, Platform, canonical_json, sha256_digest

REF_NAME = "org.opencontainers.image.ref.name"
LAYOUT_FILE = {"imageLayoutVersion": "1.0.0"}


class LayoutStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def blob_path(self, digest: str) -> Path:
        algorithm, _, hexpart = digest.partition(":")
        return self.root / "blobs" / algorithm / hexpart

    def open_blob(self, digest: str) -> BinaryIO:
        try:
            return self.blob_path(digest).open("rb")
        except FileNotFoundError:
            raise BlobError(f"blob {digest} is missing from {self.root}") from None
        except OSError as exc:
            raise BlobError(f"blob {digest} in {self.root} cannot be read: {exc.strerror}") from None

    def describe(self) -> str:
        return f"OCI layout {self.root}"


def check_layout(root: Path) -> None:
    if not root.is_dir():
        raise UsageError(f"{root} does not exist or is not a directory")
    marker = root / "oci-layout"
    if not marker.is_file():
        raise ImageError(f"{root} is not an OCI image layout (no oci-layout file)")


def read_index(root: Path) -> Index:
    try:
        raw = (root / "index.json").read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{root} is not an OCI image layout (no index.json)") from None
    except OSError as exc:
        raise ImageError(f"{root}/index.json cannot be read: {exc.strerror}") from None
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
            atomic_write(marker, json.dumps(LAYOUT_FILE).encode())

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
            atomic_write(path, data)
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
        atomic_write(index_path, canonical_json(index))
        return desc


def atomic_write(path: Path, data: bytes) -> None:
    fd, name = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
