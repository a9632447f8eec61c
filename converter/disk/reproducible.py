"""Bit-identical disks: the same image, options and imgconv version give the same bytes, wherever and whenever.

A disk's bytes would otherwise vary with the clock, with random numbers and with timing, in these places (each
found by comparing two conversions of one image); what imgconv does about each:

* partition table ids (MBR disk id, GPT GUIDs): derived from the filesystem UUID, itself derived from the image
  (:func:`~converter.disk.plan.volume_uuid`); the MBR is written here, the GPT by :mod:`converter.disk.uefi`;
* the ext4 filesystem is made here on the host, not in the appliance, because libguestfs's mke2fs cannot be
  given a directory hash seed: fixed UUID and hash seed (so the Orlov allocator, which places top-level
  directories by a hash of their name, and htree directories come out the same), the mkfs time from the
  epoch, every inode table zeroed now (no lazy zeroing at mount, whose progress depends on timing);
* the appliance's kernel mounts it with ``nodelalloc``: blocks are allocated as tar writes, in the stream's
  order, not whenever background writeback happens to run. It keeps the journal while it writes (without one,
  ext4 skips inodes freed in the last seconds, so libguestfs's chown probe file would shift inode numbers by
  timing); the journal is renewed afterwards, since the used one holds commit times and a timing-dependent
  sequence, and its blocks are zeroed first: removing a journal frees its blocks without clearing them, and the
  copies of metadata blocks in them sit where the commits happened to put them (:func:`renew_journal`);
* the image's stream is newest layer first, so GNU tar sets a directory's mtime and then an older layer's files
  land in it (the appliance's clock again): every directory's header is sent once more at the end of imgconv's
  own stream (:func:`converter.disk.rootfs.write_imgconv_files`), so each one's last word is the image's;
* after the appliance is gone, with debugfs: inode times (atime, ctime, crtime) and generations (random in the
  kernel) set, what imgconv adds given the epoch as mtime, inodes of deleted files (that probe) cleared; then
  e2fsck rewrites the directories (the probe's random name stays in the root directory's block) and recomputes
  the checksums the generations seed; the superblock's mount, write, check and creation times and its write
  counter are set last;
* the EFI system partition: made with ``mkfs.vfat --invariant`` and a volume id from the image; the UKI is copied
  in with mtools under ``SOURCE_DATE_EPOCH`` (FAT cannot store times before 1980: those are clamped);
* the qcow2: the appliance writes a sparse raw file, which ``qemu-img convert`` turns into qcow2 in one
  sequential pass (its cluster layout follows from the raw bytes alone).

The epoch is ``SOURCE_DATE_EPOCH`` if set, else the image's ``created``, else 0 (:func:`build_epoch`).
"""

from __future__ import annotations

import bisect
import contextlib
import os
import re
import shutil
import struct
import uuid
from calendar import timegm
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from converter.epoch import source_date_epoch
from converter.errors import ImageError, MissingToolError, ToolError, one_line
from converter.guest import BOOT_DIR, RESERVED, ROOT_LABEL
from converter.run import run

if TYPE_CHECKING:
    from converter.oci.image import Image

SECTOR = 512
BLOCK = 4096
ROOT_FIRST_SECTOR = 2048  # 1 MiB aligned, as the GPT layout's partitions are
FAT_EARLIEST = 315619200  # 1980-01-02: FAT dates start in 1980 (a day later, so no time zone takes it below)
E2FS_TIMEOUT = 600.0
_CREATED = re.compile(r"(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:\.\d+)?(Z|z|[+-]\d\d:\d\d)")


def build_epoch(image: Image) -> int:
    """The time every timestamp imgconv writes into a disk takes: SOURCE_DATE_EPOCH, else the image's
    ``created`` (to the second), else 0. Both are fixed for a given image, so the disk stays the same."""
    given = source_date_epoch()
    if given is not None:
        return given
    created = image.config.doc.get("created")
    match = _CREATED.fullmatch(created.strip()) if isinstance(created, str) else None
    if match is None:
        return 0
    *fields, zone = match.groups()
    seconds = timegm((*(int(f) for f in fields), 0, 0, 0))
    if zone not in ("Z", "z"):
        sign = 1 if zone[0] == "+" else -1
        seconds -= sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    return max(0, seconds)


def derived_id(volume: str, what: str) -> uuid.UUID:
    """An id for *what* (``disk``, ``hash-seed``, ``esp``...) derived from the filesystem UUID."""
    return uuid.uuid5(uuid.UUID(volume), what)


