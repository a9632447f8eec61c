"""Versions through a registry (issue 12 item 5): `imgconv store push` makes a KubeVirt containerDisk with the
statement beside it, `store pull` brings it into another store with the same sha256.

The pushed image is judged by tools other than imgconv: skopeo (its manifest, config and one layer), umoci (the
unpacked file's path, owner, mode and bytes) and hashlib. Images a hostile registry could serve instead are made
here by hand (tarfile, json, hashlib: not imgconv's writer) and pushed with skopeo; pulling them is refused in
one line, exit 2. One busybox conversion into a store (about 30 s under TCG); the rest is registry traffic.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.cli import Ran, assert_one_line_error, imgconv
from tests.world import FixtureImage, Registry

pytestmark = [pytest.mark.appliance, pytest.mark.docker, pytest.mark.registry]

NO_TLS = "--no-tls-verify"
Member = tuple[tarfile.TarInfo, bytes | None]  # a tar header and the file's bytes


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def skopeo(*args: str) -> str:
    return subprocess.run(["skopeo", *args], capture_output=True, text=True, check=True, timeout=300).stdout


@dataclass
class Pushed:
    store: Path  # the store the version was made in
    sha256: str  # the version's
    image: str  # docker://... it was pushed to
    ran: Ran  # the push

    def run(self, *args: str, store: Path | None = None) -> Ran:
        return imgconv("--store", str(store or self.store), *args, timeout=600)


@pytest.fixture(scope="module")
def pushed(fixture_image: Callable[[str], FixtureImage], registry: Registry,
           tmp_path_factory: pytest.TempPathFactory) -> Pushed:
    root = tmp_path_factory.mktemp("store-push") / "store"
    source = fixture_image("busybox").oci_ref
    record = imgconv("--store", str(root), "oci-to-qcow2", "--quiet", "--json", source, "store:app:v1",
                     timeout=900).ok().json
    image = registry.ref("disks/app", "v1")
    ran = imgconv("--store", str(root), "store", "push", NO_TLS, "--json", "app:v1", image, timeout=600).ok()
    return Pushed(root, record["sha256"], image, ran)


def test_a_pushed_version_is_a_containerdisk_judged_by_skopeo_and_umoci(pushed: Pushed, tmp_path: Path) -> None:
    manifest = json.loads(skopeo("inspect", "--raw", "--tls-verify=false", pushed.image))
    assert len(manifest["layers"]) == 1, manifest
    config = json.loads(skopeo("inspect", "--config", "--raw", "--tls-verify=false", pushed.image))
    assert config["rootfs"]["diff_ids"] and config["os"] == "linux"
    layout = tmp_path / "layout"
    skopeo("copy", "--quiet", "--src-tls-verify=false", pushed.image, f"oci:{layout}:v1")
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:v1", str(bundle)], check=True, capture_output=True,
                   timeout=300)
    files = sorted(str(p.relative_to(bundle / "rootfs")) for p in (bundle / "rootfs").rglob("*"))
    assert files == ["disk", "disk/app.qcow2"], files
    disk = bundle / "rootfs" / "disk" / "app.qcow2"
    st = disk.lstat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (107, 107, 0o440)
    assert sha256_file(disk) == pushed.sha256
    assert pushed.ran.json["manifest_digest"] == "sha256:" + hashlib.sha256(
        skopeo("inspect", "--raw", "--tls-verify=false", pushed.image).encode()).hexdigest()


def test_the_statement_is_a_second_tag_named_by_the_disk_images_digest(pushed: Pushed) -> None:
    digest = pushed.ran.json["manifest_digest"]
    tag = pushed.ran.json["statement_tag"]
    assert tag == f"sha256-{digest.removeprefix('sha256:')}.intoto"
    repo = pushed.image.rsplit(":", 1)[0]
    manifest = json.loads(skopeo("inspect", "--raw", "--tls-verify=false", f"{repo}:{tag}"))
    [layer] = manifest["layers"]
    assert layer["mediaType"] == "application/vnd.in-toto+json"
    hex_digest = pushed.sha256.removeprefix("sha256:")
    local = (pushed.store / "objects" / "sha256" / f"{hex_digest}.intoto.json").read_bytes()
    assert layer["digest"] == "sha256:" + hashlib.sha256(local).hexdigest()
    assert json.loads(local)["subject"][0]["digest"]["sha256"] == hex_digest


def test_pull_into_another_store_gives_the_same_sha256_and_a_version_that_verifies(pushed: Pushed,
                                                                                    tmp_path: Path) -> None:
    other = tmp_path / "other-store"
    ran = imgconv("store", "pull", NO_TLS, "--json", pushed.image, "copy:v1", env={"IMGCONV_STORE": str(other)},
                  timeout=600).ok()
    assert ran.json["sha256"] == pushed.sha256
    [tag] = [t for t in pushed.run("store", "list", "--json", store=other).ok().json]
    assert (tag["name"], tag["tag"], tag["sha256"]) == ("copy", "v1", pushed.sha256)
    obj = other / "objects" / "sha256" / pushed.sha256.removeprefix("sha256:")
    assert sha256_file(obj) == pushed.sha256
    verified = pushed.run("verify", str(obj), store=other)
    assert verified.code == 0, verified.describe()


# -- images a registry could serve instead ------------------------------------------------------------------------


def _blob(layout: Path, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def handmade_image(layout: Path, members: list[Member], sidecar: dict[str, Any] | None = None) -> str:
    """An OCI layout of one gzip layer holding *members* (and *sidecar* as the label store push writes), written
    with the standard library only."""
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    layer = _blob(layout, gzip.compress(plain.getvalue(), mtime=0))
    labels = {"io.imgconv.sidecar": json.dumps(sidecar)} if sidecar is not None else {}
    config = _blob(layout, json.dumps({"architecture": "amd64", "os": "linux", "config": {"Labels": labels},
                                       "rootfs": {"type": "layers", "diff_ids": [
                                           "sha256:" + hashlib.sha256(plain.getvalue()).hexdigest()]}}).encode())
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **layer}]})
    top = _blob(layout, manifest.encode())
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", **top,
         "annotations": {"org.opencontainers.image.ref.name": "x"}}]}))
    return f"oci:{layout}:x"


def _file(name: str, data: bytes, kind: bytes = tarfile.REGTYPE, link: str = "") -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.uid, info.gid, info.mode = kind, link, 107, 107, 0o440
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        return info, data
    return info, None


QCOW2 = b"QFI\xfb" + bytes(508)


@pytest.mark.parametrize(("case", "members", "needle"), [
    ("second-file", [_file("disk/a.qcow2", QCOW2), _file("disk/b.qcow2", QCOW2)], "a second disk /disk/b.qcow2"),
    ("symlink", [_file("disk/a.qcow2", b"", tarfile.SYMTYPE, "/etc/shadow")], "a link"),
    ("escape", [_file("disk/../../etc/a.qcow2", QCOW2)], "not a containerDisk"),
    ("other-file", [_file("disk/a.qcow2", QCOW2), _file("etc/passwd", b"root::0:0::/:/bin/sh\n")], "/etc/passwd"),
    ("not-qcow2", [_file("disk/a.qcow2", b"#!/bin/sh\n")], "not a qcow2 disk"),
])
def test_a_pulled_image_holding_anything_else_is_refused(case: str, members: list[Member], needle: str,
                                                         registry: Registry, tmp_path: Path) -> None:
    image = registry.ref("hostile/disk", case)
    skopeo("copy", "--quiet", "--dest-tls-verify=false", handmade_image(tmp_path / "layout", members), image)
    store = tmp_path / "store"
    ran = imgconv("--store", str(store), "store", "pull", NO_TLS, image, "evil", timeout=600)
    assert_one_line_error(ran, needle, code=2)
    for kept in (store / "objects" / "sha256", store / "tags", store / "tmp"):  # nothing published or left
        assert not kept.exists() or not any(kept.iterdir()), sorted(kept.iterdir())


def test_a_pulled_disk_that_is_not_the_one_its_sidecar_names_is_refused(registry: Registry, tmp_path: Path) -> None:
    image = registry.ref("hostile/disk", "swapped")
    claimed = "sha256:" + "00" * 32
    skopeo("copy", "--quiet", "--dest-tls-verify=false",
           handmade_image(tmp_path / "layout", [_file("disk/a.qcow2", QCOW2)], {"sha256": claimed}), image)
    ran = imgconv("--store", str(tmp_path / "store"), "store", "pull", NO_TLS, image, "evil", timeout=600)
    assert_one_line_error(ran, f"the image's sidecar says {claimed}", code=2)
