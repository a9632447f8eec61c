"""UEFI boot: a GPT disk whose EFI system partition holds one unified kernel image (UKI), and which firmware a
disk wants when it is booted.

A UKI is systemd's EFI stub (Debian's ``systemd-boot-efi``: ``linuxx64.efi.stub``) with the kernel, the
initramfs and the kernel command line added as PE sections (``.linux``, ``.initrd``, ``.cmdline``, plus
``.osrel``). Placed at the removable-media path ``EFI/BOOT/BOOTX64.EFI``, any UEFI firmware boots it with no
boot entry in its NVRAM and no bootloader configuration. Bookworm's systemd 252 has no ``ukify``, so the
sections are added with ``objcopy``; their addresses are computed here from the stub's own PE headers (read
in Python: ``objdump`` is left to the tests as an independent judge), each after the previous one, aligned,
none overlapping. The kernel's span is its in-memory size (``init_size`` from the bzImage header) when that
is larger than the file, so the kernel decompressing in place cannot overwrite the initramfs after it.

``--firmware both`` keeps the BIOS path on the same GPT disk: syslinux's ``gptmbr.bin`` in the protective
MBR boots the partition marked legacy-BIOS-bootable (the root filesystem, where extlinux is installed).

The GPT is written by :func:`gpt` (bytes computed here, two writes in the appliance) rather than by parted,
whose calls cost about a second each under TCG. ``imgconv boot`` reads the table back (:func:`disk_firmware`):
a GPT disk with an EFI system partition and no MBR boot code boots under OVMF, every other disk (``both``, and
every disk imgconv made before UEFI) under SeaBIOS, which starts faster. This module does not import libguestfs,
so ``boot`` pays nothing for it.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import uuid
import zlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from converter import __version__
from converter.disk.reproducible import derived_id, fat_time, sbin_tool, write_at
from converter.errors import DiskError, ImageError, MissingToolError, ToolError
from converter.run import run

if TYPE_CHECKING:
    from converter.disk.plan import PartitionLayout
    from converter.disk.safety import SafeDisk

STUB = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")
OVMF = Path("/usr/share/ovmf/OVMF.fd")
GPT_MBR_CODE = Path("/usr/lib/syslinux/mbr/gptmbr.bin")
MBR_CODE_BYTES = 440  # the rest of the first sector is the (protective) partition table
REMOVABLE_PATH = "/EFI/BOOT/BOOTX64.EFI"  # what UEFI firmware boots from a disk with no boot entry for it
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"  # Linux filesystem data
GPT_ENTRIES = 128  # the minimum the UEFI specification allows, and what every tool writes
GPT_ENTRY_SIZE = 128
LEGACY_BIOS_BOOTABLE = 1 << 2  # GPT attribute bit 2: gptmbr.bin boots the partition that has it
PAGE = 4096
SECTOR = 512
ALIGN_SECTORS = 2048  # 1 MiB
HEAD_SECTORS = 34  # protective MBR, GPT header, 128 entries of 128 bytes
OBJCOPY_TIMEOUT = 300.0


class Firmware(StrEnum):
    """What a disk is made to boot under: SeaBIOS-style BIOS, UEFI, or both from one GPT disk."""

    BIOS = "bios"
    UEFI = "uefi"
    BOTH = "both"

    @property
    def bios_path(self) -> bool:
        return self is not Firmware.UEFI

    @property
    def uefi_path(self) -> bool:
        return self is not Firmware.BIOS


def check_tools(firmware: Firmware) -> None:
    """Fail before anything is built when a file the firmware needs is not installed (exit 4, with the package)."""
    if not firmware.uefi_path:
        return
    if not STUB.is_file():
        raise MissingToolError(f"{STUB} is required to build a UEFI disk (Debian package: systemd-boot-efi)")
    if shutil.which("objcopy") is None:
        raise MissingToolError("objcopy is required to build a UEFI disk (Debian package: binutils)")
    sbin_tool("mkfs.vfat", "dosfstools", "build a UEFI disk")
    for program in ("mmd", "mcopy"):
        sbin_tool(program, "mtools", "build a UEFI disk")
    if firmware.bios_path and not GPT_MBR_CODE.is_file():
        raise MissingToolError(f"{GPT_MBR_CODE} is required for --firmware both (Debian package: syslinux-common)")


# -- the stub's PE headers and the sections' addresses ------------------------------------------------------------


@dataclass(frozen=True)
class PeImage:
    """What the UKI's layout needs of the stub: where its image ends in memory and how sections are aligned."""

    image_base: int
    section_alignment: int
    end: int  # relative virtual address just past its last section
    sections: tuple[str, ...]


