"""What oci-to-qcow2 puts into the disk: the image's final root filesystem, then imgconv's own files.

Two sets of entries, each given to a tar sink: debugfs's collector on the host (converter/disk/hostwrite.py,
the usual way), or a tar stream through a FIFO into the appliance's GNU tar (what debugfs cannot be given):

1. the image's layers flattened (:func:`write_image_tree`; the sink :class:`ApplianceSink` notes the kernels);
   the tree summary says which kernel the image carries, so the kernel is chosen between the two sets;
2. imgconv's files (:func:`imgconv_entries`): init, its spec, the image's config and manifest, a host
   kernel's modules where modprobe looks and, last, the origin record listing every path added; for GNU tar
   (:func:`write_imgconv_files`) also the headers of existing directories that received entries (it then
   restores their mtime; debugfs sets every directory's time itself).
"""

from __future__ import annotations

import copy
import functools
import io
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, BinaryIO, cast

from converter.boot.kernel import (
    HEADER_BYTES,
    KERNEL_NAME,
    MAX_KERNEL_CANDIDATES,
    Kernel,
    bzimage_release,
    resolve_in_tree,
)
from converter.disk.appliance import Appliance
from converter.disk.fifo import through_fifo
from converter.errors import ImageError, ToolError
from converter.guest import BOOT_DIR, MOUNTED_BY_INIT, ORIGIN, RESERVED
from converter.oci.flatten import DIR, FlatTree, LayerTap, TarSink, flatten
from converter.oci.image import Image
from converter.oci.tarutil import abandon_output, gnu_xattrs_encoded, open_output, parents


@dataclass(frozen=True)
class ImageTree:
    """The image's files as written into the disk, and the release of each bzImage named like a kernel."""

    tree: FlatTree
    kernel_releases: dict[str, str]


@dataclass(frozen=True)
class GuestFile:
    """One file imgconv adds under /.imgconv."""

    name: str
    data: bytes
    mode: int = 0o644


@dataclass
class Additions:
    """Paths imgconv creates in the guest, and existing directories it writes into (their mtimes)."""

    injected: list[str] = field(default_factory=list)
    touched_dirs: dict[str, float] = field(default_factory=dict)


# -- the image's tree -----------------------------------------------------------------------------------------


class ApplianceSink:
    """The tar sink in front of the stream to the appliance's GNU tar, or of debugfs's collector (*escape* off).
    It escapes xattr names as GNU tar reads them, and reads the header of each file named like a kernel as it
    passes, keeping only the release a real bzImage names (the image's kernel is chosen from those without
    reading any file twice). At most MAX_KERNEL_CANDIDATES files are looked at, so an image of many such names
    costs no memory."""

    def __init__(self, inner: TarSink, escape: bool = True) -> None:
        self.inner = inner
        self.escape = escape  # GNU tar's escaping of xattr names (debugfs takes them as they are)
        self._releases: dict[str, str] = {}
        self._links: dict[str, str] = {}
        self._looked = 0

    def addfile(self, tarinfo: tarfile.TarInfo, fileobj: IO[bytes] | None = None) -> None:
        tarinfo = for_gnu_tar(tarinfo) if self.escape else tarinfo
        name = tarinfo.name.strip("/")
        if KERNEL_NAME.fullmatch(name) and self._looked < MAX_KERNEL_CANDIDATES:
            self._looked += 1
            if tarinfo.islnk():
                self._links[name] = tarinfo.linkname.strip("/")
            elif tarinfo.isreg() and fileobj is not None:
                head = _read_full(fileobj, min(tarinfo.size, HEADER_BYTES))
                release = bzimage_release(head)
                if release is not None:
                    self._releases[name] = release
                fileobj = cast(IO[bytes], _Prefixed(head, fileobj))
        self.inner.addfile(tarinfo, fileobj)

    def kernel_releases(self) -> dict[str, str]:
        found = dict(self._releases)
        for name, target in self._links.items():
            if target in self._releases:
                found[name] = self._releases[target]
        return found


def for_gnu_tar(tarinfo: tarfile.TarInfo, mtime: float | None = None) -> tarfile.TarInfo:
    """*tarinfo* with its xattr names escaped as GNU tar reads them (and another mtime, if given), on a copy:
    the caller's header (kept in the FlatTree) stays as the image has it."""
    escape = any(key.startswith("SCHILY.xattr.") and "%" in key for key in tarinfo.pax_headers)
    if not escape and mtime is None:
        return tarinfo
    copied = copy.copy(tarinfo)
    if escape:
        copied.pax_headers = gnu_xattrs_encoded(tarinfo.pax_headers)
    if mtime is not None:
        copied.mtime = mtime
    return copied


