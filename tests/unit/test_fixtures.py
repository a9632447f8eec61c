"""The pure-Python fixture images: deterministic, well formed, cached by content. No daemon needed."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

import fixtures
from fixtures import busybox, catalog, debian, distroless, tricky
from fixtures.image import layer_tar
from tests.treecmp import tree_from_tar

PURE = ("busybox", "distroless", "tricky", "runtime")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("IMGCONV_TEST_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("name", PURE)
def test_pure_images_are_bit_identical_across_builds(name: str, tmp_path: Path) -> None:
    catalog.build_into(name, tmp_path / "one")
    catalog.build_into(name, tmp_path / "two")
    for rel in ("oci/index.json", "docker-archive.tar"):
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes(), rel
    one, two = fixtures.BuiltFixture.open(tmp_path / "one"), fixtures.BuiltFixture.open(tmp_path / "two")
    assert one.manifest_digest == two.manifest_digest
    # pure images: the docker-archive and the OCI layout hold the same config bytes
    assert one.image_id == one.config_digest


@pytest.mark.parametrize("name", PURE)
def test_docker_archive_is_consistent(name: str, tmp_path: Path) -> None:
    catalog.build_into(name, tmp_path / "img")
    with tarfile.open(tmp_path / "img" / "docker-archive.tar") as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        assert manifest[0]["RepoTags"] == [f"imgconv-fixture/{name}:1"]
        config_bytes = tar.extractfile(manifest[0]["Config"]).read()  # type: ignore[union-attr]
        assert hashlib.sha256(config_bytes).hexdigest() + ".json" == manifest[0]["Config"]
        config = json.loads(config_bytes)
        layers = [tar.extractfile(name).read() for name in manifest[0]["Layers"]]  # type: ignore[union-attr]
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(layer).hexdigest() for layer in layers]
    assert len(config["history"]) == len(layers)
    assert config["os"] == "linux" and config["architecture"]


def test_oci_layout_is_consistent(tmp_path: Path) -> None:
    catalog.build_into("tricky", tmp_path / "img")
    layout = tmp_path / "img" / "oci"
    assert json.loads((layout / "oci-layout").read_bytes()) == {"imageLayoutVersion": "1.0.0"}
    for blob in (layout / "blobs" / "sha256").iterdir():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
    built = fixtures.BuiltFixture.open(tmp_path / "img")
    assert built.config["config"]["WorkingDir"] == tricky.WORKDIR
    assert built.config["config"]["Cmd"] == tricky.CMD


def test_busybox_tree() -> None:
    tree = tree_from_tar(io.BytesIO(busybox.base_layer().tar))
    assert tree["bin/busybox"].mode == 0o755
    assert tree["bin/busybox"].sha256 == hashlib.sha256(busybox.BUSYBOX.read_bytes()).hexdigest()
    assert tree["bin/sh"].linkname == "busybox"
    assert tree["tmp"].mode == 0o1777
    assert not any(path in tree for path in ("sbin/init", "bin/init", "init", "linuxrc"))
    assert {entry.mtime for entry in busybox.base_entries()} == {fixtures.image.EPOCH}


def test_distroless_has_no_shell_and_a_static_app() -> None:
    spec = distroless.spec()
    tree = tree_from_tar(io.BytesIO(spec.layers[0].tar))
    assert "bin/sh" not in tree and "bin" not in tree
    assert tree["app"].mode == 0o755
    assert tree["home/nonroot"].uid == 65532
    assert spec.config["User"] == "nonroot"
    assert any(" " in value for value in spec.config["Env"])


def test_cache_builds_once_and_reuses(cache: Path) -> None:
    first = fixtures.cached("busybox")
    assert first.path.parent == cache / "fixtures"
    assert first.path.name == f"busybox-{fixtures.cache_key('busybox')}"
    marker = first.path / "fixture.json"
    before = marker.read_bytes()
    again = fixtures.cached("busybox")
    assert again.path == first.path and marker.read_bytes() == before
    assert not list((cache / "fixtures").glob(".tmp-*"))


def test_cache_key_follows_the_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    key = fixtures.cache_key("tricky")
    assert key == fixtures.cache_key("tricky")
    fewer_sources = dataclasses.replace(catalog.RECIPES["tricky"], sources=("image.py", "tricky.py"))
    monkeypatch.setitem(catalog.RECIPES, "tricky", fewer_sources)
    assert fixtures.cache_key("tricky") != key


def test_unknown_fixture(cache: Path) -> None:
    with pytest.raises(KeyError, match="unknown fixture"):
        fixtures.cached("nope")


def test_build_cli_writes_the_image(cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fixtures.build import main

    assert main(["busybox", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert f"oci:{tmp_path / 'demo' / 'oci'}:1" in out
    assert (tmp_path / "demo" / "oci" / "index.json").exists()
    assert (tmp_path / "demo" / "docker-archive.tar").exists()
    assert main(["busybox", "--out", str(tmp_path / "demo")]) == 0  # replaces what is there


def test_debian_crafted_layer_order() -> None:
    """The opaque marker sits between the directory's own new entries, as the brief of the fixture says."""
    with tarfile.open(fileobj=io.BytesIO(debian.crafted_layer())) as tar:
        names = [m.name.rstrip("/") for m in tar]
        members = {m.name.rstrip("/"): m for m in tar}
    marker = names.index("fixture/opaque/.wh..wh..opq")
    assert all(names.index(p) < marker for p in debian.OPAQUE_BEFORE)
    assert all(names.index(p) > marker for p in debian.OPAQUE_AFTER)
    assert len(debian.LONG_PATH) > 100 and debian.LONG_PATH in names
    assert debian.UNICODE_PATH in names
    assert members[debian.XATTR_PATH].pax_headers["SCHILY.xattr." + debian.XATTR[0]] == debian.XATTR[1]
    assert members["fixture/hardlinks/two"].islnk()
    assert members["fixture/devices/null"].ischr() and members["fixture/devices/fifo"].isfifo()
    assert members["fixture/owned/big-ids"].uid == 3000000
    assert debian.crafted_layer() == layer_tar(debian.crafted_entries(), keep_order=True)


def test_debian_dockerfile_embeds_the_script() -> None:
    text = debian.dockerfile()
    entrypoint = next(line for line in text.splitlines() if line.startswith("ENTRYPOINT"))
    assert json.loads(entrypoint.removeprefix("ENTRYPOINT ")) == ["/bin/bash", "-c", debian.SCRIPT, "debian-zero"]


def test_host_mirror_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGCONV_DEBIAN_MIRROR", "http://mirror.invalid/debian")
    assert debian.host_mirror() == "http://mirror.invalid/debian"
    assert debian.rootfs_key("a") != debian.rootfs_key("b")
