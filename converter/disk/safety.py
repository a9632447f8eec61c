"""The one way imgconv opens a disk it did not make: ``vm-to-oci`` and ``boot`` both go through :func:`open_disk`.

A disk file is untrusted input, and qemu will follow whatever it names: a qcow2's backing file or external
data file, a vmdk's extents (``FLAT "/etc/shadow"``, a FIFO, ``nbd://host/x``), another format if it is left
to probe. So, before any tool opens it:

* only a regular file or a block device is opened, and that open cannot block (a FIFO is refused from its
  ``stat``, and the open itself is non-blocking in case the name changed in between);
* the format comes from the file's own magic and is always passed explicitly afterwards (a raw disk could
  pretend to be a qcow2 with a backing file);
* the qcow2 header and the vmdk descriptor are read here: a backing file, an external data file or an extent
  in another file is refused before ``qemu-img`` could open (and hang on, or connect to) what they name;
* ``qemu-img info`` then confirms it (the other formats' backing files too), and ``qemu-img check`` must find
  no corruption; both run with a timeout.

Checking is not enough on its own: the file can change between the check and the attach. So what attaches the
disk opens nothing it names either: ``boot`` gives qemu :func:`blockdev_node` (explicit driver,
``"backing": null``, the very file that was checked), and the libguestfs appliance attaches the
:func:`backing_free_overlay` of a read-only disk instead of the disk.
"""

from __future__ import annotations

import json
import os
import re
import stat
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converter.errors import DiskError, ToolError
from converter.run import run

FORMATS = ("qcow2", "raw", "vmdk", "vhdx", "vpc", "vdi")
CHECKABLE = frozenset({"qcow2", "vmdk", "vhdx", "vdi"})
WITH_BACKING = frozenset({"qcow2", "vmdk"})  # of FORMATS, those qemu can give a backing file

INFO_TIMEOUT = 120.0  # qemu-img info reads headers only
CHECK_TIMEOUT = 900.0  # qemu-img check reads every table of a disk that may be hundreds of GiB
CREATE_TIMEOUT = 60.0

_MAX_CLUSTER = 2 << 20  # qcow2's largest cluster: its header, extensions and backing name fit in the first one
_MAX_DESCRIPTOR = (1 << 20) - 1  # what qemu's vmdk driver reads of a descriptor
_QCOW2_INCOMPAT_DATA_FILE = 1 << 2
_QCOW2_EXT_DATA_FILE = 0x44415441


@dataclass(frozen=True)
class SafeDisk:
    """A disk that passed every check: what its users may rely on."""

    path: Path  # absolute, so that no tool reads the name as a protocol (vm-1:2.qcow2), a file: URL or an option
    format: str  # from the magic; one of FORMATS
    virtual_size: int
    block_device: bool
    identity: tuple[int, int]  # (st_dev, st_ino) of the file that was checked


def shown(text: str) -> str:
    """A name read from a disk, quoted and with its control characters escaped."""
    return json.dumps(text, ensure_ascii=False)


# -- opening without blocking -----------------------------------------------------------------------------------


def _os_error(path: Path, exc: OSError) -> DiskError:
    if isinstance(exc, FileNotFoundError):
        return DiskError(f"{path} does not exist")
    if isinstance(exc, IsADirectoryError):
        return DiskError(f"{path} is a directory, not a disk image")
    return DiskError(f"{path} cannot be read: {exc.strerror}")


def _kind(path: Path, mode: int) -> bool:
    """True for a block device, False for a regular file; anything else is refused."""
    if stat.S_ISDIR(mode):
        raise DiskError(f"{path} is a directory, not a disk image")
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):  # a FIFO would block any open of it forever
        raise DiskError(f"{path} is not a disk image file or a block device")
    return stat.S_ISBLK(mode)


@contextmanager
def opened(path: Path) -> Iterator[tuple[int, os.stat_result]]:
    """A read-only descriptor of *path* and its ``fstat``, refused unless a regular file or a block device.

    The name is checked before the open (so a FIFO is never opened), and the descriptor after it, since the
    name may have changed in between; the open does not block, so a FIFO swapped in cannot hang it.
    """
    try:
        _kind(path, os.stat(path).st_mode)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise _os_error(path, exc) from exc
    try:
        st = os.fstat(fd)
        _kind(path, st.st_mode)
        os.set_blocking(fd, True)
        yield fd, st
    finally:
        os.close(fd)


def _pread(path: Path, fd: int, size: int, offset: int) -> bytes:
    try:
        return os.pread(fd, size, offset)
    except OSError as exc:
        raise _os_error(path, exc) from exc