def _read_full(fileobj: IO[bytes], size: int) -> bytes:
    parts, wanted = [], size
    while wanted > 0:
        chunk = fileobj.read(wanted)
        if not chunk:
            break
        parts.append(chunk)
        wanted -= len(chunk)
    return b"".join(parts)


class _Prefixed(io.RawIOBase):
    """*head* (already read from *rest*) followed by the rest of *rest*: full reads, as tarfile needs."""

    def __init__(self, head: bytes, rest: IO[bytes]) -> None:
        super().__init__()
        self.head, self.rest = head, rest

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            data, self.head = self.head + self.rest.read(), b""
            return data
        data, self.head = self.head[:size], self.head[size:]
        return data + _read_full(self.rest, size - len(data)) if len(data) < size else data

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        memoryview(buffer)[: len(data)] = data
        return len(data)


def check_tree(tree: FlatTree) -> None:
    """What the image may not hold: imgconv's reserved directory, or non-directories where the init mounts.

    Through a symlink the init's mount would land on whatever it points to. Docker's init layer hides such
    entries under directories; imgconv refuses them rather than change the image behind the user's back.
    """
    if RESERVED in tree.kinds:
        raise ImageError(f"the image already contains /{RESERVED}, which imgconv reserves for its own files")
    for name in MOUNTED_BY_INIT:
        if name in tree.symlinks:
            raise ImageError(f"the image's /{name} is a symbolic link (to {tree.symlinks[name]!r}); the VM mounts "
                             f"its own /{name} there, so it must be a directory")
        if name != "sys" and tree.kinds.get(name, DIR) != DIR:
            raise ImageError(f"the image's /{name} is not a directory; the VM mounts its own /{name} there")


def write_image_tree(image: Image, out: BinaryIO, on_bytes: Callable[[int], None],
                     tap: LayerTap | None = None) -> ImageTree:
    """The image's final root filesystem as one tar stream on *out* (*tap*: a tar-split recorder, which sees the
    layers in the same pass)."""
    with _tar_output(out) as tar:
        sink = ApplianceSink(tar)
        tree = flatten(image.layer_inputs(), sink, on_bytes, tap)
        check_tree(tree)
    return ImageTree(tree, sink.kernel_releases())


# -- imgconv's files ------------------------------------------------------------------------------------------


@contextmanager
def _tar_output(out: BinaryIO) -> Iterator[tarfile.TarFile]:
    """A tar stream that is finished on success and abandoned (no end-of-archive) on failure, so that the
    appliance's tar fails instead of unpacking a truncated stream as if it were whole."""
    tar = open_output(out)
    try:
        yield tar
    except BaseException:
        abandon_output(tar)
        raise
    tar.close()


def _add_bytes(tar: TarSink, name: str, data: bytes, mode: int = 0o644, mtime: float = 0) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.uname, info.gname = len(data), mode, mtime, "", ""
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: TarSink, name: str, mode: int = 0o755, mtime: float = 0) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime, info.uname, info.gname = tarfile.DIRTYPE, mode, mtime, "", ""
    tar.addfile(info)


def _add_host_tree(tar: TarSink, source: Path, dest: str, mtime: float) -> None:
    """Copy a host directory (a kernel's modules) into the stream: root-owned, symlinks not followed, every entry
    with *mtime* (the build's time: the host's own times would differ from one machine to the next)."""
    for root, dirs, files in os.walk(source):
        dirs.sort()
        rel = os.path.relpath(root, source)
        base = dest if rel == "." else f"{dest}/{rel}"
        st = os.lstat(root)
        _add_dir(tar, base, stat.S_IMODE(st.st_mode), mtime)
        for name in sorted(files) + sorted(d for d in dirs if os.path.islink(os.path.join(root, d))):
            path = os.path.join(root, name)
            st = os.lstat(path)
            info = tarfile.TarInfo(f"{base}/{name}")
            info.mode, info.mtime, info.uname, info.gname = stat.S_IMODE(st.st_mode), mtime, "", ""
            if stat.S_ISLNK(st.st_mode):
                info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
                tar.addfile(info)
            elif stat.S_ISREG(st.st_mode):
                info.size = st.st_size
                with open(path, "rb") as f:
                    tar.addfile(info, f)


