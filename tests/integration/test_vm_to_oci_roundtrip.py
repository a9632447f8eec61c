"""The exact round trip: every fixture image -> `imgconv oci-to-qcow2` -> `imgconv vm-to-oci` is the image again.

The disks come from the session's `converted_disk` (tests/integration/conftest.py), shared with the
oci-to-qcow2 tests. The judges are not imgconv: `umoci unpack` flattens the original image and the exported one
(whiteouts, opaque directories and hard links applied by umoci, not by converter/oci/flatten.py) and the host
reads both trees; the test world's dockerd runs both. With `--base ORIGINAL`, the export must be the original's
layers, untouched, plus one layer holding nothing at all, since the disk did not change.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import shutil
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fixtures import NAMES
from tests.cli import Ran, imgconv
from tests.integration.conftest import source_ref
from tests.integration.judge import (
    Jobs,
    layer_tar,
    manifest_of,
    selected,
    skopeo_inspect,
    tool,
    umoci_tree,
)
from tests.treecmp import Entry, diff_trees
from tests.world import DockerWorld, FixtureImage

pytestmark = [pytest.mark.appliance, pytest.mark.docker]

BY_NAME = [pytest.param(name, marks=[pytest.mark.slow] if name == "debian" else []) for name in NAMES]


@dataclass
class RoundTrips:
    root: Path
    jobs: Jobs
    images: dict[str, FixtureImage]
    docker: DockerWorld

    def result(self, key: str) -> dict[str, Any]:
        return self.jobs[key].ok().json  # type: ignore[no-any-return]

    def layout(self, key: str) -> Path:
        self.result(key)
        return self.root / key

    def original(self, name: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
        """The original's OCI layout: (manifest digest, manifest, config); the layers --base must keep."""
        image = self.images[name]
        return manifest_of(image.oci_dir, image.tag)

    def source_config(self, name: str) -> dict[str, Any]:
        """The config as the disk's source had it, read raw by skopeo: a docker-daemon: or docker-archive:
        source has Docker's serialisation of the image (more fields), which the round trip must give back."""
        image = self.images[name]
        ref = source_ref(image)
        flags = ("--daemon-host", self.docker.host) if ref.startswith("docker-daemon:") else ()
        return json.loads(tool("skopeo", "inspect", "--raw", "--config", *flags, ref))  # type: ignore[no-any-return]


def _export(disk: str, layout: Path, *args: str, env: dict[str, str]) -> Ran:
    return imgconv("vm-to-oci", disk, f"oci:{layout}:1", "--json", *args, env=env)