def _size(path: Path, fd: int) -> int:
    try:
        return os.lseek(fd, 0, os.SEEK_END)  # st_size is 0 for a block device
    except OSError as exc:
        raise _os_error(path, exc) from exc


# -- the format, from the magic -----------------------------------------------------------------------------------


def format_of(head: bytes, tail: bytes) -> str:
    """The disk format from its first KiB and last 512 bytes: qcow2, vmdk, vhdx, vpc, vdi, or raw."""
    if head.startswith(b"QFI\xfb"):
        return "qcow2"
    if head.startswith(b"KDMV") or b"# Disk DescriptorFile" in head[:512]:
        return "vmdk"
    if head.startswith(b"vhdxfile"):
        return "vhdx"
    if head[0x40:0x44] == b"\x7f\x10\xda\xbe":
        return "vdi"
    if head.startswith(b"conectix") or tail.startswith(b"conectix"):
        return "vpc"
    return "raw"


def probe_format(path: Path) -> str:
    """The format of the disk at *path* from its magic (refusing what is not a regular file or block device)."""
    with opened(path) as (fd, _st):
        return _probe(path, fd)


def _probe(path: Path, fd: int) -> str:
    size = _size(path, fd)
    if size == 0:
        raise DiskError(f"{path} is empty")
    head = _pread(path, fd, 1024, 0)
    tail = _pread(path, fd, 512, size - 512) if size >= 512 else b""
    return format_of(head, tail)


# -- what the headers name ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Named:
    """Files a disk's own metadata names besides itself."""

    backing: str | None = None
    data_file: str | None = None
    extents: tuple[str, ...] = ()


def qcow2_names(header: bytes) -> Named:
    """The backing file and external data file a qcow2 header names (*header*: at least its first cluster, where
    qemu requires the backing name, the header extensions and the header itself to be)."""
    if len(header) < 72:
        return Named()
    version, backing_offset, backing_size = struct.unpack_from(">IQI", header, 4)
    backing = None
    if backing_offset and backing_size:  # qemu opens it, or refuses the image if the name lies out of bounds
        raw = header[backing_offset:backing_offset + min(backing_size, 1023)]
        backing = raw.decode("utf-8", "replace") or "(a name beyond the first cluster)"
    incompatible, ext_start = 0, 72
    if version >= 3 and len(header) >= 104:
        incompatible = struct.unpack_from(">Q", header, 72)[0]
        ext_start = struct.unpack_from(">I", header, 100)[0]
    ext_end = min(len(header), backing_offset or len(header))
    data_file = _qcow2_extension(header, ext_start, ext_end, _QCOW2_EXT_DATA_FILE)
    if data_file is None and incompatible & _QCOW2_INCOMPAT_DATA_FILE:
        data_file = "(an external data file, name not stored)"
    return Named(backing=backing, data_file=data_file)


def _qcow2_extension(header: bytes, start: int, end: int, wanted: int) -> str | None:
    offset = start
    while offset + 8 <= end:
        kind, length = struct.unpack_from(">II", header, offset)
        if kind == 0:
            return None
        if kind == wanted:
            return header[offset + 8:offset + 8 + length].decode("utf-8", "replace")
        offset += 8 + (length + 7) // 8 * 8
    return None


# qemu reads each line with sscanf("%10s %lld %10s \"%511[^\n\r\"]\"", ...), whose blanks match newlines too; this
# matches every line it would take as an extent (and RDONLY/NOACCESS ones, which it skips), so nothing slips by.
_EXTENT_RE = re.compile(rb'^\s*(?:RW|RDONLY|NOACCESS)\s+\S+\s+\S+\s+"([^\n\r"]*)"', re.IGNORECASE | re.MULTILINE)
_PARENT_KEY = b"parentFileNameHint"
_PARENT_REGION = 20 * 512  # qemu's vmdk_parent_open reads this much, from 0 (text) or 0x200 (sparse)


def vmdk_extents(descriptor: bytes) -> tuple[str, ...]:
    """The file names a vmdk descriptor gives its extents (qemu reads the descriptor up to its first NUL)."""
    text = descriptor.split(b"\0", 1)[0]
    return tuple(m.group(1).decode("utf-8", "replace") for m in _EXTENT_RE.finditer(text))


def vmdk_parent(region: bytes) -> str | None:
    """The parent (backing) file a vmdk names, found as qemu finds it: the first ``parentFileNameHint`` anywhere
    (comments included), two characters skipped (``="``), up to the next quote."""
    text = region.split(b"\0", 1)[0]
    at = text.find(_PARENT_KEY)
    if at < 0:
        return None
    rest = text[at + len(_PARENT_KEY) + 2:]
    end = rest.find(b'"')
    name = rest[:end] if end >= 0 else rest[:200]
    return name.decode("utf-8", "replace") or None


