"""Bit-identical disks (issue 12 item 1): the same image and options give the same bytes, in another directory,
at another time, judged by the files' own sha256 (hashlib), never by what imgconv says.

The first disk of each fixture is the session's conversion (conftest's `converted_disk`), the second is made here
in another directory, at least a second later; SOURCE_DATE_EPOCH and --firmware uefi get two conversions of
busybox each. Timestamps inside the disk are read back with e2fsprogs (dumpe2fs, debugfs) as the judge.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import re
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.cli import imgconv
from tests.integration.conftest import source_ref
from tests.world import DockerWorld, FixtureImage

pytestmark = [pytest.mark.appliance, pytest.mark.docker]

FIXTURES = ["busybox", "debian", "distroless", "runtime", "tricky"]
EPOCH = 1234567890  # 2009-02-13T23:31:30Z


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def convert(image: FixtureImage, out: Path, docker_world: DockerWorld, *extra: str, epoch: int | None = None) -> Path:
    """One conversion through the CLI, in the environment conftest's session conversions use."""
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(docker_world.env)
    if epoch is not None:
        env["SOURCE_DATE_EPOCH"] = str(epoch)
    imgconv("oci-to-qcow2", "--quiet", *extra, source_ref(image), str(out), env=env, inherit_env=False).ok()
    return out


def superblock(disk: Path, tmp: Path, partition: int = 1) -> dict[str, str]:
    """The root filesystem's superblock as dumpe2fs prints it (the disk made raw by qemu-img, read at its
    partition's offset as sfdisk gives it)."""
    raw = tmp / f"{disk.name}.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(disk), str(raw)], check=True)
    table = subprocess.run(["sfdisk", "-d", str(raw)], capture_output=True, text=True, check=True).stdout
    start = int(re.findall(r"start=\s*(\d+)", table)[partition - 1])
    dump = subprocess.run(["dumpe2fs", "-h", f"{raw}?offset={start * 512}"], capture_output=True, text=True,
                          check=True).stdout
    raw.unlink()
    return dict(line.split(":", 1) for line in dump.splitlines() if ":" in line)


@pytest.mark.parametrize("name", FIXTURES)
def test_a_second_conversion_elsewhere_later_gives_the_same_bytes(
        name: str, converted_disk: Callable[[str], Path], fixture_image: Callable[[str], FixtureImage],
        docker_world: DockerWorld, tmp_path: Path) -> None:
    first = converted_disk(name)
    time.sleep(1.1)
    second = convert(fixture_image(name), tmp_path / "elsewhere" / first.name, docker_world)
    assert sha256(second) == sha256(first), f"{name}: two conversions of one image differ"


def test_source_date_epoch_sets_every_time_and_still_gives_the_same_bytes(
        converted_disk: Callable[[str], Path], fixture_image: Callable[[str], FixtureImage],
        docker_world: DockerWorld, tmp_path: Path) -> None:
    image = fixture_image("busybox")
    first = convert(image, tmp_path / "a" / "busybox.qcow2", docker_world, epoch=EPOCH)
    time.sleep(1.1)
    second = convert(image, tmp_path / "b" / "busybox.qcow2", docker_world, epoch=EPOCH)
    assert sha256(first) == sha256(second)
    assert sha256(first) != sha256(converted_disk("busybox")), "SOURCE_DATE_EPOCH changed nothing in the disk"
    sb = superblock(first, tmp_path)
    when = time.strftime("%a %b %e %H:%M:%S %Y", time.gmtime(EPOCH))
    for field in ("Filesystem created", "Last mount time", "Last write time", "Last checked"):
        assert sb[field].strip() == when, (field, sb[field])


def test_a_uefi_disk_is_reproducible_too(fixture_image: Callable[[str], FixtureImage], docker_world: DockerWorld,
                                         tmp_path: Path) -> None:
    image = fixture_image("busybox")
    first = convert(image, tmp_path / "a" / "uefi.qcow2", docker_world, "--firmware", "uefi")
    time.sleep(1.1)
    second = convert(image, tmp_path / "b" / "uefi.qcow2", docker_world, "--firmware", "uefi")
    assert sha256(first) == sha256(second)


def test_without_source_date_epoch_the_times_are_the_images_created(
        converted_disk: Callable[[str], Path], fixture_image: Callable[[str], FixtureImage], tmp_path: Path) -> None:
    created = fixture_image("busybox").config["created"]
    seconds = calendar.timegm(time.strptime(created[:19], "%Y-%m-%dT%H:%M:%S"))
    sb = superblock(converted_disk("busybox"), tmp_path)
    assert sb["Filesystem created"].strip() == time.strftime("%a %b %e %H:%M:%S %Y", time.gmtime(seconds))


def image_dir_mtimes(image: FixtureImage) -> dict[str, int]:
    """Each directory's mtime in the image's final tree, read from its OCI layout's layers with tarfile: the
    newest layer that has the path decides (a file or a whiteout there: not a directory of the image)."""
    blobs = image.oci_dir / "blobs" / "sha256"
    index = json.loads((image.oci_dir / "index.json").read_text())
    manifest = json.loads((blobs / index["manifests"][0]["digest"].removeprefix("sha256:")).read_text())
    found: dict[str, int | None] = {}
    for layer in reversed(manifest["layers"]):
        with tarfile.open(blobs / layer["digest"].removeprefix("sha256:")) as tar:
            for member in tar:
                name = member.name.strip("/").removeprefix("./")
                head, _, base = name.rpartition("/")
                if base.startswith(".wh.") and base != ".wh..wh..opq":
                    found.setdefault(f"{head}/{base[4:]}".strip("/"), None)
                elif name and name not in found:
                    found[name] = int(member.mtime) if member.isdir() else None
    return {name: mtime for name, mtime in found.items() if mtime is not None}


def test_every_directory_keeps_the_images_mtime(converted_disk: Callable[[str], Path],
                                               fixture_image: Callable[[str], FixtureImage], tmp_path: Path) -> None:
    """Debian's layers write into the same directories (newest layer first in imgconv's stream), so tar set some
    directories' times before an older layer's files landed in them: the appliance's clock, a disk differing
    from run to run. Judged by debugfs against the layers' own headers."""
    wanted = {name: mtime for name, mtime in image_dir_mtimes(fixture_image("debian")).items()
              if re.fullmatch(r"[A-Za-z0-9._/+-]+", name)}
    raw = tmp_path / "debian.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(converted_disk("debian")), str(raw)], check=True)
    start = int(re.findall(r"start=\s*(\d+)", subprocess.run(["sfdisk", "-d", str(raw)], capture_output=True,
                                                               text=True, check=True).stdout)[0])
    script = tmp_path / "stat.cmd"
    script.write_text("".join(f"stat /{name}\n" for name in wanted))
    out = subprocess.run(["debugfs", "-f", str(script), f"{raw}?offset={start * 512}"], capture_output=True,
                         text=True, check=True).stdout
    got = {}  # a directory a newer layer whited out is not on the disk: its stat says so and is left out
    for chunk in re.split(r"^debugfs: stat /", out, flags=re.M)[1:]:
        mtime = re.search(r"^ mtime: 0x([0-9a-f]+)", chunk, re.M)
        if mtime is not None:
            got[chunk.split("\n", 1)[0]] = int(mtime.group(1), 16)
    assert len(got) > 0.9 * len(wanted) > 100, (len(got), len(wanted))
    differ = {name: (got[name], wanted[name]) for name in got if got[name] != wanted[name]}
    assert not differ, f"{len(differ)} directories have another mtime than the image's: {list(differ.items())[:5]}"
