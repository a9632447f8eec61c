"""converter/disk/uefi.py without an appliance: the unified kernel image's sections (judged by binutils' `objdump`,
not by imgconv's own PE reader), the partition table a boot reads (disks partitioned by util-linux's `sfdisk`),
the ESP's place, and the errors. The integration tests boot such disks: tests/integration/test_uefi.py."""

from __future__ import annotations

import itertools
import json
import re
import struct
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from converter.disk import build, uefi
from converter.disk.plan import ESP_MIN, MiB, partition_layout
from converter.disk.safety import open_disk, pinned
from converter.disk.uefi import Firmware, PeImage, build_uki, disk_firmware, firmware_of_head, read_pe, uki_layout
from converter.errors import ImageError, MissingToolError, ToolError, UsageError
from tests.cli import Ran

CMDLINE = "root=UUID=01807575-bf51-4cf9-892d-6ffc29db4b53 rw console=ttyS0 init=/.imgconv/init quiet"


def objdump_sections(path: Path) -> dict[str, tuple[int, int]]:
    """name -> (VMA, size) as `objdump -h` reads the PE file."""
    out = subprocess.run(["objdump", "-h", str(path)], capture_output=True, text=True, check=True).stdout
    found = {}
    for m in re.finditer(r"^\s*\d+\s+(\S+)\s+([0-9a-f]+)\s+([0-9a-f]+)\s+[0-9a-f]+\s+[0-9a-f]+", out, re.MULTILINE):
        found[m.group(1)] = (int(m.group(3), 16), int(m.group(2), 16))
    return found


def objdump_header(path: Path, field: str) -> int:
    out = subprocess.run(["objdump", "-p", str(path)], capture_output=True, text=True, check=True).stdout
    m = re.search(rf"^{field}\s+([0-9a-f]+)", out, re.MULTILINE)
    assert m, out[:2000]
    return int(m.group(1), 16)


def fake_kernel(path: Path, size: int, init_size: int) -> Path:
    """A file with an x86 boot protocol 2.15 setup header (HdrS) claiming *init_size* bytes in memory."""
    data = bytearray(size)
    data[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", data, 0x206, 0x20F)
    struct.pack_into("<I", data, 0x260, init_size)
    data[-16:] = b"end of kernel..."
    path.write_bytes(bytes(data))
    return path


def test_the_stub_is_read_as_objdump_reads_it() -> None:
    stub = read_pe(uefi.STUB.read_bytes(), str(uefi.STUB))
    assert stub.section_alignment == objdump_header(uefi.STUB, "SectionAlignment")
    assert stub.image_base == objdump_header(uefi.STUB, "ImageBase")
    sections = objdump_sections(uefi.STUB)
    assert set(stub.sections) == set(sections)
    # past every section (its raw, file-aligned size counted too), within the image the loader allocates
    assert max(vma + size for vma, size in sections.values()) <= stub.image_base + stub.end
    assert stub.end <= objdump_header(uefi.STUB, "SizeOfImage")


def test_the_uki_has_every_section_after_the_stub_none_overlapping(tmp_path: Path) -> None:
    kernel = fake_kernel(tmp_path / "vmlinuz", 3 * MiB + 123, init_size=9 * MiB)
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"initramfs " * 100_000)
    out = tmp_path / "BOOTX64.EFI"
    placed = build_uki(kernel, initrd, CMDLINE, out)

    stub_sections = objdump_sections(uefi.STUB)
    sections = objdump_sections(out)
    assert set(sections) == set(stub_sections) | {".osrel", ".cmdline", ".linux", ".initrd"}
    assert {s.name: s.vma for s in placed} == {name: sections[name][0] for name in (".osrel", ".cmdline", ".linux",
                                                                                     ".initrd")}
    sizes = {".osrel": len(uefi.os_release()), ".cmdline": len(CMDLINE), ".linux": kernel.stat().st_size,
             ".initrd": initrd.stat().st_size}
    assert {name: sections[name][1] for name in sizes} == sizes
    spans = sorted((vma, vma + size) for vma, size in sections.values())
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans)), spans
    assert all(sections[name][0] % 4096 == 0 for name in sizes)
    # the kernel may decompress in place: its whole init_size stays clear of the initramfs
    assert sections[".initrd"][0] >= sections[".linux"][0] + 9 * MiB
    # the contents are the files, byte for byte (objcopy as the reader)
    for name, expected in ((".cmdline", CMDLINE.encode()), (".linux", kernel.read_bytes())):
        dumped = tmp_path / f"dump{name}"
        subprocess.run(["objcopy", "-O", "binary", f"--only-section={name}", str(out), str(dumped)], check=True)
        assert dumped.read_bytes() == expected
    assert objdump_header(out, "SizeOfImage") >= sections[".initrd"][0] + sizes[".initrd"]


