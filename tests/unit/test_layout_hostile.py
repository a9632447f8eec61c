"""Hostile OCI layouts (issue 9 item 13, the layout half), through the real console script: a blob or index.json
that is not a regular file is refused with one `imgconv: error:` line and exit 2, at once (a FIFO blocked the
open for ever); symlinks are followed inside the layout only."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest

from tests.cli import Ran, assert_one_line_error, imgconv

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"


def inspect(root: Path, *extra: str) -> Ran:
    return imgconv("inspect", "--quiet", f"oci:{root}", *extra, timeout=30)


def _layer() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("etc/hostname")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"box\n"))
    return out.getvalue()


def _blob(root: Path, data: bytes, media_type: str) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    (root / "blobs" / "sha256" / digest).write_bytes(data)
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}


def layout(root: Path) -> dict[str, Path]:
    """A one-layer image in a layout at *root*; returns the paths of its blobs by role."""
    (root / "blobs" / "sha256").mkdir(parents=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    layer = _layer()
    layer_desc = _blob(root, layer, OCI_LAYER)
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]}}).encode()
    config_desc = _blob(root, config, OCI_CONFIG)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config_desc,
                           "layers": [layer_desc]}).encode()
    manifest_desc = _blob(root, manifest, OCI_MANIFEST)
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [manifest_desc]}))
    blob = root / "blobs" / "sha256"
    return {role: blob / str(desc["digest"]).removeprefix("sha256:")
            for role, desc in (("layer", layer_desc), ("config", config_desc), ("manifest", manifest_desc))}


@pytest.mark.parametrize("role", ["layer", "config", "manifest", "index"])
def test_a_fifo_in_the_layout_is_refused_without_blocking(tmp_path: Path, role: str) -> None:
    root = tmp_path / "layout"
    paths = {**layout(root), "index": root / "index.json"}
    paths[role].unlink()
    os.mkfifo(paths[role])
    ran = inspect(root)
    assert_one_line_error(ran, "FIFO", "not a regular file")
    assert ran.seconds < 20, ran.describe()


def test_a_device_as_a_blob_is_refused(tmp_path: Path) -> None:
    # Inside the layout by name, a device by what it is (a symlink to /dev/zero is refused as leaving the layout).
    root = tmp_path / "layout"
    layer = layout(root)["layer"]
    layer.unlink()
    try:
        os.mknod(layer, 0o600 | 0o020000, os.makedev(1, 5))  # /dev/zero's numbers
    except PermissionError:
        pytest.skip("making a device node needs CAP_MKNOD")
    assert_one_line_error(inspect(root), "character device", "not a regular file")


def test_a_symlinked_blob_inside_the_layout_is_read(tmp_path: Path) -> None:
    root = tmp_path / "layout"
    layer = layout(root)["layer"]
    (root / "shared").mkdir()
    layer.rename(root / "shared" / "layer.tar")
    layer.symlink_to("../../shared/layer.tar")
    assert inspect(root, "--json").ok().json["layers"][0]["size"] == (root / "shared" / "layer.tar").stat().st_size


@pytest.mark.parametrize("role", ["layer", "index"])
def test_a_symlink_leading_out_of_the_layout_is_refused(tmp_path: Path, role: str) -> None:
    # The host file has exactly the right content: it is still no part of the image.
    root = tmp_path / "layout"
    paths = {**layout(root), "index": root / "index.json"}
    outside = tmp_path / "host-file"
    paths[role].rename(outside)
    paths[role].symlink_to(outside)
    assert_one_line_error(inspect(root), "out of the layout")


def test_a_symlink_to_a_fifo_outside_the_layout_is_refused_without_blocking(tmp_path: Path) -> None:
    root = tmp_path / "layout"
    layer = layout(root)["layer"]
    os.mkfifo(tmp_path / "fifo")
    layer.unlink()
    layer.symlink_to(tmp_path / "fifo")
    assert_one_line_error(inspect(root), "out of the layout")


def test_an_oversized_index_json_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "layout"
    layout(root)
    with (root / "index.json").open("ab") as f:
        f.truncate(17 << 20)  # valid JSON then NULs: never read whole
    assert_one_line_error(inspect(root), "index.json", "larger than")