def sbin_tool(name: str, package: str, purpose: str) -> str:
    """A program that lives in /usr/sbin, found also where an unprivileged user's PATH does not look."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        raise MissingToolError(f"{name} is required to {purpose} (Debian package: {package})")
    return found


def e2fs_tool(name: str) -> str:
    return sbin_tool(name, "e2fsprogs", "build the disk's filesystem")


def _chs(lba: int) -> bytes:
    """An MBR entry's cylinder/head/sector address (255 heads, 63 sectors), or the "use LBA" marker past it."""
    if lba >= 1024 * 255 * 63:
        return b"\xfe\xff\xff"
    cylinder, rest = divmod(lba, 255 * 63)
    head, sector = divmod(rest, 63)
    return bytes([head, ((cylinder >> 2) & 0xC0) | (sector + 1), cylinder & 0xFF])


def mbr(sectors: int, disk_id: bytes, first: int = ROOT_FIRST_SECTOR) -> bytes:
    """The first sector of a BIOS disk: no boot code yet (extlinux adds it), the disk id, and one bootable
    Linux partition from *first* to the end of the disk."""
    last = sectors - 1
    entry = (b"\x80" + _chs(first) + b"\x83" + _chs(last)
             + struct.pack("<II", first, min(last - first + 1, 0xFFFFFFFF)))
    return bytes(440) + disk_id[:4] + b"\0\0" + entry + bytes(48) + b"\x55\xaa"


