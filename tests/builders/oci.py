"""OCI image layouts written to a directory, good or deliberately broken: blobs as you go, index.json on request."""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
REF_NAME = "org.opencontainers.image.ref.name"


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