def read_pe(data: bytes, what: str) -> PeImage:
    """The PE32+ headers of *data* (the EFI stub); a file that is not one is refused in one line."""
    try:
        if data[:2] != b"MZ":
            raise ValueError("no MZ header")
        pe = struct.unpack_from("<I", data, 0x3C)[0]
        if data[pe:pe + 4] != b"PE\0\0":
            raise ValueError("no PE signature")
        count = struct.unpack_from("<H", data, pe + 6)[0]
        optional_size = struct.unpack_from("<H", data, pe + 20)[0]
        optional = pe + 24
        if struct.unpack_from("<H", data, optional)[0] != 0x20B:
            raise ValueError("not PE32+")
        image_base, alignment = struct.unpack_from("<QI", data, optional + 24)
        names, end = [], 0
        for i in range(count):
            at = optional + optional_size + 40 * i
            name, virtual_size, address, raw_size = struct.unpack_from("<8sIII", data, at)
            names.append(name.rstrip(b"\0").decode("ascii", "replace"))
            end = max(end, address + max(virtual_size, raw_size))
    except (struct.error, ValueError) as exc:
        raise MissingToolError(f"{what} is not an EFI stub ({exc}): reinstall systemd-boot-efi") from exc
    return PeImage(image_base, alignment or PAGE, end, tuple(names))


@dataclass(frozen=True)
class Section:
    """A section added to the stub: its file, its address (absolute, as objcopy wants it) and its span."""

    name: str
    path: Path
    vma: int
    span: int  # bytes reserved in memory from vma (at least the file's size)


