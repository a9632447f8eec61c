"""The test world works: fixture images load and run in the private dockerd as intended, Docker reads the
crafted layers the way we meant, skopeo reads every form, and the local registry round-trips them."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fixtures import NAMES, busybox, debian, distroless, runtime, tricky
from tests.treecmp import Entry, diff_trees, docker_runtime_paths, hardlink_groups, tree_from_tar
from tests.world import DockerWorld, FixtureImage, Registry

pytestmark = pytest.mark.docker

ImageFactory = Callable[[str], FixtureImage]
BY_NAME = [pytest.param(name, marks=[pytest.mark.slow] if name == "debian" else []) for name in NAMES]


def archive_layers(archive: Path) -> list[bytes]:
    with tarfile.open(archive) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        return [tar.extractfile(name).read() for name in manifest[0]["Layers"]]  # type: ignore[union-attr]


def merged_tree(layers: list[bytes]) -> dict[str, Entry]:
    """Layers without whiteouts stack by plain replacement."""
    tree: dict[str, Entry] = {}
    for layer in layers:
        tree.update(tree_from_tar(io.BytesIO(layer)))
    assert not any(path.rsplit("/", 1)[-1].startswith(".wh.") for path in tree)
    return tree


def skopeo(*args: str) -> Any:
    proc = subprocess.run(["skopeo", *args], capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# --- the daemon itself ------------------------------------------------------------------------------------


def test_dockerd_is_private_and_answers(docker_world: DockerWorld) -> None:
    assert docker_world.host.startswith("unix:///tmp/")
    assert len(docker_world.host.removeprefix("unix://")) < 108
    assert docker_world.env["DOCKER_HOST"] == docker_world.host
    assert docker_world.client.version()["Version"].startswith("20.10")
    info = docker_world.client.info()
    assert info["Driver"] == "vfs"
    assert docker_world.cli("info", "--format", "{{.Driver}}").stdout.strip() == "vfs"


def test_run_keeps_stdout_stderr_and_exit_code_apart(docker_world: DockerWorld, fixture_image: ImageFactory) -> None:
    image = fixture_image("busybox")
    result = docker_world.run(
        image.repo_tag, ["x y"],
        entrypoint=["/bin/sh", "-c", 'echo out; echo err >&2; echo "$A|$1"; id -un; hostname; exit 7', "zero"],
        env={"A": "b  c"}, user="nobody", hostname="elsewhere",
    )
    assert (result.stdout, result.stderr, result.exit_code) == (b"out\nb  c|x y\nnobody\nelsewhere\n", b"err\n", 7)


def test_load_and_save_round_trip(docker_world: DockerWorld, fixture_image: ImageFactory, tmp_path: Path) -> None:
    image = fixture_image("busybox")
    saved = docker_world.save(image.repo_tag, tmp_path / "saved.tar")
    assert docker_world.load(saved) == image.repo_tag
    assert docker_world.image_id(image.repo_tag) == image.built.image_id


# --- each image prints what it should --------------------------------------------------------------------


def test_busybox_runs(docker_world: DockerWorld, fixture_image: ImageFactory) -> None:
    result = docker_world.run(fixture_image("busybox").repo_tag)
    assert (result.out, result.stderr, result.exit_code) == (busybox.EXPECTED_STDOUT, b"", 0)


def test_distroless_runs(docker_world: DockerWorld, fixture_image: ImageFactory) -> None:
    image = fixture_image("distroless")
    result = docker_world.run(image.repo_tag)
    assert (result.out, result.stderr, result.exit_code) == (distroless.EXPECTED_STDOUT, b"", distroless.EXIT_CODE)
    again = docker_world.run(image.repo_tag, ["--exit=5", " spaced  out "])
    assert again.exit_code == 5
    assert again.out.startswith("argv[0]=[/app]\nargv[1]=[--exit=5]\nargv[2]=[ spaced  out ]\nenv=")


def test_tricky_runs(docker_world: DockerWorld, fixture_image: ImageFactory) -> None:
    result = docker_world.run(fixture_image("tricky").repo_tag)
    assert (result.out, result.stderr, result.exit_code) == (tricky.expected_stdout(), b"", tricky.EXIT_CODE)


def test_runtime_runs(docker_world: DockerWorld, fixture_image: ImageFactory) -> None:
    resolv_conf = docker_world.run(fixture_image("busybox").repo_tag, ["/etc/resolv.conf"], entrypoint="cat").out
    result = docker_world.run(fixture_image("runtime").repo_tag)
    assert (result.out, result.stderr, result.exit_code) == (runtime.expected_stdout(resolv_conf), b"",
                                                             runtime.EXIT_CODE)


@pytest.mark.slow
def test_debian_runs(docker_world: DockerWorld, fixture_image: ImageFactory) -> None:
    result = docker_world.run(fixture_image("debian").repo_tag)
    assert result.exit_code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0].startswith("hello from debian 12.")
    assert lines[1:7] == ["[debian-zero]", "[first arg]", "[second]", "FIXTURE=debian fixture", "/srv/work",
                          "uid=0(root) gid=0(root) groups=0(root)"]
    for gone in ("/usr/share/doc", "/etc/issue.net", "/fixture/whiteout-me", "/fixture/opaque/old-a",
                 "/fixture/opaque/sub", "/fixture/gone-dir"):
        assert f"absent {gone}" in lines
    for line in ("f 644 0:0 links=2 ./hardlinks/two", "f 644 0:0 links=2 ./hard-b", "c 666 0:0 ./devices/null",
                 "p 640 0:0 ./fifo", "f 4755 0:0 links=1 ./suid-true", "d 2775 0:0 ./setgid-dir",
                 "d 750 1234:5678 ./owned", "f 600 3000000:3000001 links=1 ./owned/big-ids",
                 "l 777 0:0 ./file2symlink -> hard-b", "character special file 1:3 devices/null",
                 f"f 644 0:0 links=1 ./{debian.UNICODE_PATH.removeprefix('fixture/')}"):
        assert line in lines
    assert lines[-1] == "bye"


# --- what docker export adds, and what Docker made of our layers ------------------------------------------


def test_runtime_paths_match_a_real_export(docker_world: DockerWorld, fixture_image: ImageFactory) -> None:
    image = fixture_image("busybox")
    ours = merged_tree(archive_layers(image.archive))
    exported = tree_from_tar(docker_world.export(image.repo_tag))
    assert set(exported) - set(ours) == docker_runtime_paths
    assert diff_trees(ours, exported, ignore=docker_runtime_paths) == []


def test_export_creates_a_missing_workdir(docker_world: DockerWorld, fixture_image: ImageFactory) -> None:
    image = fixture_image("tricky")
    ours = merged_tree(archive_layers(image.archive))
    exported = tree_from_tar(docker_world.export(image.repo_tag))
    assert "work dir" not in ours
    assert set(exported) - set(ours) == docker_runtime_paths | {"work dir", "work dir/with space"}
    assert exported["work dir/with space"].type == "dir"
    assert diff_trees(ours, exported, ignore=[*docker_runtime_paths, "work dir"]) == []


@pytest.fixture(scope="module")
def debian_export(docker_world: DockerWorld, fixture_image: ImageFactory) -> dict[str, Entry]:
    return tree_from_tar(docker_world.export(fixture_image("debian").repo_tag))


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.slow
def test_debian_opaque_dir_and_whiteouts(debian_export: dict[str, Entry]) -> None:
    tree = debian_export
    for path in (*debian.OPAQUE_BEFORE, *debian.OPAQUE_AFTER):
        assert tree[path].type == "file", path  # written before and after the marker: both kept
    assert tree["fixture/opaque/kept-by-name"].sha256 == _sha("upper version, written before the marker\n")
    for path in debian.OPAQUE_HIDDEN:
        assert path not in tree, path  # the lower layer's content of the opaque dir
    assert sorted(p for p in tree if p.startswith("fixture/opaque/")) == sorted(
        [*debian.OPAQUE_BEFORE, *debian.OPAQUE_AFTER, "fixture/opaque/newsub"])
    for path in debian.WHITED_OUT:
        assert path not in tree, path
    assert not [p for p in tree if "/.wh." in "/" + p]


@pytest.mark.slow
def test_debian_type_changes_links_and_special_files(debian_export: dict[str, Entry]) -> None:
    tree = debian_export
    assert tree["fixture/dir2file"].type == "file" and "fixture/dir2file/inner" not in tree
    assert tree["fixture/file2dir"].type == "dir" and tree["fixture/file2dir/child"].type == "file"
    assert tree["fixture/dir2file-later"].type == "file"
    assert tree["fixture/file2symlink"].linkname == "hard-b"
    assert tree["etc/motd"].linkname == "issue"
    groups = hardlink_groups(tree)
    assert groups["fixture/hardlinks/two"] == ("fixture/hardlinks/one", "fixture/hardlinks/two")
    assert groups["fixture/hard-b"] == ("fixture/hard-a", "fixture/hard-b")
    assert tree["fixture/hard-a"].sha256 == _sha("hard\nchanged\n")
    assert tree["fixture/symlink-to-one"].linkname == "hardlinks/one"
    assert (tree["fixture/devices/null"].type, tree["fixture/devices/null"].devmajor,
            tree["fixture/devices/null"].devminor) == ("char", 1, 3)
    assert tree["fixture/devices/fifo"].type == "fifo" and tree["fixture/fifo"].mode == 0o640
    assert tree[debian.LONG_PATH].sha256 == _sha("long path\n")
    assert tree[debian.UNICODE_PATH].type == "file"
    assert (tree["fixture/owned"].uid, tree["fixture/owned"].gid, tree["fixture/owned"].mode) == (1234, 5678, 0o750)
    assert (tree["fixture/owned/big-ids"].uid, tree["fixture/owned/big-ids"].gid) == (3000000, 3000001)
    assert (tree["fixture/owned/nobody"].uid, tree["fixture/owned/nobody"].gid) == (65534, 65534)
    assert tree["fixture/suid-true"].mode == 0o4755
    assert tree["fixture/setgid-dir"].mode == 0o2775 and tree["fixture/sticky"].mode == 0o1777
    assert (tree["home/user/file"].uid, tree["home/user/file"].gid, tree["home/user/file"].mode) == (1000, 1000, 0o600)
    assert tree["srv/work"].type == "dir"
    assert tree["usr/bin/bash"].type == "file"


@pytest.mark.slow
def test_debian_layers_hold_docker_whiteouts_and_our_crafted_bytes(fixture_image: ImageFactory) -> None:
    image = fixture_image("debian")
    layers = archive_layers(image.archive)
    assert len(layers) == len(image.config["rootfs"]["diff_ids"]) >= 4
    # Docker kept the crafted layer byte for byte (tar-split): xattrs and the marker position survive a save
    assert layers[-1] == debian.crafted_layer()
    names = [tarfile.open(fileobj=io.BytesIO(layer)).getnames() for layer in layers[1:-1]]
    flat = {name.removeprefix("./") for layer_names in names for name in layer_names}
    for whiteout in ("usr/share/.wh.doc", "etc/.wh.issue.net", "fixture/.wh.gone-file", "fixture/.wh.gone-dir"):
        assert whiteout in flat, whiteout
    # and skopeo's OCI layout holds the same layer, gzipped
    manifest = json.loads(_oci_blob(image.oci_dir, image.built.manifest_digest))
    assert gzip.decompress(_oci_blob(image.oci_dir, manifest["layers"][-1]["digest"])) == debian.crafted_layer()


def _oci_blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()


# --- skopeo and the registry -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", BY_NAME)
def test_skopeo_reads_every_form(name: str, docker_world: DockerWorld, fixture_image: ImageFactory) -> None:
    image = fixture_image(name)
    layers = len(image.config["rootfs"]["diff_ids"])
    from_oci = skopeo("inspect", image.oci_ref)
    assert from_oci["Digest"] == image.built.manifest_digest
    assert len(from_oci["Layers"]) == layers
    assert image.oci_ref == f"oci:{image.oci_dir}:1"
    assert len(skopeo("inspect", image.archive_ref)["Layers"]) == layers
    from_daemon = skopeo("inspect", "--daemon-host", docker_world.host, image.daemon_ref)
    assert len(from_daemon["Layers"]) == layers
    config = skopeo("inspect", "--config", image.oci_ref)
    assert config["config"].get("Entrypoint") == image.config["config"].get("Entrypoint")


@pytest.mark.registry
@pytest.mark.parametrize("name", BY_NAME)
def test_registry_round_trip_keeps_the_digests(name: str, fixture_image: ImageFactory, registry: Registry) -> None:
    image = fixture_image(name)
    ref = image.push(registry)
    assert ref == f"docker://{registry.addr}/imgconv-fixture/{name}:1"
    raw = skopeo("inspect", "--raw", "--tls-verify=false", ref)
    assert raw["config"]["digest"] == image.built.config_digest
    assert skopeo("inspect", "--tls-verify=false", ref)["Digest"] == image.built.manifest_digest
    assert image.push(registry) == ref  # pushing again is a no-op
