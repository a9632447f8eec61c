"""extlinux installed into an ext4 filesystem image on the host, without mounting it.

``extlinux --install DIR`` needs DIR mounted: it writes ``ldlinux.sys`` through the filesystem, asks the kernel
where its sectors landed (FIBMAP), patches that sector list, a checksum and the directory into the file, and
writes its boot sector, which points at the file's first sector, to the start of the partition. Mounting needs
root or the libguestfs appliance, whose start under TCG costs more than the rest of a small image's conversion.

Here the real extlinux runs once per machine (and extlinux version) in the appliance, on a small empty
filesystem: its boot sector, ``ldlinux.sys`` and ``ldlinux.c32`` are kept as a template in imgconv's cache. A
disk then gets the template's files written by debugfs, debugfs says which blocks they got, and the template is
patched for those sectors exactly as extlinux's own ``syslinux_patch`` (libinstaller/syslxmod.c) patches it:
the sector extents, the two ADV sector pointers, the checksum, and in the boot sector the first sector's pointer,
the partition's start (hidden sectors) and its size. Re-patching a patched ``ldlinux.sys`` overwrites every field
extlinux sets (the directory is always imgconv's, the same as the template's), so the result is byte for byte
what extlinux would have written for those sectors (tests/integration/test_host_boot.py compares them).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from converter.artifact import atomic_write
from converter.boot.cachedir import cache_dir
from converter.disk.appliance import Drive, launch
from converter.disk.reproducible import debugfs_script, journal_blocks, make_ext4
from converter.errors import ToolError
from converter.guest import BOOT_DIR

EXTLINUX = Path("/usr/bin/extlinux")
LDLINUX_MAGIC = 0x3EB202FE
SECTOR = 512
BLOCK = 4096
TEMPLATE_FS_BYTES = 16 << 20
# struct patch_area and struct ext_patch_area (libinstaller/syslxint.h), little-endian
PATCH_AREA = struct.Struct("<IIHHIIHH")  # magic instance data_sectors adv_sectors dwords checksum maxtransfer epa
EXT_PATCH_AREA = struct.Struct("<10H")  # advptr dir dirlen subvol subvollen secptr secptrcnt sect1ptr0/1 raidpatch
EXTENT = struct.Struct("<QH")  # struct syslinux_extent: lba, len
# The fake FAT BPB of the boot sector (struct fat_boot_sector): total sectors (16 and 32 bit), hidden sectors.
BS_SECTORS, BS_HIDDEN, BS_HUGE = 0x13, 0x1C, 0x20


@dataclass(frozen=True)
class Template:
    """What the real extlinux wrote on a small filesystem: its boot sector and its two files."""

    bootsect: bytes
    ldlinux_sys: bytes
    ldlinux_c32: bytes


def _key() -> str:
    """The template belongs to this extlinux (the appliance runs the host's binaries)."""
    return hashlib.sha256(EXTLINUX.read_bytes()).hexdigest()[:16] if EXTLINUX.exists() else "none"


def template(scratch: Path) -> Template:
    """The cached template, made with the appliance the first time."""
    where = cache_dir() / f"extlinux-template-{_key()}.json"
    try:
        held = json.loads(where.read_text())
        found = Template(*(bytes.fromhex(held[name]) for name in ("bootsect", "ldlinux_sys", "ldlinux_c32")))
        if len(found.bootsect) == SECTOR and found.ldlinux_sys and found.ldlinux_c32:
            return found
    except (OSError, ValueError, KeyError, TypeError):
        pass
    made = _make_template(scratch / "extlinux-template")
    atomic_write(where, json.dumps({"bootsect": made.bootsect.hex(), "ldlinux_sys": made.ldlinux_sys.hex(),
                                    "ldlinux_c32": made.ldlinux_c32.hex()}).encode())
    return made


def _make_template(work: Path) -> Template:
    work.mkdir(parents=True, exist_ok=True)
    disk = work / "template.raw"
    disk.write_bytes(b"")
    os.truncate(disk, TEMPLATE_FS_BYTES)
    make_ext4(disk, 0, TEMPLATE_FS_BYTES, "00000000-0000-4000-8000-000000000000", 64, 0)
    with launch([Drive(disk, "raw", False)], memory_mib=256) as app:
        app.call("mount the template filesystem", app.g.mount, "/dev/sda", "/")
        app.call("make the boot directory", app.g.mkdir_p, f"/{BOOT_DIR}")
        app.call("install extlinux (once, as a template)", app.g.extlinux, f"/{BOOT_DIR}")
        app.call("unmount the template filesystem", app.g.umount, "/")
    files = {}
    for name in ("ldlinux.sys", "ldlinux.c32"):
        debugfs_script(str(disk), [f'dump "/{BOOT_DIR}/{name}" "{work / name}"'], work, 0, f"read extlinux's {name}")
        files[name] = (work / name).read_bytes()
    with disk.open("rb") as raw:
        bootsect = raw.read(SECTOR)
    shutil.rmtree(work, ignore_errors=True)
    return Template(bootsect, files["ldlinux.sys"], files["ldlinux.c32"])


def _extents(sectors: list[int], slots: int) -> bytes:
    """generate_extents(): runs of consecutive sectors, each under 64 KiB, as (lba, count) records in *slots*
    slots (its check that no sector straddles a 64 KiB boundary of the load address, from 0x8000 on, is kept:
    512-byte sectors from there never do)."""
    records: list[tuple[int, int]] = []
    addr = base = 0x8000
    for sect in sectors:
        if records:
            lba, count = records[-1]
            xbytes = (count + 1) * SECTOR
            if sect == lba + count and xbytes < 65536 and ((addr ^ (base + xbytes - 1)) & 0xFFFF0000) == 0:
                records[-1] = (lba, count + 1)
                addr += SECTOR
                continue
        base = addr
        records.append((sect, 1))
        addr += SECTOR
    if len(records) > slots:
        raise ToolError(f"ldlinux.sys landed in {len(records)} pieces; extlinux has room for {slots}")
    return b"".join(EXTENT.pack(lba, count) for lba, count in records).ljust(slots * EXTENT.size, b"\0")


def patch(tpl: Template, sectors: list[int], hidden: int, total: int) -> tuple[bytes, bytes]:
    """The boot sector and ldlinux.sys for a copy of the template's ldlinux.sys whose 512-byte sectors are
    *sectors* (filesystem-relative), in a partition starting at sector *hidden* of *total* sectors."""
    image = bytearray(tpl.ldlinux_sys)
    wanted = struct.pack("<I", LDLINUX_MAGIC)
    at = next((i for i in range(0, len(image) - 3, 4) if image[i:i + 4] == wanted), -1)  # as syslinux_patch looks
    if at < 0 or len(sectors) * SECTOR < len(image):
        raise ToolError("extlinux's template has no patch area, or ldlinux.sys's sector list is short")
    magic, instance, data_sectors, adv_sectors, dwords, _, maxtransfer, epa = PATCH_AREA.unpack_from(image, at)
    advptr, _, _, _, _, secptr, secptrcnt, sect1ptr0, sect1ptr1, _ = EXT_PATCH_AREA.unpack_from(image, epa)
    boot = bytearray(tpl.bootsect)
    struct.pack_into("<I", boot, sect1ptr0, sectors[0] & 0xFFFFFFFF)
    struct.pack_into("<I", boot, sect1ptr1, sectors[0] >> 32)
    struct.pack_into("<H", boot, BS_SECTORS, total if total < 65536 else 0)
    struct.pack_into("<I", boot, BS_HIDDEN, hidden)
    struct.pack_into("<I", boot, BS_HUGE, total)
    nsect = data_sectors + adv_sectors  # the first sector (the boot sector loads it) is one of the data sectors
    rest = sectors[1:nsect]
    image[secptr:secptr + secptrcnt * EXTENT.size] = _extents(rest[:nsect - 1 - adv_sectors], secptrcnt)
    struct.pack_into("<QQ", image, advptr, rest[-2], rest[-1])
    struct.pack_into("<I", image, at + 16, 0)
    csum = LDLINUX_MAGIC
    for (word,) in struct.iter_unpack("<I", bytes(image[:dwords * 4])):
        csum = (csum - word) & 0xFFFFFFFF
    PATCH_AREA.pack_into(image, at, magic, instance, data_sectors, adv_sectors, dwords, csum, maxtransfer, epa)
    return bytes(boot), bytes(image)


def install(disk: Path, offset: int, sectors: int, scratch: Path, epoch: int) -> None:
    """extlinux into the filesystem at byte *offset* of *disk* (a partition of *sectors* sectors): the template's
    files written by debugfs (ldlinux.sys immutable and read-only, as extlinux leaves it), then patched in place
    for where they landed, and the boot sector written to the partition's start."""
    tpl = template(scratch)
    held = scratch / "extlinux"
    held.mkdir(exist_ok=True)
    (held / "ldlinux.sys").write_bytes(tpl.ldlinux_sys)
    (held / "ldlinux.c32").write_bytes(tpl.ldlinux_c32)
    sys_path, c32_path = f'"/{BOOT_DIR}/ldlinux.sys"', f'"/{BOOT_DIR}/ldlinux.c32"'
    device = f"{disk}?offset={offset}"
    listed = debugfs_script(device, [
        f'write "{held / "ldlinux.sys"}" {sys_path}', f"sif {sys_path} mode 0100444", f"sif {sys_path} flags 0x80010",
        f'write "{held / "ldlinux.c32"}" {c32_path}', f"sif {c32_path} mode 0100444", f"blocks {sys_path}"],
        scratch, epoch, "install extlinux")
    blocks = [block for first, count in journal_blocks(listed) for block in range(first, first + count)]
    per_block = BLOCK // SECTOR
    file_sectors = [block * per_block + i for block in blocks for i in range(per_block)]
    bootsect, image = patch(tpl, file_sectors, offset // SECTOR, sectors)
    with disk.open("r+b") as out:
        for n, block in enumerate(blocks):
            out.seek(offset + block * BLOCK)
            out.write(image[n * BLOCK:(n + 1) * BLOCK])
        out.seek(offset)
        out.write(bootsect)