def _round_up(value: int, align: int) -> int:
    return -(-value // align) * align


def uki_layout(stub: PeImage, parts: Sequence[tuple[str, Path, int]]) -> tuple[Section, ...]:
    """Addresses for *parts* ``(name, file, span)``: in order after the stub's own sections, each aligned to the
    stub's section alignment (at least a page), none overlapping another or the stub."""
    align = max(stub.section_alignment, PAGE)
    at, placed = _round_up(stub.end, align), []
    for name, path, span in parts:
        placed.append(Section(name, path, stub.image_base + at, span))
        at = _round_up(at + max(span, 1), align)
    return tuple(placed)


def kernel_span(kernel: Path) -> int:
    """Bytes the kernel needs in memory where it is loaded: its file, or its setup header's ``init_size``
    (boot protocol 2.10+) if larger, since it may decompress in place."""
    size = kernel.stat().st_size
    with kernel.open("rb") as f:
        header = f.read(0x264)
    if len(header) == 0x264 and header[0x202:0x206] == b"HdrS" and struct.unpack_from("<H", header, 0x206)[0] >= 0x20A:
        init_size: int = struct.unpack_from("<I", header, 0x260)[0]
        return max(size, init_size)
    return size


def check_efi_kernel(kernel: Path, what: str) -> None:
    """Refuse a kernel built without an EFI stub (no PE header): the systemd stub starts the kernel as an EFI
    image, so such a UKI would build and then hang at boot with nothing on the console."""
    with kernel.open("rb") as f:
        head = f.read(4096)
    at = struct.unpack_from("<I", head, 0x3C)[0] if len(head) >= 0x40 else len(head)
    if head[:2] != b"MZ" or head[at:at + 4] != b"PE\0\0":
        raise ImageError(f"{what} has no EFI stub (CONFIG_EFI_STUB), so it cannot boot under UEFI; "
                         "use --firmware bios or another kernel")


def os_release() -> str:
    """The UKI's ``.osrel``: what boot menus show for it. imgconv's own words: nothing from the image."""
    return f'NAME="imgconv"\nID=imgconv\nVERSION_ID="{__version__}"\nPRETTY_NAME="imgconv disk"\n'


def objcopy(args: Sequence[str | Path], purpose: str, epoch: int = 0) -> None:
    """objcopy, its absence and its failures as imgconv's one-line errors (MissingToolError, ToolError). A PE
    file's header gets the time *epoch* (binutils reads SOURCE_DATE_EPOCH; else it writes the clock's)."""
    if shutil.which("objcopy") is None:
        raise MissingToolError(f"objcopy is required to {purpose} (Debian package: binutils)")
    run(["objcopy", *args], purpose=purpose, timeout=OBJCOPY_TIMEOUT,
        env={**os.environ, "SOURCE_DATE_EPOCH": str(epoch)})


def build_uki(kernel: Path, initrd: Path, cmdline: str, out: Path, stub: Path = STUB,
              epoch: int = 0) -> tuple[Section, ...]:
    """Write the UKI booting *kernel* with *initrd* and *cmdline* to *out*, its PE timestamp *epoch*; return the
    sections it added."""
    osrel, cmdline_file = out.with_name(out.name + ".osrel"), out.with_name(out.name + ".cmdline")
    osrel.write_text(os_release())
    cmdline_file.write_text(cmdline)
    layout = uki_layout(read_pe(stub.read_bytes(), str(stub)), [
        (".osrel", osrel, osrel.stat().st_size), (".cmdline", cmdline_file, cmdline_file.stat().st_size),
        (".linux", kernel, kernel_span(kernel)), (".initrd", initrd, initrd.stat().st_size),
    ])
    args: list[str | Path] = []
    for section in layout:
        args += ["--add-section", f"{section.name}={section.path}",
                 "--change-section-vma", f"{section.name}={section.vma:#x}"]
    objcopy([*args, stub, out], "build the unified kernel image (UEFI)", epoch)
    stamp_pe(out, epoch)
    return layout


def stamp_pe(path: Path, epoch: int) -> None:
    """Give the PE file at *path* the header time *epoch* and its matching checksum. objcopy 2.40 writes the
    clock's time into a PE file it copies (SOURCE_DATE_EPOCH notwithstanding): a UKI would differ every second."""
    data = bytearray(path.read_bytes())
    pe = struct.unpack_from("<I", data, 0x3C)[0]
    checksum_at = pe + 24 + 64  # the optional header's CheckSum
    struct.pack_into("<I", data, pe + 8, epoch & 0xFFFFFFFF)  # the COFF header's TimeDateStamp
    struct.pack_into("<I", data, checksum_at, 0)
    words = array("H", bytes(data) + b"\0" * (len(data) % 2))
    if sys.byteorder == "big":
        words.byteswap()
    total = sum(words)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    struct.pack_into("<I", data, checksum_at, (total + len(data)) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))


# -- the disk: GPT, the EFI system partition, the UKI in it -------------------------------------------------------


@dataclass(frozen=True)
class GptPartition:
    first: int  # sectors, inclusive
    last: int
    type: str  # partition type GUID
    guid: uuid.UUID
    name: str
    attributes: int = 0


