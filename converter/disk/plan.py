"""How big a disk, how many inodes, and what the VM runs: decided before the appliance starts.

Pure functions of the image and the options (plus, for sizes, reads of the image's blobs), so that
`make bench` and the tests can ask the same questions the conversion asks.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from converter.boot.initramfs import ImageRun, InitSpec, docker_env
from converter.errors import ImageError, ImgconvError
from converter.oci.image import Image, Layer

MiB = 1 << 20
INODE_SIZE = 256  # mke2fs's default for ext4
BYTES_PER_INODE = 8192
IMGCONV_FILES = 64 * MiB  # init, spec, config, initramfs, bootloader: generous
IMGCONV_ENTRIES = 64


@dataclass(frozen=True)
class DiskPlan:
    size: int  # virtual bytes
    inodes: int  # for mke2fs -N


ESP_MIN = 64 * MiB  # a UKI of a distribution kernel and imgconv's initramfs is ~20 MiB; FAT16 at this size
ESP_FIRST_SECTOR = 2048  # 1 MiB aligned, as parted aligns
GPT_HEAD_SECTORS = 34  # protective MBR, GPT header, 128 entries of 128 bytes (and as many at the end, less one)


@dataclass(frozen=True)
class PartitionLayout:
    """The partition table and where the filesystems go: MBR with the root filesystem alone (BIOS, as every
    earlier disk), or GPT with an EFI system partition first and the root filesystem second (UEFI)."""

    table: str  # "mbr" | "gpt"
    root_device: str
    esp_device: str = ""
    esp_bytes: int = 0

    @property
    def esp_sectors(self) -> tuple[int, int]:
        """First and last sector of the EFI system partition."""
        return ESP_FIRST_SECTOR, ESP_FIRST_SECTOR + self.esp_bytes // 512 - 1

    def root_sectors(self, sectors: int) -> tuple[int, int]:
        """First and last sector of the root partition on a disk of *sectors*: after the ESP up to a 1 MiB
        boundary before the backup GPT (its last 33 sectors), or from 1 MiB to the end of an MBR disk."""
        if self.table == "mbr":
            return ESP_FIRST_SECTOR, sectors - 1
        return self.esp_sectors[1] + 1, (sectors - GPT_HEAD_SECTORS + 1) // ESP_FIRST_SECTOR * ESP_FIRST_SECTOR - 1


def partition_layout(uefi: bool, device: str, boot_files: int = 0) -> PartitionLayout:
    """The layout for a disk at *device*; with *uefi*, an EFI system partition big enough for *boot_files*
    (bytes of a --kernel and --initrd given; 0 when they come later) with room to spare."""
    if not uefi:
        return PartitionLayout("mbr", f"{device}1")
    esp = max(ESP_MIN, -(-(boot_files + boot_files // 4 + 16 * MiB) // MiB) * MiB)
    return PartitionLayout("gpt", f"{device}2", f"{device}1", esp)


class InitMode(StrEnum):
    """``--init``: who is PID 1. ``container``: imgconv's init runs Entrypoint + Cmd as a container's process;
    ``system``: the image's init system boots (the command, if it is not the init, runs as its service);
    ``auto``: ``system`` when Entrypoint + Cmd starts with an init system, else ``container``."""

    AUTO = "auto"
    CONTAINER = "container"
    SYSTEM = "system"


# What names an init system as a command (init/system.h has the same list).
INIT_SYSTEMS = ("/sbin/init", "/usr/sbin/init", "/lib/systemd/systemd", "/usr/lib/systemd/systemd")


def init_mode(requested: InitMode, argv: tuple[str, ...]) -> InitMode:
    if requested is not InitMode.AUTO:
        return requested
    return InitMode.SYSTEM if argv and argv[0] in INIT_SYSTEMS else InitMode.CONTAINER


def run_spec(image: Image, hostname: str, requested: InitMode = InitMode.CONTAINER) -> InitSpec:
    """What `docker run IMAGE` would start: argv = Entrypoint + Cmd, Docker's env, cwd and user; in system mode
    the same, as what the image's init system starts (or the init itself)."""
    config = image.config
    argv = (*(config.entrypoint or ()), *(config.cmd or ()))
    mode = init_mode(requested, argv)
    if not argv and mode is InitMode.CONTAINER:
        raise ImageError(f"{image.source} has neither Entrypoint nor Cmd, so there is nothing for the VM to run "
                         "(--init system boots the image's init system instead)")
    return InitSpec(argv=argv, env=docker_env(config.env, hostname), cwd=config.working_dir or "/",
                    user=config.user, hostname=hostname,
                    image=ImageRun(tuple(config.entrypoint or ()), tuple(config.cmd or ()), tuple(config.env)),
                    mode=str(mode))