def test_a_kernel_smaller_in_memory_than_on_disk_keeps_its_file_size(tmp_path: Path) -> None:
    kernel = fake_kernel(tmp_path / "vmlinuz", 2 * MiB, init_size=1 * MiB)
    assert uefi.kernel_span(kernel) == 2 * MiB
    plain = tmp_path / "plain"
    plain.write_bytes(b"\0" * 5000)
    assert uefi.kernel_span(plain) == 5000


@pytest.mark.parametrize("alignment", [0x200, 0x1000, 0x10000])
def test_the_layout_is_aligned_ordered_and_disjoint(alignment: int, tmp_path: Path) -> None:
    stub = PeImage(image_base=0x140000000, section_alignment=alignment, end=0x19134, sections=(".text",))
    parts = [(".osrel", tmp_path, 72), (".cmdline", tmp_path, 0), (".linux", tmp_path, 50 * MiB + 1),
             (".initrd", tmp_path, 7)]
    placed = uki_layout(stub, parts)
    assert [s.name for s in placed] == [".osrel", ".cmdline", ".linux", ".initrd"]
    assert placed[0].vma >= stub.image_base + stub.end
    for a, b in itertools.pairwise(placed):
        assert a.vma + max(a.span, 1) <= b.vma
    assert all(s.vma % max(alignment, 4096) == 0 for s in placed)


def test_a_kernel_without_an_efi_stub_is_refused(tmp_path: Path) -> None:
    uefi.check_efi_kernel(host_kernel_file(), "the host's kernel")  # Debian's kernels have one
    legacy = fake_kernel(tmp_path / "vmlinuz", 64 * 1024, init_size=0)
    with pytest.raises(ImageError, match=r"^--kernel .*vmlinuz has no EFI stub .* use --firmware bios"):
        uefi.check_efi_kernel(legacy, f"--kernel {legacy}")


def host_kernel_file() -> Path:
    from converter.boot.kernel import host_kernel

    path = host_kernel().host_path
    assert path is not None
    return path


def test_a_stub_that_is_not_pe_is_refused_in_one_line() -> None:
    with pytest.raises(MissingToolError, match=r"not an EFI stub .*systemd-boot-efi") as caught:
        read_pe(b"MZ" + b"\0" * 100, "/x/linuxx64.efi.stub")
    assert "\n" not in str(caught.value)


def test_objcopy_failures_are_one_line_tool_errors(tmp_path: Path) -> None:
    with pytest.raises(ToolError, match=r"^objcopy failed \(exit \d+\) while trying to add it: .*nonexistent"):
        uefi.objcopy(["--add-section", f".x={tmp_path}/nonexistent", uefi.STUB, tmp_path / "out.efi"], "add it")


def test_a_missing_stub_names_its_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    uefi.check_tools(Firmware.BIOS)  # BIOS needs none of it
    monkeypatch.setattr(uefi, "STUB", tmp_path / "linuxx64.efi.stub")
    for firmware in (Firmware.UEFI, Firmware.BOTH):
        with pytest.raises(MissingToolError, match=r"Debian package: systemd-boot-efi"):
            uefi.check_tools(firmware)


# -- the partition table says which firmware ------------------------------------------------------------------------


def sfdisk(path: Path, script: str, size: int = 80 * MiB) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    subprocess.run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(path)], input=script, text=True,
                   check=True, capture_output=True)
    return path


ESP_SCRIPT = "label: gpt\nstart=2048, size=131072, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\ntype=linux\n"


def test_firmware_of_the_partition_table(tmp_path: Path) -> None:
    def head(path: Path) -> bytes:
        return path.read_bytes()[:uefi.HEAD_SECTORS * 512]

    gpt_esp = sfdisk(tmp_path / "uefi.img", ESP_SCRIPT)
    assert firmware_of_head(head(gpt_esp)) is Firmware.UEFI
    with gpt_esp.open("r+b") as f:  # syslinux's GPT MBR code: a BIOS path too
        f.write(uefi.GPT_MBR_CODE.read_bytes()[:440])
    assert firmware_of_head(head(gpt_esp)) is Firmware.BOTH
    mbr = sfdisk(tmp_path / "mbr.img", "label: dos\nstart=2048, type=83, bootable\n")
    assert firmware_of_head(head(mbr)) is Firmware.BIOS
    gpt_plain = sfdisk(tmp_path / "gpt.img", "label: gpt\nstart=2048, type=linux\n")
    assert firmware_of_head(head(gpt_plain)) is Firmware.BIOS
    assert firmware_of_head(b"") is Firmware.BIOS
    assert firmware_of_head(b"\0" * 512 + b"EFI PART" + b"\xff" * 600) is Firmware.BIOS  # garbage header


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_boot_reads_the_partition_table_of_the_checked_disk(fmt: str, tmp_path: Path) -> None:
    raw = sfdisk(tmp_path / "disk.img", ESP_SCRIPT)
    disk_path = raw
    if fmt == "qcow2":
        disk_path = tmp_path / "disk.qcow2"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(disk_path)], check=True)
    disk = open_disk(disk_path)
    with pinned(disk) as name:
        assert disk_firmware(disk, name, tmp_path) is Firmware.UEFI
    assert uefi.firmware_args(Firmware.UEFI) == ["-bios", str(uefi.OVMF)]
    assert uefi.firmware_args(Firmware.BOTH) == uefi.firmware_args(Firmware.BIOS) == []


