"""The guest init decides its stage from what an image cannot forge (issue 9, item 10), through the real CLI.

The init is one binary with two stages: the initramfs's (load drivers, mount the disk, switch root) and the
container runtime's, run again from the disk. It used to run stage 1 whenever a file `/imgconv-initramfs` existed,
so an image holding one had its VM mount /dev, /proc and /sys, load the modules its own `/load.list` names, and try
to mount and switch to the disk a second time instead of running its entrypoint. Stage 1 now also needs the root to
be the kernel's rootfs (ramfs or tmpfs): after the switch it is the image's ext4, whatever files the image holds.
One conversion, one boot.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.builders import Layout, config_json, d, f, layer, sym
from tests.cli import imgconv

pytestmark = [pytest.mark.appliance, pytest.mark.boot]

BUSYBOX = Path("/bin/busybox")
BOOT_TIMEOUT = 90

SCRIPT = """echo "hello from the image, pid $$"
[ -f /imgconv-initramfs ] && echo "the image's marker is still there"
echo "root is $(busybox stat -f -c %T /)"
exit 7
"""


def test_an_image_holding_the_initramfs_marker_runs_its_entrypoint(tmp_path: Path) -> None:
    if not BUSYBOX.is_file():
        pytest.skip(f"{BUSYBOX} is missing (busybox-static)")
    tar = layer(d("bin"), f("bin/busybox", BUSYBOX.read_bytes(), 0o755), sym("bin/sh", "busybox"),
                # what stage 1 would act on: its marker, and a module list naming something that is not there
                f("imgconv-initramfs", ""), f("load.list", "/modules/not-a-module.ko\n"), d("modules"))
    container = {"Entrypoint": ["/bin/sh", "-c", SCRIPT]}
    Layout(tmp_path / "layout").image([tar], config=config_json(["sha256:" + hashlib.sha256(tar).hexdigest()],
                                                                 config=container))
    disk = tmp_path / "disk.qcow2"
    imgconv("oci-to-qcow2", "--quiet", "--no-kernel-modules", f"oci:{tmp_path / 'layout'}", str(disk)).ok()

    ran = imgconv("boot", "--timeout", str(BOOT_TIMEOUT), str(disk), timeout=BOOT_TIMEOUT + 120)
    assert (ran.stdout, ran.code) == (
        "hello from the image, pid 1\nthe image's marker is still there\nroot is ext2/ext3\n", 7), ran.describe()