def write_at(disk: Path, data: bytes, offset: int) -> None:
    with disk.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def make_ext4(disk: Path, offset: int, size: int, volume: str, inodes: int, epoch: int) -> None:
    """The root filesystem at byte *offset* of *disk* (*size* bytes), made by the host's mke2fs: the same one
    the appliance carries (libguestfs builds it from the host's packages), given what the appliance's cannot."""
    seed = derived_id(volume, "hash-seed")
    run([e2fs_tool("mke2fs"), "-q", "-F", "-t", "ext4", "-b", str(BLOCK), "-L", ROOT_LABEL, "-U", volume, "-m", "1",
         "-N", str(inodes), "-E", f"hash_seed={seed},offset={offset},lazy_itable_init=0,nodiscard,root_owner=0:0",
         str(disk), str(size // BLOCK)], purpose="create the ext4 filesystem", env=_e2fs_env(epoch),
        timeout=E2FS_TIMEOUT)


def _e2fs_env(epoch: int) -> dict[str, str]:
    """e2fsprogs' clock for the superblock and inode times it writes (mke2fs, tune2fs, debugfs; e2fsck's own)."""
    return {**os.environ, "E2FSPROGS_FAKE_TIME": str(epoch), "E2FSCK_TIME": str(epoch)}


class Ranges:
    """Integers given as inclusive (low, high) ranges, with membership in O(log n) and memory per range."""

    def __init__(self, ranges: Iterable[tuple[int, int]]) -> None:
        self._ranges = sorted(ranges)
        self._lows = [low for low, _ in self._ranges]

    def __contains__(self, n: object) -> bool:
        if not isinstance(n, int):
            return False
        i = bisect.bisect_right(self._lows, n) - 1
        return i >= 0 and self._ranges[i][0] <= n <= self._ranges[i][1]

    def __bool__(self) -> bool:
        return bool(self._ranges)


@dataclass(frozen=True)
class InodeGroup:
    """What dumpe2fs says of one block group's inodes."""

    first: int  # inode number of its first inode
    table: int  # block of its inode table
    touched: int  # inodes ever used (the rest were never written: "unused inodes")
    free: Ranges  # free inode numbers, as dumpe2fs lists them (a set of numbers cost ~140 MiB on a 1 GB image)


def inode_groups(dumpe2fs: str) -> tuple[int, list[InodeGroup]]:
    """The inode size and the block groups' inodes, from dumpe2fs's full output."""
    def header(name: str) -> int:
        found = re.search(rf"^{name}:\s+(\d+)", dumpe2fs, re.M)
        if found is None:
            raise ToolError(f"dumpe2fs did not say the filesystem's {name.lower()}")
        return int(found.group(1))

    per_group, groups = header("Inodes per group"), []
    for block in re.split(r"^(?=Group \d+:)", dumpe2fs, flags=re.M)[1:]:
        number = int(block.split(":", 1)[0].split()[1])
        table = re.search(r"Inode table at (\d+)", block)
        unused = re.search(r"(\d+) unused inodes", block)
        free_line = re.search(r"^\s*Free inodes: ?(.*)$", block, re.M)
        free: list[tuple[int, int]] = []
        for part in filter(None, (p.strip() for p in (free_line.group(1) if free_line else "").split(","))):
            low, _, high = part.partition("-")
            free.append((int(low), int(high or low)))
        groups.append(InodeGroup(number * per_group + 1, int(table.group(1)) if table else 0,
                                 per_group - int(unused.group(1)) if unused else per_group, Ranges(free)))
    return header("Inode size"), groups


def stale_inodes(disk: Path, offset: int, inode_size: int, groups: list[InodeGroup]) -> list[int]:
    """Free inodes that are not zero: files created and deleted during the build (libguestfs's tar_in makes and
    removes a randomly named file to test chown), whose leftover times and owner would differ between runs."""
    stale = []
    with disk.open("rb") as f:
        for group in groups:
            if not group.touched or not group.free:
                continue
            f.seek(offset + group.table * BLOCK)
            table = f.read(group.touched * inode_size)
            stale += [group.first + i for i in range(group.touched)
                      if group.first + i in group.free and any(table[i * inode_size:(i + 1) * inode_size])]
    return stale


def _time_commands(target: str, fields: Iterable[str], epoch: int) -> list[str]:
    """debugfs commands setting *fields* of *target* to *epoch* with no nanoseconds (the extra field first:
    setting the time then fills in its epoch bits past 2038)."""
    return [line for f in fields for line in (f"sif {target} {f}_extra 0", f"sif {target} {f} @{epoch}")]


def debugfs_script(device: str, commands: Iterable[str], scratch: Path, epoch: int, purpose: str,
                   output: bool = True) -> str:
    """Run *commands* in one debugfs; its output ("" unless *output*: it echoes every command)."""
    script = scratch / "debugfs.cmd"
    with script.open("w") as out:  # line by line: a full build's script is never held whole in memory
        for command in commands:
            out.write(command + "\n")
    ran = run([e2fs_tool("debugfs"), "-w", "-f", str(script), device], purpose=purpose, env=_e2fs_env(epoch),
              timeout=E2FS_TIMEOUT, keep_stdout=output)
    errors = [line for line in ran.stderr.decode(errors="replace").splitlines()
              if line.strip() and not line.startswith("debugfs ")]
    if errors:
        raise ToolError(f"debugfs failed to {purpose}: {errors[0]}")
    return ran.stdout.decode(errors="replace") if output else ""


def write_guest_files(disk: Path, offset: int, files: Iterable[tuple[str, Path]], scratch: Path, epoch: int) -> None:
    """Host files into the filesystem at *offset* of *disk* (guest path, host file), root's and 0644, written by
    debugfs once the appliance is gone: a kernel and an initramfs cost a round trip each through the appliance,
    and no time here (settle_ext4 gives them the build's times with the rest of /.imgconv)."""
    commands = []
    for guest, host in files:
        if '"' in guest or '"' in str(host):
            raise ImageError(f"cannot write /{guest} into the disk: its name has a double quote")
        target = f'"/{guest}"'
        commands += [f'write "{host}" {target}', f"sif {target} mode 0100644", f"sif {target} uid 0",
                     f"sif {target} gid 0"]
    if commands:
        debugfs_script(f"{disk}?offset={offset}", commands, scratch, epoch, "write the boot files")


def _entries(device: str, directories: tuple[str, ...], scratch: Path, epoch: int) -> list[str]:
    """The inodes of *directories* and what they hold (imgconv's own files: written by tar, uploads and extlinux
    at the appliance's time), as debugfs targets (by number: names are never parsed back)."""
    listed = debugfs_script(device, [f"ls -p {d}" for d in directories], scratch, epoch, "list imgconv's files")
    inodes = {int(ino) for ino, name in re.findall(r"^/(\d+)/\d+/\d+/\d+/([^/]*)/", listed, re.M) if name != ".."}
    return [f"<{ino}>" for ino in sorted(inodes)]


def journal_blocks(listing: str) -> list[tuple[int, int]]:
    """debugfs ``blocks``'s list of block numbers as (first, count) runs (the echoed command line skipped)."""
    runs: list[tuple[int, int]] = []
    numbers = (line.split() for line in listing.splitlines() if re.fullmatch(r"[\d ]+", line.strip()))
    for block in (int(word) for words in numbers for word in words):
        if runs and runs[-1][0] + runs[-1][1] == block:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((block, 1))
    return runs


def renew_journal(disk: Path, offset: int, device: str, scratch: Path, epoch: int) -> None:
    """A new, empty journal. The used one holds commit times, a timing-dependent sequence and copies of metadata
    blocks placed by when commits happened; removing it frees its blocks but leaves those bytes in them, so they
    are zeroed before the new journal is made (which may take some of them back)."""
    runs = journal_blocks(debugfs_script(device, ["blocks <8>"], scratch, epoch, "find the journal"))
    env = _e2fs_env(epoch)
    run([e2fs_tool("tune2fs"), "-O^has_journal", device], purpose="remove the used ext4 journal", env=env,
        timeout=E2FS_TIMEOUT)
    zeros = bytes(BLOCK * 256)
    with disk.open("r+b") as f:
        for first, count in runs:
            f.seek(offset + first * BLOCK)
            for done in range(0, count, 256):
                f.write(zeros[:BLOCK * min(256, count - done)])
    run([e2fs_tool("tune2fs"), "-j", device], purpose="make a new ext4 journal", env=env, timeout=E2FS_TIMEOUT)


def settle_ext4(disk: Path, offset: int, epoch: int, root_mtime: int, scratch: Path) -> None:
    """After the appliance: a new journal, every time and generation the build's own, leftovers of deleted files
    cleared, directories rewritten (the deleted file's name stays in the root's), checksums recomputed (the
    generation seeds them), the superblock's times set. *root_mtime* is the image's own for /."""
    device, env = f"{disk}?offset={offset}", _e2fs_env(epoch)
    renew_journal(disk, offset, device, scratch, epoch)
    dump = run([e2fs_tool("dumpe2fs"), device], purpose="list the filesystem's inodes", env=env,
               timeout=E2FS_TIMEOUT).stdout.decode(errors="replace")
    inode_size, groups = inode_groups(dump)
    commands = [f"clri <{ino}>" for ino in stale_inodes(disk, offset, inode_size, groups)]
    for group in groups:
        for ino in range(group.first, group.first + group.touched):
            if ino not in group.free and (ino == 2 or ino >= 7):  # not the unused reserved inodes
                commands += [f"sif <{ino}> generation 0", *_time_commands(f"<{ino}>", ("atime", "ctime", "crtime"),
                                                                            epoch)]
    for target in _entries(device, (f"/{RESERVED}", f"/{BOOT_DIR}"), scratch, epoch):
        commands += _time_commands(target, ("mtime",), epoch)
    commands += _time_commands("<2>", ("mtime",), root_mtime)
    debugfs_script(device, commands + _superblock_commands(epoch), scratch, epoch, "set the filesystem's times")
    with _image_lost_found(device, scratch, epoch):
        checked = run([e2fs_tool("e2fsck"), "-f", "-y", "-D", device],
                      purpose="recompute the filesystem's checksums", env=env, timeout=E2FS_TIMEOUT, check=False)
    if checked.returncode not in (0, 1):
        found = one_line(checked.stdout.decode(errors="replace"), 300)
        raise ToolError(f"e2fsck found errors in the new filesystem: {found}")
    debugfs_script(device, [*_superblock_commands(epoch), "close_filesys -a"], scratch, epoch,
             "set the superblock's times")


LOST_FOUND_ASIDE = "/.imgconv-lost+found"


@contextlib.contextmanager
def _image_lost_found(device: str, scratch: Path, epoch: int) -> Iterator[None]:
    """An image whose /lost+found is not a directory keeps it: e2fsck would unlink it and make its own directory.
    The image's entry is moved aside (a second name, then the first unlinked: link counts unchanged) while
    e2fsck runs, and put back after, in place of the empty directory e2fsck made."""
    try:
        listing = debugfs_script(device, ["stat /lost+found"], scratch, epoch, "look at /lost+found")
    except ToolError:  # none at all: e2fsck makes one, as mke2fs did
        listing = ""
    if "Type: directory" in listing or "Type:" not in listing:
        yield
        return
    debugfs_script(device, [f"ln /lost+found {LOST_FOUND_ASIDE}", "unlink /lost+found"], scratch, epoch,
             "set the image's /lost+found aside")
    yield
    debugfs_script(device, ["rmdir /lost+found", f"ln {LOST_FOUND_ASIDE} /lost+found", f"unlink {LOST_FOUND_ASIDE}"],
             scratch, epoch, "put the image's /lost+found back")


def _superblock_commands(epoch: int) -> list[str]:
    """The superblock's times and write counter: set before e2fsck, and after it into the backup superblocks too
    (``close_filesys -a``), which would otherwise keep the appliance's mount time."""
    return [f"ssv {field} @{epoch}" for field in ("mtime", "wtime", "lastcheck", "mkfs_time")] + [
        "ssv kbytes_written 0"]


def fat_time(epoch: int) -> int:
    """A time FAT can store: the epoch, or the start of 1980 for an earlier one."""
    return max(epoch, FAT_EARLIEST)
