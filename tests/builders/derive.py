"""A new image made from an existing OCI layout's image plus layers on top, as `docker build` makes one
`FROM` another: the same blobs below, a new config and manifest."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.builders.oci import OCI_CONFIG, OCI_MANIFEST, REF_NAME, Layout, sha256


def _blob(root: Path, digest: str) -> bytes:
    return (root / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()


def derived(source: Path, dest: Path, layers: Sequence[bytes], *, config: Mapping[str, Any] | None = None,
            created: str | None = None, tag: str = "latest") -> dict[str, Any]:
    """An OCI layout at *dest* holding one image, tagged *tag*: the only image of the layout *source* with
    *layers* (uncompressed tars, gzip-compressed here) added on top; *config* entries replace those of the
    image config's ``config``; *created* its ``created``. Returns the new config document."""
    index = json.loads((source / "index.json").read_text())
    manifest = json.loads(_blob(source, index["manifests"][0]["digest"]))
    doc = json.loads(_blob(source, manifest["config"]["digest"]))
    shutil.copytree(source / "blobs", dest / "blobs", dirs_exist_ok=True)
    out = Layout(dest)
    added = [out.layer(tar) for tar in layers]
    doc["rootfs"]["diff_ids"] = [*doc["rootfs"]["diff_ids"], *(diff for _, diff in added)]
    doc["config"] = {**doc.get("config", {}), **(config or {})}
    doc["history"] = [*doc.get("history", []), *({"created_by": "imgconv test layer"} for _ in added)]
    if created is not None:
        doc["created"] = created
    config_bytes = json.dumps(doc).encode()
    new_manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": out.blob(config_bytes, OCI_CONFIG),
                    "layers": [*manifest["layers"], *(desc for desc, _ in added)]}
    desc = out.blob(json.dumps(new_manifest).encode(), OCI_MANIFEST, annotations={REF_NAME: tag})
    out.index(desc)
    assert desc["digest"] == sha256(_blob(dest, desc["digest"]))
    return doc