def place(tree: FlatTree, wanted: str, added: Additions, tar: TarSink, mtime: float = 0) -> str:
    """Where *wanted* lands in the image once its symlinks are followed; create missing parents.

    Existing directories that receive new entries are remembered with their mtime, so their header can be
    re-emitted at the end of the stream (tar then restores the original mtime).
    """
    target = resolve_in_tree(wanted, tree.symlinks)
    if target == RESERVED or target.startswith(f"{RESERVED}/"):
        raise ImageError(f"cannot place /{wanted} in the image: its symlinks lead it to /{target}, "
                         f"inside /{RESERVED}, which imgconv reserves for its own files")
    chain = list(reversed(list(parents(target))))
    for ancestor in chain:
        kind = tree.kinds.get(ancestor)
        if kind is None:
            _add_dir(tar, ancestor, mtime=mtime)
            tree.kinds[ancestor] = DIR
            added.injected.append(ancestor)
        elif kind != DIR:
            raise ImageError(f"cannot place /{wanted} in the image: /{ancestor} is not a directory")
    parent = chain[-1] if chain else ""
    if parent and parent not in added.injected and parent in tree.dirs:
        added.touched_dirs[parent] = tree.dirs[parent].mtime
    return target


def write_imgconv_files(tree: FlatTree, files: list[GuestFile], kernel: Kernel, modules: bool,
                        origin: Callable[[Additions], bytes], out: BinaryIO, epoch: int = 0) -> Additions:
    """imgconv's files as one tar stream on *out* for the appliance's GNU tar, each with the time *epoch*;
    *origin* renders the origin record from what was added."""
    with _tar_output(out) as tar:
        return imgconv_entries(tree, files, kernel, modules, origin, tar, epoch, for_gnu_tar=True)


def imgconv_entries(tree: FlatTree, files: list[GuestFile], kernel: Kernel, modules: bool,
                      origin: Callable[[Additions], bytes], tar: TarSink, epoch: int = 0,
                      for_gnu_tar: bool = False) -> Additions:
    """imgconv's files as entries into *tar*; *for_gnu_tar* adds the directory headers GNU tar needs to leave
    every directory's time as the image has it (a debugfs writer sets those times itself)."""
    added = Additions(injected=[RESERVED] + ([] if "lost+found" in tree.kinds else ["lost+found"]))
    _add_dir(tar, RESERVED, mtime=epoch)
    _add_dir(tar, BOOT_DIR, mtime=epoch)
    for guest_file in files:
        _add_bytes(tar, f"{RESERVED}/{guest_file.name}", guest_file.data, guest_file.mode, epoch)
    if kernel.host_modules is not None and modules:
        dest = place(tree, f"lib/modules/{kernel.release}", added, tar, epoch)
        if dest not in tree.kinds:
            _add_host_tree(tar, kernel.host_modules, dest, epoch)
            added.injected.append(dest)
    if for_gnu_tar:
        _restamp_directories(tree, added, tar)
    _add_bytes(tar, ORIGIN, origin(added), mtime=epoch)
    return added


def _restamp_directories(tree: FlatTree, added: Additions, tar: TarSink) -> None:
    """Every directory's header again (the touched ones included), so tar sets each one's mtime last: the image's
    stream is newest layer first, so an older layer's files land in a directory after tar has set its time, which
    then becomes the appliance's clock (a disk that differs from run to run)."""
    for info in tree.dirs.values():
        tar.addfile(for_gnu_tar(info))
    # Directories no layer has an entry for (parents of deeper entries): GNU tar made them 0755 with the
    # appliance's clock as their time; they get time 0, as the flattener's implied directories have.
    ours = set(added.injected)
    for path in [p for p in tree.kinds if p and p not in tree.dirs and p not in ours]:
        if tree.kinds[path] == DIR:
            _add_dir(tar, path, mtime=0)


def stream_into(app: Appliance, fifo: Path, work: Callable[[BinaryIO], None], doing: str) -> None:
    """Unpack what *work* writes into the disk's root, through a FIFO (nothing staged on the host)."""
    try:
        through_fifo(fifo, "write", work, functools.partial(_tar_in, app, doing))
    except ToolError as exc:
        if "No space left" in str(exc):
            raise ToolError("the disk is too small for the image's files; pass a larger --size") from exc
        raise


def _tar_in(app: Appliance, doing: str, path: str) -> None:
    app.call(doing, app.g.tar_in, path, "/", xattrs=True)