def _vmdk_names(path: Path, fd: int) -> Named:
    """A text descriptor names its extents and parent. A sparse (KDMV) file is its own one extent, unless its header
    gives it no capacity: qemu then reads its embedded descriptor as a descriptor file, extents and all."""
    head = _pread(path, fd, 512, 0)
    if not head.startswith(b"KDMV"):
        text = _pread(path, fd, _MAX_DESCRIPTOR, 0)
        return Named(backing=vmdk_parent(text[:_PARENT_REGION]), extents=vmdk_extents(text))
    parent = vmdk_parent(_pread(path, fd, _PARENT_REGION, 0x200))
    extents: tuple[str, ...] = ()
    if len(head) >= 44:
        capacity, _granularity, desc_sector = struct.unpack_from("<QQQ", head, 12)
        if capacity == 0 and 0 < desc_sector < 1 << 50:
            descriptor = _pread(path, fd, _MAX_DESCRIPTOR, desc_sector * 512)
            extents = vmdk_extents(descriptor)
            parent = parent or vmdk_parent(descriptor[:_PARENT_REGION])
    return Named(backing=parent, extents=extents)


def _has_protocol(name: str) -> bool:
    """qemu's path_has_protocol: a ``:`` before any ``/`` makes the name a protocol (nbd:, json:, file:...)."""
    return ":" in name.split("/", 1)[0]


def _is_itself(path: Path, name: str, identity: tuple[int, int]) -> bool:
    """True if *name* (as qemu resolves it: relative to the descriptor's directory) is the disk file itself.

    Only ``stat`` is used: it opens nothing, so a FIFO or a device named there is not touched."""
    if not name or _has_protocol(name):
        return False
    try:
        st = os.stat(path.parent / name)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == identity


def _refuse_named(path: Path, named: Named, identity: tuple[int, int]) -> None:
    if named.backing:
        raise DiskError(f"{path} has a backing file ({shown(named.backing)}); convert the whole chain first "
                        "(qemu-img convert -O qcow2 DISK FLAT.qcow2)")
    if named.data_file:
        raise DiskError(f"{path} keeps its data in an external file ({shown(named.data_file)}); refused")
    for name in named.extents:
        if not _is_itself(path, name, identity):
            raise DiskError(f"{path} has an extent in another file ({shown(name)}); refused")


def _read_names(path: Path, fd: int, fmt: str) -> Named:
    if fmt == "qcow2":
        header = _pread(path, fd, 1 << 16, 0)
        if len(header) >= 24:
            cluster = 1 << min(max(struct.unpack_from(">I", header, 20)[0], 9), 21)
            if cluster > len(header):
                header = _pread(path, fd, min(cluster, _MAX_CLUSTER), 0)
        return qcow2_names(header)
    if fmt == "vmdk":
        return _vmdk_names(path, fd)
    return Named()


# -- qemu-img, with the format given and a timeout ----------------------------------------------------------------


def _qemu_img(path: Path, argv: list[str], doing: str, timeout: float) -> Any:
    try:
        return run(["qemu-img", *argv, str(path)], purpose=f"{doing} {path}", timeout=timeout, check=False)
    except ToolError as exc:  # only a timeout, with check=False: the disk made qemu-img hang
        raise DiskError(f"{path}: qemu-img did not finish within {timeout:.0f}s ({doing}); refused") from exc


def _info(path: Path, fmt: str, identity: tuple[int, int]) -> dict[str, Any]:
    proc = _qemu_img(path, ["info", "-f", fmt, "--output=json"], "read", INFO_TIMEOUT)
    if proc.returncode != 0:
        said = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise DiskError(f"{path} is not a readable {fmt} disk: {said[-1] if said else 'qemu-img failed'}")
    info: dict[str, Any] = json.loads(proc.stdout)
    if info.get("encrypted"):
        raise DiskError(f"{path} is encrypted; imgconv reads plain disks only (decrypt a copy first with "
                        "qemu-img convert --object secret,... --image-opts ...)")
    data = (info.get("format-specific") or {}).get("data") or {}
    extents = tuple(str(e["filename"]) for e in data.get("extents") or [] if e.get("filename"))
    backing = info.get("backing-filename") or info.get("full-backing-filename")
    named = Named(backing=str(backing) if backing else None,
                  data_file=str(data["data-file"]) if data.get("data-file") else None, extents=extents)
    _refuse_named(path, named, identity)
    return info