def test_the_gpt_imgconv_writes_is_what_partitioners_read(tmp_path: Path) -> None:
    sectors = 600 * 2048 + 7  # not a whole MiB: the backup GPT is still in the very last sectors
    esp = uefi.GptPartition(2048, 2048 + 131071, uefi.ESP_TYPE, uuid.UUID(int=2), "EFI system partition")
    root = uefi.GptPartition(133120, uefi._aligned_end(sectors), uefi.LINUX_TYPE, uuid.UUID(int=3), "root",
                             uefi.LEGACY_BIOS_BOOTABLE)
    primary, backup = uefi.gpt(sectors, uuid.UUID(int=1), [esp, root])
    assert len(primary) == 34 * 512 and len(backup) == 33 * 512
    raw = tmp_path / "disk.img"
    with raw.open("wb") as f:
        f.truncate(sectors * 512)
        f.write(primary)
        f.seek((sectors - 33) * 512)
        f.write(backup)
    verified = subprocess.run(["sgdisk", "--verify", str(raw)], capture_output=True, text=True)
    assert "No problems found" in verified.stdout, verified.stdout + verified.stderr
    table = json.loads(subprocess.run(["sfdisk", "--json", str(raw)], capture_output=True, text=True,
                                      check=True).stdout)["partitiontable"]
    assert (table["label"], table["id"], table["lastlba"]) == ("gpt", str(uuid.UUID(int=1)).upper(), sectors - 34)
    got = [(p["start"], p["size"], p["type"], p["uuid"], p["name"], p.get("attrs")) for p in table["partitions"]]
    assert got == [(2048, 131072, uefi.ESP_TYPE, str(uuid.UUID(int=2)).upper(), "EFI system partition", None),
                   (133120, root.last - 133120 + 1, uefi.LINUX_TYPE, str(uuid.UUID(int=3)).upper(), "root",
                    "LegacyBIOSBootable")]
    assert (root.last + 1) % 2048 == 0 and root.last <= sectors - 34
    assert firmware_of_head(primary) is Firmware.UEFI


# -- the disk's layout and the pipeline -----------------------------------------------------------------------------


def test_the_esp_is_first_aligned_and_sized_for_the_boot_files() -> None:
    assert partition_layout(False, "/dev/sda") == partition_layout(False, "/dev/sda", 10 * MiB)
    assert partition_layout(False, "/dev/sda").root_device == "/dev/sda1"
    small = partition_layout(True, "/dev/sda")
    assert (small.table, small.esp_device, small.root_device, small.esp_bytes) == ("gpt", "/dev/sda1", "/dev/sda2",
                                                                                    ESP_MIN)
    first, last = small.esp_sectors
    assert first * 512 == MiB and (last + 1) * 512 == MiB + ESP_MIN
    big = partition_layout(True, "/dev/sda", 100 * MiB)  # a large --initrd
    assert big.esp_bytes >= 125 * MiB and big.esp_bytes % MiB == 0


def test_a_uefi_conversion_adds_install_uefi_after_install_boot() -> None:
    bios = build.pipeline("keep").step_ids
    for firmware in (Firmware.UEFI, Firmware.BOTH):
        ids = build.pipeline("keep", firmware).step_ids
        at = ids.index("install-boot") + 1
        assert ids[:at] + ids[at + 1:] == bios and ids[at] == "install-uefi"


def test_an_unknown_firmware_is_a_usage_error(imgconv: Callable[..., Ran]) -> None:
    ran = imgconv("oci-to-qcow2", "--firmware", "coreboot", "oci:/nonexistent:1", "out.qcow2")
    assert ran.code == 2
    assert ran.stderr.strip().splitlines() == ["imgconv: error: unknown firmware 'coreboot'; choose one of bios, "
                                               "uefi, both"]


def test_too_small_a_size_for_the_esp_is_a_usage_error(tmp_path: Path) -> None:
    options = build.BuildOptions(output=tmp_path / "x.qcow2", size=100 * MiB, firmware=Firmware.UEFI)
    with pytest.raises(UsageError, match=r"^--size 104857600 leaves no room .* 64 MiB EFI system partition$"):
        build.plan_layout(options)
    assert build.plan_layout(build.BuildOptions(output=tmp_path / "x.qcow2", size=100 * MiB)).table == "mbr"
