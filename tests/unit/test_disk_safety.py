"""converter/disk/safety.py's readers of what a disk names: the qcow2 header and the vmdk descriptor, as qemu reads
them, and what to refuse before any tool opens the disk. (The integration tests run the whole check on real files:
tests/integration/test_hostile_disks.py.)"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from converter.disk.safety import (
    SafeDisk,
    blockdev_node,
    format_of,
    opened,
    probe_format,
    qcow2_names,
    vmdk_extents,
    vmdk_parent,
)
from converter.errors import DiskError


def qcow2_header(version: int = 3, backing: bytes = b"", data_file: bytes | None = None,
                 incompatible: int = 0) -> bytes:
    """A qcow2 header as qemu-img writes it: 104 bytes (v3) or 72 (v2), then extensions, then the backing name."""
    length = 104 if version >= 3 else 72
    ext = b""
    if data_file is not None:
        ext += struct.pack(">II", 0x44415441, len(data_file)) + data_file.ljust((len(data_file) + 7) // 8 * 8, b"\0")
    ext += struct.pack(">II", 0, 0)
    backing_offset = length + len(ext) if backing else 0
    head = struct.pack(">4sIQIIQ", b"QFI\xfb", version, backing_offset, len(backing), 16, 1 << 30)
    head = head.ljust(72, b"\0")
    if version >= 3:
        head += struct.pack(">QQQII", incompatible, 0, 0, 4, length)
    return (head + ext + backing).ljust(65536, b"\0")


def test_qcow2_plain_names_nothing() -> None:
    named = qcow2_names(qcow2_header())
    assert (named.backing, named.data_file, named.extents) == (None, None, ())
    assert qcow2_names(qcow2_header(version=2)).backing is None


@pytest.mark.parametrize("version", [2, 3])
def test_qcow2_backing_names(version: int) -> None:
    for name in (b"base.qcow2", b"/etc/shadow", b'json:{"file": {"driver": "nbd", "path": "/run/x"}}'):
        assert qcow2_names(qcow2_header(version, backing=name)).backing == name.decode()


def test_qcow2_external_data_file() -> None:
    named = qcow2_names(qcow2_header(data_file=b"/dev/sda", incompatible=1 << 2))
    assert named.data_file == "/dev/sda"
    # the feature bit without the name is still an external data file (qemu then needs one given)
    assert qcow2_names(qcow2_header(incompatible=1 << 2)).data_file is not None


def test_qcow2_backing_name_out_of_bounds_is_still_a_backing_file() -> None:
    header = bytearray(qcow2_header())
    struct.pack_into(">QI", header, 8, 1 << 40, 10)
    assert qcow2_names(bytes(header)).backing


def test_qcow2_truncated_header_is_left_to_qemu_img() -> None:
    assert qcow2_names(b"QFI\xfb\0\0\0\3").backing is None


DESCRIPTOR = b"""# Disk DescriptorFile
version=1
CID=fffffffe
parentCID=ffffffff
createType="monolithicFlat"

# Extent description
RW 2048 FLAT "disk-flat.vmdk" 0
RDONLY 2048 SPARSE "/etc/shadow"
  rw 10 vmfs "lower case.vmdk"
RW 100 ZERO
NOACCESS 1 FLAT "/dev/sda" 0
"""


def test_vmdk_extents_are_every_named_file() -> None:
    assert vmdk_extents(DESCRIPTOR) == ("disk-flat.vmdk", "/etc/shadow", "lower case.vmdk", "/dev/sda")


def test_vmdk_extent_split_over_lines_counts() -> None:
    """qemu's sscanf lets blanks match newlines: such an extent is one to qemu, so it is one here."""
    assert vmdk_extents(b'RW\n2048\nFLAT\n"/tmp/fifo" 0\n') == ("/tmp/fifo",)


def test_vmdk_descriptor_ends_at_a_nul() -> None:
    assert vmdk_extents(b'# Disk DescriptorFile\n\0RW 1 FLAT "/etc/shadow" 0\n') == ()


@pytest.mark.parametrize(("text", "parent"), [
    (b'parentFileNameHint="base.vmdk"\n', "base.vmdk"),
    (b'# a comment: parentFileNameHint="/etc/shadow"\n', "/etc/shadow"),  # qemu's strstr finds it anywhere
    (b'parentFileNameHint=""\n', None),
    (b"createType=\"monolithicSparse\"\n", None),
])
def test_vmdk_parent_is_found_as_qemu_finds_it(text: bytes, parent: str | None) -> None:
    assert vmdk_parent(text) == parent


@pytest.mark.parametrize(("head", "tail", "fmt"), [
    (b"QFI\xfb" + bytes(1020), b"", "qcow2"),
    (b"KDMV" + bytes(1020), b"", "vmdk"),
    (b"# Disk DescriptorFile\n" + bytes(1000), b"", "vmdk"),
    (b"vhdxfile" + bytes(1016), b"", "vhdx"),
    (bytes(0x40) + b"\x7f\x10\xda\xbe" + bytes(956), b"", "vdi"),
    (bytes(1024), b"conectix" + bytes(504), "vpc"),
    (b"\xebc\x90" + bytes(1021), b"", "raw"),
])
def test_format_from_magic(head: bytes, tail: bytes, fmt: str) -> None:
    assert format_of(head, tail) == fmt


def test_a_fifo_is_refused_without_opening_it(tmp_path: Path) -> None:
    fifo = tmp_path / "disk.fifo"
    os.mkfifo(fifo)
    with pytest.raises(DiskError, match="not a disk image file or a block device"):
        probe_format(fifo)  # an open of a FIFO with no writer would block forever


def test_files_that_are_not_disks(tmp_path: Path) -> None:
    with pytest.raises(DiskError, match="does not exist"):
        probe_format(tmp_path / "missing")
    with pytest.raises(DiskError, match="is a directory"):
        probe_format(tmp_path)
    (tmp_path / "empty").touch()
    with pytest.raises(DiskError, match="is empty"):
        probe_format(tmp_path / "empty")
    with opened(tmp_path / "empty") as (_fd, st):
        assert st.st_size == 0


def test_blockdev_node_follows_nothing_the_disk_names() -> None:
    disk = SafeDisk(Path("/d/x.qcow2"), "qcow2", 1 << 20, block_device=False, identity=(1, 2))
    node = blockdev_node(disk, Path("/proc/1/fd/3"), "disk")
    assert node == {"driver": "qcow2", "backing": None, "node-name": "disk", "read-only": True,
                    "file": {"driver": "file", "filename": "/proc/1/fd/3"}}
    device = SafeDisk(Path("/dev/sdb"), "raw", 1 << 20, block_device=True, identity=(1, 2))
    assert blockdev_node(device, device.path, "disk")["file"]["driver"] == "host_device"
    raw = SafeDisk(Path("/d/x.img"), "raw", 1 << 20, block_device=False, identity=(1, 2))
    assert "backing" not in blockdev_node(raw, raw.path, "disk")  # qemu's schema has none for raw (nor vpc, ...)