def volume_uuid(image: Image) -> str:
    """Derived from the image, so the same image gives the same filesystem UUID."""
    h = image.image_id.removeprefix("sha256:")
    return f"{h[0:8]}-{h[8:12]}-4{h[13:16]}-8{h[17:20]}-{h[20:32]}"


# deflate cannot do better than about 1032:1; a gzip trailer that claims more is a lie (or a multi-member
# file whose last member is not the whole story, such as an empty member appended: valid, Docker reads it).
MAX_DEFLATE_RATIO = 1032


def uncompressed_estimate(image: Image, layer: Layer) -> int:
    """Bytes of tar a layer will inflate to: from the gzip trailer where it is consistent with the compressed
    size, counted by inflating where it is not (and for zstd, whose ratio has no bound)."""
    size = layer.descriptor.size
    if layer.compression == "none":
        return size
    if layer.compression == "gzip":
        claimed = _gzip_isize(image, layer)
        if claimed is not None:
            return claimed
    # Counting costs one more inflate pass of the layer: only for zstd (rare) and for inconsistent trailers.
    try:
        with image.open_layer(layer) as stream:
            total = 0
            while chunk := stream.read(1 << 20):
                total += len(chunk)
        return total
    except ImgconvError:
        return size * 6  # a corrupt layer is left for the real pass to report


def _gzip_isize(image: Image, layer: Layer) -> int | None:
    """The gzip trailer's ISIZE (the size modulo 2^32) made whole, or None when it cannot be the truth."""
    size = layer.descriptor.size
    try:
        with image.store.open_blob(layer.descriptor.digest) as blob:
            blob.seek(-4, os.SEEK_END)
            isize = int.from_bytes(blob.read(4), "little")
    except (OSError, ValueError, io.UnsupportedOperation):
        return None
    # Incompressible data grows by a few bytes per 64 KiB: the content is at least about the compressed size,
    # so add the 2^32 wraps that a layer of this compressed size must have had.
    least = size - size // 1000 - 64
    while isize < least:
        isize += 1 << 32
    return isize if isize <= size * MAX_DEFLATE_RATIO + (1 << 16) else None


def content_bytes(image: Image) -> int:
    return sum(uncompressed_estimate(image, layer) for layer in image.layers)


def plan_disk(content: int, size: int | None, extra_bytes: int, extra_entries: int) -> DiskPlan:
    """How big a disk and how many inodes: room for every byte and every file of the image, plus headroom.

    *content* is the bytes of tar the layers inflate to. Every tar entry takes at least one 512-byte header,
    so that bounds the files the image can hold: sizing inodes by that bound (and the disk by their tables)
    means a tree of many tiny files (node_modules) can never run out of inodes, which sizing by bytes alone
    allowed. Unused inode tables cost nothing in a sparse disk. *size* is the user's --size, if any.
    """
    entries = content // 512 + extra_entries
    wanted_inodes = entries + entries // 10 + 4096
    if size is not None:
        return DiskPlan(size, max(size // BYTES_PER_INODE, min(wanted_inodes, size // (16 * INODE_SIZE))))
    total = content + extra_bytes
    # ext4 spends a block per small file and some metadata per group; headroom lets the VM write.
    headroom = max(256 * MiB, total // 4)
    planned = int(total * 1.15) + headroom + 64 * MiB
    inodes = max(planned // BYTES_PER_INODE, wanted_inodes)
    planned += (inodes - planned // BYTES_PER_INODE) * INODE_SIZE  # room for the extra inode tables
    return DiskPlan(-(-planned // (64 * MiB)) * (64 * MiB), inodes)


def tree_size(path: Path) -> tuple[int, int]:
    """Bytes of file content and number of entries under *path* (a kernel's modules tree)."""
    total, entries = 0, 0
    for root, dirs, files in os.walk(path):
        entries += len(dirs) + len(files)
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total, entries