@pytest.fixture(scope="module")
def round_trips(request: pytest.FixtureRequest, converted_disk: Callable[[str], Path],
                fixture_image: Callable[[str], FixtureImage], docker_world: DockerWorld,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[RoundTrips]:
    trips = RoundTrips(tmp_path_factory.mktemp("round-trip"), Jobs(), {}, docker_world)
    try:
        for name in NAMES:
            image = trips.images[name] = fixture_image(name)
            disk = functools.partial(lambda n: str(converted_disk(n)), name)  # made in the main thread only
            trips.jobs.define(f"{name}-rt", _export, trips.root / f"{name}-rt", prepare=disk, env=docker_world.env)
            trips.jobs.define(f"{name}-base", _export, trips.root / f"{name}-base", "--base", image.oci_ref,
                              prepare=disk, env=docker_world.env)
        # Exports start as soon as their disk exists (usually made already by the oci-to-qcow2 tests), while
        # the next disk is being made; the biggest first, so that the small ones fill the other worker.
        wanted = {f"{params['name']}-{'base' if test.startswith('test_base') else 'rt'}"
                  for test, params in selected(request) if "name" in params}
        changed = trips.root / "tricky-changed.qcow2"
        trips.jobs.define("tricky-changed", _change_then_export, changed, trips.root / "tricky-changed",
                          trips.images["tricky"].oci_ref, prepare=functools.partial(converted_disk, "tricky"),
                          env=docker_world.env)
        if any(test == "test_base_of_a_changed_disk_holds_the_changes" for test, _ in selected(request)):
            wanted.add("tricky-changed")
        for name in sorted(NAMES, key=lambda n: n != "debian"):
            trips.jobs.start(*(key for key in (f"{name}-rt", f"{name}-base", f"{name}-changed") if key in wanted))
        yield trips
    finally:
        trips.jobs.close()


@pytest.mark.parametrize("name", BY_NAME)
def test_file_tree_is_the_original(name: str, round_trips: RoundTrips) -> None:
    """Path by path: type, mode, owner, size, content hash, link target, xattrs, and who is hard-linked to whom."""
    image = round_trips.images[name]
    exported = umoci_tree(round_trips.layout(f"{name}-rt"), "1", round_trips.root)
    original = umoci_tree(image.oci_dir, image.tag, round_trips.root)
    assert diff_trees(original, exported, hardlinks=True) == []
    assert len(original) >= 7  # distroless, the smallest, has 7 paths


@pytest.mark.parametrize("name", BY_NAME)
def test_config_is_the_original(name: str, round_trips: RoundTrips) -> None:
    result = round_trips.result(f"{name}-rt")
    original = round_trips.source_config(name)
    _digest, manifest, config = manifest_of(round_trips.layout(f"{name}-rt"), "1")
    assert result["source"]["made_by_imgconv"] is True and result["source"]["os"] is None
    assert config["config"] == original["config"]  # Entrypoint, Cmd, Env, User, WorkingDir, labels, ...
    assert (config["os"], config["architecture"]) == (original["os"], original["architecture"])
    # an unchanged disk: the image's own layers, rootfs and history come back (tar-split records, issue 12 item 7;
    # tests/integration/test_roundtrip_identity.py judges the image ID)
    assert result["original_layers"] is True and result["new_layer"] is None
    assert config["rootfs"] == original["rootfs"] and config["history"] == original["history"]
    assert len(manifest["layers"]) == len(original["rootfs"]["diff_ids"])


@pytest.mark.parametrize("name", BY_NAME)
def test_docker_run_is_the_original(name: str, round_trips: RoundTrips) -> None:
    copy = f"imgconv-roundtrip/{name}:1"
    tool("skopeo", "copy", "--quiet", "--dest-daemon-host", round_trips.docker.host,
         f"oci:{round_trips.layout(name + '-rt')}:1", f"docker-daemon:{copy}")
    assert round_trips.docker.image_id(copy) == round_trips.result(f"{name}-rt")["image_id"]
    original = round_trips.docker.run(round_trips.images[name].repo_tag)
    again = round_trips.docker.run(copy)
    assert (again.out, again.err, again.exit_code) == (original.out, original.err, original.exit_code)
    assert original.out  # every fixture prints something


@pytest.mark.parametrize("name", BY_NAME)
def test_base_is_the_original_plus_one_empty_layer(name: str, round_trips: RoundTrips) -> None:
    result = round_trips.result(f"{name}-base")
    layout = round_trips.layout(f"{name}-base")
    _digest, original_manifest, original = round_trips.original(name)
    _digest, manifest, config = manifest_of(layout, "1")
    # the original's layers, byte for byte (same digests, sizes, media types), then exactly one more
    assert manifest["layers"][:-1] == original_manifest["layers"]
    assert len(manifest["layers"]) == len(original_manifest["layers"]) + 1
    assert config["rootfs"]["diff_ids"][:-1] == original["rootfs"]["diff_ids"]
    source = round_trips.source_config(name)
    assert config["config"] == source["config"]
    assert config["history"][:-1] == source["history"]
    # an unchanged disk: the new layer holds no entry at all (no file, no directory, no whiteout)
    new = manifest["layers"][-1]
    assert result["new_layer"] == {"digest": new["digest"], "diff_id": config["rootfs"]["diff_ids"][-1],
                                   "entries": 0}
    data = layer_tar(layout, new)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        assert tar.getmembers() == []
    assert skopeo_inspect(f"oci:{layout}:1")["Layers"] == [d["digest"] for d in manifest["layers"]]


# -- --base on a disk that changed in the VM ----------------------------------------------------------------------

NEW_RELEASE = "changed on the VM\n"


def _change_then_export(disk: Path, copy: Path, layout: Path, base: str, *, env: dict[str, str]) -> Ran:
    """What a user does in the VM, done with libguestfs on a copy of the tricky disk: a file rewritten, a symlink
    and a whole tree deleted, a directory emptied, a mode and an xattr changed, new files and a new hard link."""
    import guestfs  # type: ignore[import-not-found]

    from converter.boot.accel import configure_guestfs  # the host's accelerator choice, nothing else

    shutil.copyfile(disk, copy)
    copy.chmod(0o644)
    g = guestfs.GuestFS(python_return_dict=True)
    configure_guestfs(g)
    g.set_network(False)
    g.add_drive_opts(str(copy), format="qcow2", readonly=False)
    g.launch()
    g.mount("/dev/sda1", "/")
    g.write("/etc/fixture-release", NEW_RELEASE)
    g.rm("/bin/ls")
    g.rm_rf("/usr")
    g.rm("/home/app/.profile")
    g.mkdir("/new-dir")
    g.write("/new-dir/new-file", "new\n")
    g.chmod(0o600, "/etc/passwd")
    g.ln("/etc/group", "/etc/group-link")
    g.setxattr("user.note", "added in the VM", len("added in the VM"), "/bin/busybox")
    g.umount_all()
    g.shutdown()
    g.close()
    return imgconv("vm-to-oci", str(copy), f"oci:{layout}:1", "--base", base, "--json", env=env)


def test_base_of_a_changed_disk_holds_the_changes(round_trips: RoundTrips) -> None:
    """The new layer holds the changed and new entries and whiteouts for what was deleted, nothing else (the one
    unchanged file written again is the other name of the new hard link); umoci applies it to the original's
    layers and gets the changed tree."""
    result = round_trips.result("tricky-changed")
    layout = round_trips.layout("tricky-changed")
    image = round_trips.images["tricky"]
    _digest, original_manifest, _config = round_trips.original("tricky")
    _digest, manifest, _config = manifest_of(layout, "1")
    assert manifest["layers"][:-1] == original_manifest["layers"]
    data = layer_tar(layout, manifest["layers"][-1])
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        entries = {m.name: m for m in tar.getmembers()}
    assert sorted(entries) == sorted([
        "new-dir", "new-dir/new-file", "etc/fixture-release", "etc/passwd", "bin/busybox", "etc/group-link",
        "etc/group", "bin/.wh.ls", ".wh.usr", "home/app/.wh..profile"])
    assert result["new_layer"]["entries"] == len(entries)
    links = {name: entries[name].linkname for name in ("etc/group", "etc/group-link") if entries[name].islnk()}
    assert len(links) == 1 and set(links.values()) == {"etc/group", "etc/group-link"} - set(links), links
    # no link into a lower layer: Docker's overlay2 applies each layer on its own and would refuse it
    assert all(m.linkname in entries for m in entries.values() if m.islnk())
    # the tree: the original's (as umoci makes it) with exactly these changes
    expected = dict(umoci_tree(image.oci_dir, image.tag, round_trips.root))
    release = NEW_RELEASE.encode()
    expected["etc/fixture-release"] = dataclasses.replace(expected["etc/fixture-release"], size=len(release),
                                                          sha256=hashlib.sha256(release).hexdigest())
    for gone in [p for p in expected if p == "usr" or p.startswith("usr/")] + ["bin/ls", "home/app/.profile"]:
        del expected[gone]
    expected["new-dir"] = Entry("dir", 0o755, 0, 0)
    expected["new-dir/new-file"] = Entry("file", 0o644, 0, 0, 4, hashlib.sha256(b"new\n").hexdigest())
    expected["etc/passwd"] = dataclasses.replace(expected["etc/passwd"], mode=0o600)
    expected["etc/group-link"] = dataclasses.replace(expected["etc/group"], hardlink="etc/group")
    expected["bin/busybox"] = dataclasses.replace(expected["bin/busybox"],
                                                  xattrs=(("user.note", b"added in the VM"),))
    assert diff_trees(expected, umoci_tree(layout, "1", round_trips.root), hardlinks=True) == []
