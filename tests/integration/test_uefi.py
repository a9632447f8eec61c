"""`oci-to-qcow2 --firmware uefi|both` end to end (issue 11 item 3), mostly on the busybox fixture; every fixture
image is converted with `--firmware uefi` once and booted under plain qemu with OVMF, against `docker run`.

The judges are not imgconv: util-linux's `sfdisk` reads the partition table, mtools reads the EFI system
partition, binutils' `objdump` the unified kernel image in it, OVMF and SeaBIOS boot the disks (plain qemu for
OVMF on every `uefi` disk and on the `both` disk, so imgconv's own choice of firmware is not what is tested
there), `docker run` says what each workload prints, and `umoci` flattens the image that `vm-to-oci` exports
again. Boots are few: each costs 5-20 s under TCG.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from converter.boot.initramfs import BOOT_MODULES, needed_modules
from converter.boot.kernel import host_kernel
from converter.disk.uefi import ESP_TYPE, GPT_MBR_CODE, OVMF
from fixtures import NAMES, BuiltFixture, busybox
from tests.builders import Layout, config_json, d, f, layer, sym
from tests.cli import imgconv
from tests.integration.judge import umoci_tree
from tests.treecmp import diff_trees
from tests.world import DockerWorld, FixtureImage

pytestmark = [pytest.mark.appliance, pytest.mark.boot]

LEGACY_BOOT = "LegacyBIOSBootable"


@pytest.fixture(scope="module")
def disk(built_fixture: Callable[[str], BuiltFixture], tmp_path_factory: pytest.TempPathFactory
         ) -> Callable[..., Path]:
    """Factory: fixture NAME (busybox unless named) converted from its OCI layout with --firmware FIRMWARE (once
    per module, so the busybox `uefi` disk serves both the busybox tests and the every-fixture boot)."""
    made: dict[tuple[str, str], Path] = {}
    root = tmp_path_factory.mktemp("uefi-disks")

    def get(firmware: str, name: str = "busybox") -> Path:
        if (firmware, name) not in made:
            image = built_fixture(name)
            out = root / f"{name}-{firmware}.qcow2"
            imgconv("oci-to-qcow2", "--quiet", "--firmware", firmware, f"oci:{image.oci_dir}:{image.tag}",
                    str(out)).ok()
            made[firmware, name] = out
        return made[firmware, name]

    return get


def raw_copy(disk: Path, where: Path) -> Path:
    """The disk as a raw file (sparse), for tools that read plain disks."""
    raw = where / f"{disk.stem}.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(disk), str(raw)], check=True)
    return raw


def partitions(raw: Path) -> dict[str, object]:
    table: dict[str, object] = json.loads(subprocess.run(["sfdisk", "--json", str(raw)], capture_output=True,
                                                         text=True, check=True).stdout)["partitiontable"]
    return table


def plain_qemu(disk: Path, *, ovmf: bool) -> subprocess.CompletedProcess[bytes]:
    """Boot `disk` with qemu alone (no imgconv): OVMF as the firmware, or qemu's default SeaBIOS. The disk is read
    through a throwaway overlay (snapshot=on), the serial console is stdout, and the guest powers itself off."""
    firmware = ["-bios", str(OVMF)] if ovmf else []
    return subprocess.run(
        ["qemu-system-x86_64", "-machine", "pc,accel=tcg", "-m", "512", "-nodefaults", "-nographic",
         "-no-reboot", "-serial", "stdio", "-display", "none", *firmware,
         "-drive", f"file={disk},format=qcow2,if=virtio,snapshot=on"],
        capture_output=True, timeout=240,
    )


def console_of(proc: subprocess.CompletedProcess[bytes]) -> tuple[bytes, bytes]:
    """(the workload's output, the rest of the console from its exit marker on) of a plain-qemu boot."""
    console = proc.stdout.replace(b"\r\n", b"\n")
    assert b"<<imgconv:start>>\n" in console, console[-3000:].decode(errors="replace")
    workload, marker, status = console.split(b"<<imgconv:start>>\n", 1)[1].rpartition(b"<<imgconv:exit status=")
    assert marker, console[-3000:].decode(errors="replace")
    return workload, status


def test_uefi_disk_is_gpt_with_the_uki_on_its_esp(disk: Callable[..., Path], tmp_path: Path) -> None:
    uefi = disk("uefi")
    sidecar = json.loads(Path(f"{uefi}.json").read_text())
    assert sidecar["firmware"] == "uefi" and sidecar["options"]["firmware"] == "uefi"
    raw = raw_copy(uefi, tmp_path)
    table = partitions(raw)
    assert table["label"] == "gpt"
    esp, root = table["partitions"]  # type: ignore[misc]
    assert esp["type"] == ESP_TYPE and esp["start"] == 2048
    assert root["type"] == "0FC63DAF-8483-4772-8E79-3D69D8477DE4" and LEGACY_BOOT not in root.get("attrs", "")
    assert raw.read_bytes()[:440] == bytes(440)  # no BIOS boot code: a UEFI-only disk
    # the UKI, read out of the FAT filesystem by mtools: the kernel command line is the one the sidecar records
    uki = tmp_path / "BOOTX64.EFI"
    subprocess.run(["mcopy", "-i", f"{raw}@@{esp['start'] * 512}", "::/EFI/BOOT/BOOTX64.EFI", str(uki)], check=True)
    headers = subprocess.run(["objdump", "-h", str(uki)], capture_output=True, text=True, check=True).stdout
    assert all(re.search(rf"\s{re.escape(name)}\s", headers) for name in (".osrel", ".cmdline", ".linux", ".initrd"))
    cmdline = tmp_path / "cmdline"
    subprocess.run(["objcopy", "-O", "binary", "--only-section=.cmdline", str(uki), str(cmdline)], check=True)
    assert cmdline.read_text() == sidecar["boot"]["cmdline"]


def test_imgconv_boot_runs_a_uefi_disk_under_ovmf(disk: Callable[..., Path]) -> None:
    uefi = disk("uefi")
    booted = imgconv("boot", "--timeout", "240", str(uefi), timeout=300)
    assert (booted.stdout_bytes, booted.code) == (busybox.EXPECTED_STDOUT.encode(), 0), booted.stderr[-2000:]
    # the workload's own exit code, and the firmware imgconv chose, shown in the verbose qemu command
    exits = imgconv("boot", "--timeout", "240", "--verbose", "--entrypoint", "/bin/sh", str(uefi),
                    "-c", "echo out; exit 7", timeout=300)
    assert (exits.stdout, exits.code) == ("out\n", 7), exits.stderr[-2000:]
    assert f"-bios {OVMF}" in exits.stderr


def test_both_boots_under_seabios_and_under_ovmf(disk: Callable[..., Path], tmp_path: Path) -> None:
    both = disk("both")
    raw = raw_copy(both, tmp_path)
    table = partitions(raw)
    _esp, root = table["partitions"]  # type: ignore[misc]
    assert table["label"] == "gpt" and LEGACY_BOOT in root.get("attrs", "")
    assert raw.read_bytes()[:440] == GPT_MBR_CODE.read_bytes()[:440]
    raw.unlink()
    # imgconv boots it through SeaBIOS (faster under TCG): no -bios in its command
    booted = imgconv("boot", "--timeout", "240", "--verbose", str(both), timeout=300)
    assert (booted.stdout_bytes, booted.code) == (busybox.EXPECTED_STDOUT.encode(), 0), booted.stderr[-2000:]
    assert "qemu-system-x86_64" in booted.stderr and "-bios" not in booted.stderr
    # and plain qemu with OVMF boots the same disk through its UKI
    proc = plain_qemu(both, ovmf=True)
    assert b"BdsDxe" in proc.stdout  # OVMF's boot manager, not SeaBIOS
    workload, status = console_of(proc)
    assert workload == busybox.EXPECTED_STDOUT.encode() and status.startswith(b"0>>")
    assert proc.returncode == 0  # the guest powered itself off


def without_resolv_conf(output: bytes) -> bytes:
    """The runtime fixture's output without its /etc/resolv.conf block: docker's is the host's, filtered, which
    `imgconv boot` passes in and plain qemu does not; everything else it prints is the runtime's, compared."""
    head, marker, rest = output.partition(b"== /etc/resolv.conf ")
    assert marker, output.decode(errors="replace")
    return head + rest[rest.index(b"mounted on /etc: "):]


@pytest.mark.parametrize("name", NAMES)
def test_every_fixture_boots_under_plain_qemu_with_ovmf_like_docker_run(
        name: str, disk: Callable[..., Path], fixture_image: Callable[[str], FixtureImage],
        docker_world: DockerWorld) -> None:
    """No imgconv at boot time: OVMF -> EFI/BOOT/BOOTX64.EFI (the UKI) -> kernel -> initramfs -> init -> workload,
    which prints what `docker run` of the same image prints and ends with its exit code."""
    docker = docker_world.run(fixture_image(name).repo_tag)
    assert docker.stderr == b"", "the fixture images write only to stdout"
    proc = plain_qemu(disk("uefi", name), ovmf=True)
    assert b"BdsDxe" in proc.stdout  # OVMF's boot manager, not SeaBIOS
    workload, status = console_of(proc)
    assert status.startswith(f"{docker.exit_code}>>".encode()), status[:200]
    if name == "runtime":
        workload, expected = without_resolv_conf(workload), without_resolv_conf(docker.stdout)
    else:
        expected = docker.stdout
    assert workload == expected, workload.decode(errors="replace")
    assert proc.returncode == 0  # the guest powered itself off


def test_vm_to_oci_of_a_uefi_disk_is_the_original(disk: Callable[..., Path],
                                                  built_fixture: Callable[[str], BuiltFixture],
                                                  tmp_path: Path) -> None:
    image = built_fixture("busybox")
    layout = tmp_path / "exported"
    result = imgconv("vm-to-oci", "--json", str(disk("uefi")), f"oci:{layout}:1").ok().json
    assert result["source"]["made_by_imgconv"] is True
    exported = umoci_tree(layout, "1", tmp_path)
    original = umoci_tree(image.oci_dir, image.tag, tmp_path)
    assert diff_trees(original, exported, hardlinks=True) == []
    assert len(original) >= 7


def test_an_images_own_kernel_is_read_back_out_of_the_disk_into_the_uki(tmp_path: Path) -> None:
    """The image ships its kernel (the host's bytes, at /boot/vmlinuz-RELEASE) and the modules the initramfs needs:
    the UKI is built from the kernel file read back out of the disk, and boots under OVMF."""
    kernel = host_kernel()
    assert kernel.host_path is not None and kernel.host_modules is not None
    modules = kernel.host_modules
    tree = f"lib/modules/{kernel.release}"
    needed = needed_modules(modules, BOOT_MODULES)
    specs = [d("bin"), f("bin/busybox", Path("/bin/busybox").read_bytes(), 0o755), sym("bin/sh", "busybox"),
             sym("bin/uname", "busybox"), d("boot"), f(f"boot/vmlinuz-{kernel.release}", kernel.host_path.read_bytes()),
             d("lib"), d("lib/modules"), d(tree)]
    specs += [f(f"{tree}/{name}", (modules / name).read_bytes()) for name in ("modules.dep", "modules.builtin")]
    specs += [d(f"{tree}/{'/'.join(Path(rel).parts[:i])}") for rel in needed for i in range(1, len(Path(rel).parts))]
    specs += [f(f"{tree}/{rel}", (modules / rel).read_bytes()) for rel in needed]
    unique = list({info.name: (info, data) for info, data in specs}.values())
    tar = layer(*unique)
    layout = tmp_path / "layout"
    Layout(layout).image([tar], config=config_json(["sha256:" + hashlib.sha256(tar).hexdigest()], config={
        "Entrypoint": ["/bin/sh", "-c", "echo own kernel; uname -r"]}))
    out = tmp_path / "own.qcow2"
    imgconv("oci-to-qcow2", "--quiet", "--firmware", "uefi", f"oci:{layout}", str(out)).ok()
    assert json.loads(Path(f"{out}.json").read_text())["kernel"] == {"release": kernel.release, "origin": "image"}
    booted = imgconv("boot", "--timeout", "240", str(out), timeout=300)
    assert (booted.stdout, booted.code) == (f"own kernel\n{kernel.release}\n", 0), booted.stderr[-2000:]