def _gpt_header(sectors: int, disk: uuid.UUID, entries: bytes, backup: bool) -> bytes:
    """One GPT header sector: the primary (LBA 1, entries from LBA 2) or the backup (last LBA, entries before it)."""
    mine, other = (sectors - 1, 1) if backup else (1, sectors - 1)
    entries_lba = sectors - 1 - len(entries) // SECTOR if backup else 2
    fields = [b"EFI PART", 0x10000, 92, 0, 0, mine, other, HEAD_SECTORS, sectors - HEAD_SECTORS, disk.bytes_le,
              entries_lba, GPT_ENTRIES, GPT_ENTRY_SIZE, zlib.crc32(entries)]
    header = struct.pack("<8sIIIIQQQQ16sQIII", *fields)
    fields[3] = zlib.crc32(header)
    return struct.pack("<8sIIIIQQQQ16sQIII", *fields).ljust(SECTOR, b"\0")


def gpt(sectors: int, disk: uuid.UUID, partitions: Sequence[GptPartition]) -> tuple[bytes, bytes]:
    """A whole GPT for a disk of *sectors*: (protective MBR + primary header + entries, for sector 0; entries +
    backup header, for the last 33 sectors). Written by imgconv rather than by parted in the appliance: five
    parted calls cost ~5 s under TCG, two writes of these bytes almost nothing."""
    entries = b"".join(
        struct.pack("<16s16sQQQ72s", uuid.UUID(p.type).bytes_le, p.guid.bytes_le, p.first, p.last, p.attributes,
                    p.name.encode("utf-16-le")) for p in partitions).ljust(GPT_ENTRIES * GPT_ENTRY_SIZE, b"\0")
    protective = struct.pack("<B3sB3sII", 0, b"\x00\x02\x00", 0xEE, b"\xff\xff\xff", 1,
                             min(sectors - 1, 0xFFFFFFFF))
    mbr = bytes(446) + protective + bytes(48) + b"\x55\xaa"
    return (mbr + _gpt_header(sectors, disk, entries, False) + entries,
            entries + _gpt_header(sectors, disk, entries, True))


def _aligned_end(sectors: int) -> int:
    """The last sector of a partition that ends at a 1 MiB boundary before the backup GPT (as partitioners align)."""
    return (sectors - HEAD_SECTORS + 1) // ALIGN_SECTORS * ALIGN_SECTORS - 1