def _check(path: Path, fmt: str) -> None:
    proc = _qemu_img(path, ["check", "-f", fmt, "--output=json"], "check", CHECK_TIMEOUT)
    try:
        report = json.loads(proc.stdout or b"{}")
    except ValueError:
        report = {}
    problems = int(report.get("corruptions", 0) or 0) + int(report.get("check-errors", 0) or 0)
    if problems or (proc.returncode not in (0, 3) and not report):
        raise DiskError(f"{path} is truncated or corrupt: qemu-img check found {problems or 'unreadable'} errors")


# -- the one way in -----------------------------------------------------------------------------------------------


def open_disk(path: Path) -> SafeDisk:
    """Check the disk at *path* as untrusted input (module docstring) and say what it is; raise DiskError if it
    reaches outside its own file, is not one, or is unreadable or corrupt."""
    path = Path(os.path.abspath(path))
    with opened(path) as (fd, st):
        identity = (st.st_dev, st.st_ino)
        fmt = _probe(path, fd)
        _refuse_named(path, _read_names(path, fd, fmt), identity)
        info = _info(path, fmt, identity)
        if fmt in CHECKABLE:
            _check(path, fmt)
    size = info.get("virtual-size")
    if not isinstance(size, int) or size <= 0:
        raise DiskError(f"{path} is not a readable {fmt} disk: qemu-img found no size")
    return SafeDisk(path=path, format=fmt, virtual_size=size, block_device=stat.S_ISBLK(st.st_mode),
                    identity=identity)


# -- attaching what was checked, and nothing else -----------------------------------------------------------------


@contextmanager
def pinned(disk: SafeDisk) -> Iterator[Path]:
    """A name for the very file that was checked, valid while the block lasts: ``/proc/PID/fd/N`` of a descriptor
    held here. Any process of this user (qemu, qemu-img, libguestfs' qemu) opening it opens that file, even if
    the disk's name was moved or replaced meanwhile (a FIFO put there cannot hang them)."""
    with opened(disk.path) as (fd, st):
        if (st.st_dev, st.st_ino) != disk.identity:
            raise DiskError(f"{disk.path} was replaced while imgconv was reading it; refused")
        yield Path(f"/proc/{os.getpid()}/fd/{fd}")


def _file_node(fmt: str, block_device: bool, filename: Path) -> dict[str, Any]:
    """qemu options for *filename* read as *fmt* and nothing else: explicit drivers, ``"backing": null`` for the
    formats that can have a backing file (qemu's schema has no such option for the others)."""
    protocol = "host_device" if block_device else "file"  # a block device opened as a file is deprecated
    node: dict[str, Any] = {"driver": fmt}
    if fmt in WITH_BACKING:
        node["backing"] = None
    return {**node, "file": {"driver": protocol, "filename": str(filename)}}


def blockdev_node(disk: SafeDisk, filename: Path, node: str) -> dict[str, Any]:
    """A qemu ``-blockdev`` node named *node* that reads *filename* (the disk, or :func:`pinned`'s name for it)
    read-only, in its checked format, following nothing it names."""
    return {**_file_node(disk.format, disk.block_device, filename), "node-name": node, "read-only": True}


@contextmanager
def backing_free_overlay(path: Path, fmt: str, directory: Path,
                         identity: tuple[int, int] | None = None) -> Iterator[Path]:
    """A qcow2 overlay in *directory* whose backing is the disk at *path* read as *fmt* with ``backing: null``,
    through a descriptor held for the block's duration: what libguestfs attaches read-only instead of the disk.

    libguestfs' ``add_drive_opts`` has no way to disable the backing file (its read-only overlay is
    ``qemu-img create -b DISK -F FORMAT``, and qemu then opens the chain the disk names); attaching this overlay
    instead stops the chain at the disk whatever its header says by the time the appliance opens it, and the
    descriptor keeps a name swapped in meanwhile (a FIFO, another file) out of it. With *identity* (what
    :func:`open_disk` recorded), a file that is not the one checked is refused.
    """
    with opened(Path(os.path.abspath(path))) as (fd, st):
        if identity is not None and (st.st_dev, st.st_ino) != identity:
            raise DiskError(f"{path} was replaced after it was checked; refused")
        spec = _file_node(fmt, stat.S_ISBLK(st.st_mode), Path(f"/proc/{os.getpid()}/fd/{fd}"))
        overlay = directory / "pinned.qcow2"
        try:
            run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt, "-b", "json:" + json.dumps(spec), overlay],
                purpose=f"attach {path} read-only", timeout=CREATE_TIMEOUT)
        except ToolError as exc:
            raise DiskError(f"{path} cannot be attached read-only as {fmt}: {exc}") from exc
        yield overlay
