"""Issue 12 item 7: `oci-to-qcow2` then `vm-to-oci` gives back the very image: its image ID (config digest) and
diff_ids, reassembled from the tar-split records the disk keeps under /.imgconv (converter/oci/tarsplit.py).

Judged by skopeo on the source reference and on the result, not by imgconv. The disks are the session's
`converted_disk` (shared with the other tests). A disk whose files changed is said to have changed and gets
new layers, as before the records existed.
"""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fixtures import NAMES
from tests.cli import imgconv
from tests.integration.conftest import source_ref
from tests.integration.judge import tool
from tests.world import DockerWorld, FixtureImage

pytestmark = [pytest.mark.appliance, pytest.mark.docker]

BY_NAME = [pytest.param(name, marks=[pytest.mark.slow] if name == "debian" else []) for name in NAMES]


def _skopeo(ref: str, *flags: str, docker: DockerWorld) -> dict[str, Any]:
    extra = ("--daemon-host", docker.host) if ref.startswith("docker-daemon:") else ()
    return json.loads(tool("skopeo", "inspect", "--raw", *flags, *extra, ref))  # type: ignore[no-any-return]


def _identity(ref: str, docker: DockerWorld) -> tuple[str, list[str]]:
    """(image ID, diff_ids) as skopeo reads them: the manifest's config digest and the config's rootfs."""
    config = _skopeo(ref, "--config", docker=docker)
    return _skopeo(ref, docker=docker)["config"]["digest"], config["rootfs"]["diff_ids"]


@pytest.mark.parametrize("name", BY_NAME)
def test_round_trip_gives_back_the_image_id_and_diff_ids(name: str, converted_disk: Callable[[str], Path],
                                                         fixture_image: Callable[[str], FixtureImage],
                                                         docker_world: DockerWorld, tmp_path: Path) -> None:
    source = source_ref(fixture_image(name))
    layout = tmp_path / "out"
    ran = imgconv("vm-to-oci", "--json", str(converted_disk(name)), f"oci:{layout}:1", env=docker_world.env).ok()
    assert ran.json["original_layers"] is True and ran.json["new_layer"] is None
    assert "the image's own" in ran.stderr
    image_id, diff_ids = _identity(source, docker_world)
    assert _identity(f"oci:{layout}:1", docker_world) == (image_id, diff_ids)
    assert ran.json["image_id"] == image_id
    assert len(diff_ids) >= 1


def _modified_copy(disk: Path, copy: Path, change: Callable[[Any], None]) -> None:
    """A copy of *disk* changed through libguestfs (as a user's VM, or a hostile hand, would)."""
    import guestfs  # type: ignore[import-not-found]

    from converter.boot.accel import configure_guestfs

    shutil.copyfile(disk, copy)
    copy.chmod(0o644)
    g = guestfs.GuestFS(python_return_dict=True)
    configure_guestfs(g)
    g.set_network(False)
    g.add_drive_opts(str(copy), format="qcow2", readonly=False)
    g.launch()
    g.mount("/dev/sda1", "/")
    change(g)
    g.shutdown()
    g.close()


def test_tampered_records_are_not_trusted(converted_disk: Callable[[str], Path],
                                          docker_world: DockerWorld, tmp_path: Path) -> None:
    """A record that is not what imgconv wrote (not JSON), or a record replaced by a symlink: new layers, the
    disk's files as they are, no claim of identity."""
    garbage = gzip.compress(b'{"diff_id": "sha256:00", "size": 1}\n\x00not json\n')
    for name, change in (("garbage", lambda g: g.write("/.imgconv/layer-0.tar-split.gz", garbage)),
                         ("symlink", lambda g: (g.rm("/.imgconv/layer-0.tar-split.gz"),
                                                g.ln_s("/bin/busybox", "/.imgconv/layer-0.tar-split.gz")))):
        copy = tmp_path / f"{name}.qcow2"
        _modified_copy(converted_disk("busybox"), copy, change)
        ran = imgconv("vm-to-oci", "--json", str(copy), f"oci:{tmp_path / name}:1", env=docker_world.env).ok()
        assert ran.json["original_layers"] is False and ran.json["new_layer"] is not None, name
        if name == "garbage":
            assert "layer records are unusable" in ran.stderr


def test_a_changed_disk_is_said_to_be_changed_and_gets_new_layers(converted_disk: Callable[[str], Path],
                                                                  fixture_image: Callable[[str], FixtureImage],
                                                                  docker_world: DockerWorld, tmp_path: Path) -> None:
    copy = tmp_path / "changed.qcow2"
    _modified_copy(converted_disk("tricky"), copy,  # same path, other content
                   lambda g: g.write("/etc/fixture-release", "changed on the VM\n"))
    layout = tmp_path / "out"
    ran = imgconv("vm-to-oci", "--json", str(copy), f"oci:{layout}:1", env=docker_world.env).ok()
    assert "differ from the image it was made from (/etc/fixture-release changed)" in ran.stderr
    assert ran.json["original_layers"] is False and ran.json["new_layer"] is not None
    image_id, _diff_ids = _identity(source_ref(fixture_image("tricky")), docker_world)
    new_id, new_diff_ids = _identity(f"oci:{layout}:1", docker_world)
    assert new_id != image_id and new_diff_ids == [ran.json["new_layer"]["diff_id"]]