def partition_gpt(disk: Path, layout: PartitionLayout, disk_size: int, ids: str, firmware: Firmware) -> None:
    """GPT with the EFI system partition (FAT) first and the root partition after it, to the end of the disk,
    written into the raw work disk *disk* before the appliance starts. The GUIDs and the FAT volume id are
    derived from *ids* (the root filesystem's UUID, itself from the image): the same image gives the same disk."""
    sectors = -(-disk_size // SECTOR)
    esp_first, esp_last = layout.esp_sectors
    base = uuid.UUID(ids)
    primary, backup = gpt(sectors, uuid.uuid5(base, "disk"), [
        GptPartition(esp_first, esp_last, ESP_TYPE, uuid.uuid5(base, "esp"), "EFI system partition"),
        GptPartition(esp_last + 1, _aligned_end(sectors), LINUX_TYPE, uuid.uuid5(base, "root"), "root",
                     LEGACY_BIOS_BOOTABLE if firmware.bios_path else 0),
    ])
    write_at(disk, primary, 0)
    write_at(disk, backup, (sectors - len(backup) // SECTOR) * SECTOR)
    # --invariant: no clock in the volume label's directory entry; the volume id is given. The FAT type is given
    # too: on a file mkfs.vfat would pick it by the whole file's size (FAT32, too few clusters for 64 MiB).
    run([sbin_tool("mkfs.vfat", "dosfstools", "build a UEFI disk"), "--invariant", "-i",
         derived_id(ids, "esp-volume-id").hex[:8], "-n", "ESP", "-F", "16" if layout.esp_bytes < 1 << 30 else "32",
         f"--offset={esp_first}", str(disk), str(layout.esp_bytes // 1024)],
        purpose="create the EFI system partition's filesystem")


def install_uki(disk: Path, uki: Path, layout: PartitionLayout, epoch: int) -> None:
    """The UKI at the removable-media path of the ESP, written by mtools into the work disk (the appliance never
    mounts the ESP: its FAT driver would stamp the clock's time), with the build's time (clamped to 1980)."""
    room = layout.esp_bytes - layout.esp_bytes // 16  # FAT tables, root directory, slack
    if uki.stat().st_size > room:
        raise ImageError(f"the unified kernel image ({uki.stat().st_size >> 20} MiB: kernel + initramfs) does not "
                         f"fit the {layout.esp_bytes >> 20} MiB EFI system partition")
    when = fat_time(epoch)
    os.utime(uki, (when, when))
    image = f"{disk}@@{layout.esp_sectors[0] * SECTOR}"
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(when), "MTOOLS_SKIP_CHECK": "1", "MTOOLSRC": "/dev/null"}
    boot_dir = str(Path(REMOVABLE_PATH).parent)
    run(["mmd", "-i", image, f"::{Path(boot_dir).parent}", f"::{boot_dir}"], purpose="create /EFI/BOOT on the EFI "
        "system partition", env=env)
    run(["mcopy", "-m", "-i", image, str(uki), f"::{REMOVABLE_PATH}"], purpose="copy the unified kernel image in",
        env=env)


def gpt_mbr_code() -> bytes:
    """syslinux's GPT-aware MBR code, for the protective MBR (its partition entry left as it is)."""
    return GPT_MBR_CODE.read_bytes()[:MBR_CODE_BYTES]


# -- which firmware a disk wants ------------------------------------------------------------------------------------


def firmware_of_head(head: bytes) -> Firmware:
    """What the first sectors of a disk say it boots under: a GPT with an EFI system partition is UEFI, and
    BOTH when the MBR also has boot code (a BIOS path); anything else (MBR disks: every disk imgconv made
    before UEFI) is BIOS."""
    if len(head) < 2 * SECTOR or head[SECTOR:SECTOR + 8] != b"EFI PART":
        return Firmware.BIOS
    first_lba, count, size = struct.unpack_from("<QII", head, SECTOR + 72)
    esp = uuid.UUID(ESP_TYPE).bytes_le
    has_esp = False
    if size >= 128 and first_lba < len(head) // SECTOR:
        for i in range(min(count, 128)):
            at = first_lba * SECTOR + i * size
            if head[at:at + 16] == esp:
                has_esp = True
                break
    if not has_esp:
        return Firmware.BIOS
    return Firmware.BOTH if any(head[:MBR_CODE_BYTES]) else Firmware.UEFI


def disk_firmware(disk: SafeDisk, filename: Path, scratch: Path) -> Firmware:
    """The firmware *disk* wants (:func:`firmware_of_head`), read from *filename* (:func:`pinned`'s name for the
    checked file) by ``qemu-img dd`` with the checked format and ``"backing": null``, as qemu will open it."""
    from converter.disk.safety import INFO_TIMEOUT, blockdev_node

    head = scratch / "disk-head.bin"
    node = blockdev_node(disk, filename, "head")
    try:
        run(["qemu-img", "dd", "-f", disk.format, f"if=json:{json.dumps(node)}", f"of={head}", f"bs={SECTOR}",
             f"count={HEAD_SECTORS}"], purpose=f"read the partition table of {disk.path}", timeout=INFO_TIMEOUT)
    except ToolError as exc:
        raise DiskError(f"{disk.path}: its partition table cannot be read: {exc}") from exc
    return firmware_of_head(head.read_bytes())


def firmware_args(firmware: Firmware) -> list[str]:
    """qemu's arguments for *firmware*: OVMF for a UEFI-only disk; SeaBIOS (qemu's default) otherwise, which
    boots faster than OVMF under TCG, so a disk with both paths boots through BIOS."""
    if firmware is not Firmware.UEFI:
        return []
    if not OVMF.is_file():
        raise MissingToolError(f"{OVMF} is required to boot a UEFI disk (Debian package: ovmf)")
    return ["-bios", str(OVMF)]
