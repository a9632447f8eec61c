"""How big a disk, how many inodes, and what the VM runs: decided before the appliance starts.

Pure functions of the image and the options (plus, for sizes, reads of the image's blobs), so that
`make bench` and the tests can ask the same questions the conversion asks.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

from converter.boot.initramfs import InitSpec, docker_env
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


def run_spec(image: Image, hostname: str) -> InitSpec:
    """What `docker run IMAGE` would start: argv = Entrypoint + Cmd, Docker's env, cwd and user."""
    config = image.config
    argv = (*(config.entrypoint or ()), *(config.cmd or ()))
    if not argv:
        raise ImageError(f"{image.source} has neither Entrypoint nor Cmd, so there is nothing for the VM to run")
    return InitSpec(argv=argv, env=docker_env(config.env, hostname), cwd=config.working_dir or "/",
                    user=config.user, hostname=hostname)


def volume_uuid(image: Image) -> str:
    """Derived from the image, so the same image gives the same filesystem UUID."""
    h = image.image_id.removeprefix("sha256:")
    return f"{h[0:8]}-{h[8:12]}-4{h[13:16]}-8{h[17:20]}-{h[20:32]}"


def uncompressed_estimate(image: Image, layer: Layer) -> int:
    """Bytes of tar a layer will inflate to: exact where the format says, counted where it does not."""
    size = layer.descriptor.size
    if layer.compression == "none":
        return size
    if layer.compression == "gzip":
        try:
            with image.store.open_blob(layer.descriptor.digest) as blob:
                blob.seek(-4, os.SEEK_END)
                isize = int.from_bytes(blob.read(4), "little")
        except (OSError, ValueError, io.UnsupportedOperation):
            return size * 6
        # ISIZE is the size modulo 2^32: add the wraps a layer of this compressed size must have had.
        while isize < size:
            isize += 1 << 32
        return max(isize, size * 2)
    # zstd records no total (streamed frames omit even their own), and its ratio has no useful bound (a
    # preallocated file of zeros shrinks 30 000 times): count it. zstd inflates at a GB/s, so this extra
    # pass over the (rare) zstd layers costs little; a corrupt layer is left for the real pass to report.
    try:
        with image.open_layer(layer) as stream:
            total = 0
            while chunk := stream.read(1 << 20):
                total += len(chunk)
        return total
    except ImgconvError:
        return size * 6


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
