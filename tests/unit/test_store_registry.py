"""store push/pull without a registry (converter/store/registry.py): the containerDisk image imgconv writes, read
back by Python's tarfile as the judge; what a pulled layer may hold (crafted layers: links, a second file, names
outside /disk, devices, not a qcow2, more layers); the sidecar's and the statement's sha256 checked against the
disk; the statement kept beside the version and removed with it by gc. The registry round trip itself is in
tests/integration/test_store_registry.py."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from converter.errors import ImageError, ReferenceError_, UsageError
from converter.oci.layout import LayoutWriter, open_layout
from converter.oci.writer import LayerWriter, write_image
from converter.store.reference import parse_store_ref
from converter.store.registry import (
    DISK_MODE,
    QCOW2_MAGIC,
    QEMU_ID,
    ContainerDiskError,
    _check_claims,
    _unpack_disk,
    disk_file_name,
    docker_name,
    statement_tag,
    write_containerdisk,
)
from converter.store.store import Store, Version

DISK = QCOW2_MAGIC + b"\0" * 4092 + b"end"


def _version(tmp_path: Path, data: bytes = DISK) -> Version:
    path = tmp_path / "obj"
    path.write_bytes(data)
    return Version("sha256:" + hashlib.sha256(data).hexdigest(), path, {"source": "oci:x:1", "sha256": "sha256:"
                                                                        + hashlib.sha256(data).hexdigest()})


def _image_of(tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], layers: int = 1) -> Path:
    """A layout of *layers* copies of a layer holding *members* (written by imgconv's writer, as a hostile
    registry's image would arrive: the writer only stores what it is given)."""
    layout = LayoutWriter(tmp_path / "crafted")
    descriptors = []
    for _ in range(layers):
        with LayerWriter(layout, "gzip") as layer:
            for info, data in members:
                layer.add(info, io.BytesIO(data) if data is not None else None)
        assert layer.result is not None
        descriptors.append(layer.result)
    config = {"architecture": "amd64", "os": "linux",
              "rootfs": {"type": "layers", "diff_ids": [d.diff_id for d in descriptors]}}
    write_image(layout, config, [d.descriptor for d in descriptors], "x")
    return layout.root


def _member(name: str, data: bytes = DISK, kind: bytes = tarfile.REGTYPE,
            link: str = "") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        return info, data
    return info, None


def test_names_and_tags() -> None:
    assert statement_tag("sha256:" + "ab" * 32) == "sha256-" + "ab" * 32 + ".intoto"
    assert disk_file_name(parse_store_ref("team/app:v1", prefixed=False)) == "app.qcow2"
    assert docker_name("docker://localhost:5000/a/b:v1", for_push=True).tag == "v1"
    with pytest.raises(UsageError, match="not a digest"):
        docker_name("docker://localhost:5000/a/b@sha256:" + "ab" * 32, for_push=True)
    with pytest.raises(ReferenceError_):
        docker_name("oci:/tmp/x:1", for_push=False)


def test_the_containerdisk_layer_is_one_file_owned_by_qemu_and_reads_back_the_same(tmp_path: Path) -> None:
    version = _version(tmp_path)
    layout = LayoutWriter(tmp_path / "layout")
    write_containerdisk(layout, version, "app.qcow2")
    index = json.loads((layout.root / "index.json").read_text())
    manifest = json.loads(layout.store.blob_path(index["manifests"][0]["digest"]).read_bytes())
    [layer] = manifest["layers"]
    raw = gzip.decompress(layout.store.blob_path(layer["digest"]).read_bytes())
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert sorted(members) == ["disk", "disk/app.qcow2"]
        disk = members["disk/app.qcow2"]
        assert (disk.uid, disk.gid, disk.mode, disk.isreg()) == (QEMU_ID, QEMU_ID, DISK_MODE, True)
        assert tar.extractfile(disk).read() == DISK  # type: ignore[union-attr]
    # The same version gives the same image (every time in it fixed).
    again = LayoutWriter(tmp_path / "again")
    write_containerdisk(again, version, "app.qcow2")
    assert (again.root / "index.json").read_bytes() == (layout.root / "index.json").read_bytes()
    image = open_layout(layout.root, "disk", None, "test")
    assert _unpack_disk(image, tmp_path / "out", "test") == version.sha256
    assert (tmp_path / "out").read_bytes() == DISK


@pytest.mark.parametrize(("members", "layers", "needle"), [
    ([_member("disk/a.qcow2"), _member("disk/b.qcow2")], 1, "a second disk /disk/b.qcow2"),
    ([_member("disk/a.qcow2", kind=tarfile.SYMTYPE, link="/etc/shadow")], 1, "a link"),
    ([_member("disk/a.qcow2", kind=tarfile.LNKTYPE, link="etc/shadow")], 1, "a link"),
    ([_member("disk/a.qcow2", kind=tarfile.CHRTYPE)], 1, "a special file"),
    ([_member("disk/../../etc/a.qcow2")], 1, "not a containerDisk"),
    ([_member("../disk/a.qcow2")], 1, "not a containerDisk"),
    ([_member("disk/sub/a.qcow2")], 1, "not a containerDisk"),
    ([_member("disk/a.img")], 1, "only one regular file"),
    ([_member("disk/a.qcow2"), _member("etc", kind=tarfile.DIRTYPE)], 1, "a directory /etc"),
    ([_member("disk/a.qcow2", b"#!/bin/sh\n")], 1, "not a qcow2 disk"),
    ([_member("disk/a.qcow2", b"")], 1, "empty"),
    ([_member("disk", kind=tarfile.DIRTYPE)], 1, "no /disk/NAME.qcow2"),
    ([_member("disk/a.qcow2")], 2, "2 layers"),
    ([], 0, "0 layers"),
])
def test_a_layer_holding_anything_but_one_qcow2_in_disk_is_refused(
        members: list[tuple[tarfile.TarInfo, bytes | None]], layers: int, needle: str, tmp_path: Path) -> None:
    image = open_layout(_image_of(tmp_path, members, layers), "x", None, "docker://r/x:1")
    with pytest.raises(ImageError, match=needle.replace(".", r"\.")):
        _unpack_disk(image, tmp_path / "out", "docker://r/x:1")


def test_the_disk_must_be_the_one_the_sidecar_and_statement_name() -> None:
    sha = "sha256:" + "ab" * 32
    statement = json.dumps({"subject": [{"name": "x", "digest": {"sha256": "ab" * 32}}]}).encode()
    _check_claims("src", sha, {"sha256": sha}, statement)
    _check_claims("src", sha, {}, None)
    with pytest.raises(ContainerDiskError, match="sidecar says"):
        _check_claims("src", sha, {"sha256": "sha256:" + "cd" * 32}, None)
    with pytest.raises(ContainerDiskError, match="statement is of another disk"):
        _check_claims("src", "sha256:" + "cd" * 32, {}, statement)
    with pytest.raises(ImageError):
        _check_claims("src", sha, {}, b"[not json")


def test_a_versions_statement_is_kept_beside_it_and_goes_with_it_at_gc(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    store.ensure()
    finished = store.tmp / ".version.imgconv-x-1-a"
    finished.write_bytes(DISK)
    record = store.publish(finished, {}, parse_store_ref("app:v1", prefixed=False),
                           statement=lambda sha: f'{{"sha": "{sha}"}}'.encode())
    obj = store.object_path(record["sha256"])
    proof = obj.with_name(obj.name + ".intoto.json")
    assert json.loads(proof.read_text()) == {"sha": record["sha256"]}
    store.remove(parse_store_ref("app:v1", prefixed=False))
    report = store.gc()
    assert report.versions == (record["sha256"],)
    assert not obj.exists() and not proof.exists() and not obj.with_name(obj.name + ".json").exists()
