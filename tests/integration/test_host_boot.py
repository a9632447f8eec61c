"""extlinux installed on the host (converter/boot/syslinux.py) is what extlinux itself writes.

The judge is extlinux: a disk converted with IMGCONV_UNPACK_IN_APPLIANCE=1 has its ldlinux.sys and boot sector
written by the real `extlinux --install` in the libguestfs appliance. imgconv's template, patched for the sectors
that disk's ldlinux.sys occupies and for its partition, must give the same ldlinux.sys byte for byte and the same
boot sector but for the two geometry words (sectors per track, heads: what the appliance's kernel made up for its
disk, used only by BIOSes without LBA calls), and ldlinux.c32 must be the disk's. The session's own conversions
(no appliance) are booted by most integration tests; here their events show they started none.

Cost: one conversion in the appliance (~10-25 s under TCG), no boot.
"""

from __future__ import annotations

import re
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from converter.boot.syslinux import SECTOR, patch, template
from tests.cli import imgconv
from tests.integration.conftest import session_events, source_ref
from tests.world import DockerWorld, FixtureImage

pytestmark = [pytest.mark.appliance]

ROOT_OFFSET = 2048 * SECTOR  # the root partition of a BIOS disk
GEOMETRY = range(0x18, 0x1C)  # bsSecPerTrack, bsHeads


def _debugfs(device: str, request: str) -> str:
    return subprocess.run(["debugfs", "-R", request, device], capture_output=True, text=True, check=True).stdout


def _raw(disk: Path, dest: Path) -> Path:
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(disk), str(dest)], check=True)
    return dest


def test_the_host_install_is_what_extlinux_writes(fixture_image: Callable[[str], FixtureImage],
                                                  docker_world: DockerWorld, tmp_path: Path) -> None:
    ref = source_ref(fixture_image("busybox"))
    disk = tmp_path / "extlinux.qcow2"
    ran = imgconv("oci-to-qcow2", "--json", ref, str(disk), env={**docker_world.env,
                                                                 "IMGCONV_UNPACK_IN_APPLIANCE": "1"}).ok()
    assert '"id": "write-rootfs"' in ran.stderr  # the appliance's tar and the real extlinux made it
    raw = _raw(disk, tmp_path / "extlinux.raw")
    device = f"{raw}?offset={ROOT_OFFSET}"
    blocks = [int(n) for n in re.findall(r"\d+", _debugfs(device, "blocks /.imgconv/boot/ldlinux.sys"))]
    for name in ("ldlinux.sys", "ldlinux.c32"):
        _debugfs(device, f"dump /.imgconv/boot/{name} {tmp_path / name}")
    with raw.open("rb") as f:
        f.seek(ROOT_OFFSET)
        bootsect = f.read(SECTOR)
    total = struct.unpack_from("<I", bootsect, 0x20)[0]
    tpl = template(tmp_path)
    ours_boot, ours_sys = patch(tpl, [b * 8 + i for b in blocks for i in range(8)], ROOT_OFFSET // SECTOR, total)
    assert ours_sys == (tmp_path / "ldlinux.sys").read_bytes()
    assert tpl.ldlinux_c32 == (tmp_path / "ldlinux.c32").read_bytes()
    assert [i for i in range(SECTOR) if ours_boot[i] != bootsect[i] and i not in GEOMETRY] == []
    # what makes the comparison worth something: the disk's own sectors and partition are in both
    assert struct.unpack_from("<I", ours_boot, 0x1C)[0] == 2048 and total > 65536
    first_sector = struct.unpack_from("<I", bootsect, 282)[0]  # the boot sector's pointer to ldlinux.sys
    assert blocks and first_sector == blocks[0] * 8 == struct.unpack_from("<I", ours_boot, 282)[0]


def test_a_conversion_with_a_host_kernel_starts_no_appliance(converted_disk: Callable[[str], Path]) -> None:
    for name in ("busybox", "debian"):
        steps = [e["id"] for e in session_events(converted_disk(name)) if e.get("event") == "step"]
        assert "launch-appliance" not in steps and "install-boot" in steps and "write-files" in steps, (name, steps)
