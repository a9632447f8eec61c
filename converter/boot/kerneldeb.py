"""A kernel from a Debian package: `--kernel linux-image-*.deb`.

The package's vmlinuz and its modules tree are read out of the .deb into the conversion's scratch directory:
nothing is installed on the host, no host kernel or host modules are involved, and the disk then boots and
records exactly the package's kernel. The package is user input, read as untrusted:

- the ar archive is parsed here (its members must lie inside the file; a .deb has a handful of them), from one
  descriptor of a regular file, so what is hashed is what is read;
- control.tar and data.tar are decompressed (xz, zstd, gzip or none, as dpkg-deb allows) into bounded streams
  and read by imgconv's tar reader (converter.oci.tarread: bounded special headers, Go's strict rules);
- of data.tar only the kernel files (named as an image kernel would be, kernel.KERNEL_NAME) and the regular
  files and directories of `lib/modules/*` (or `usr/lib/modules/*`) are written, with fixed modes, under a
  directory of the scratch dir holding nothing else (no symlink is ever created, so no write can leave it);
  names with `..` are refused, sizes and entry counts are capped.

Debian's packages ship no modules.dep (their postinst runs depmod), so depmod runs here on the extracted tree
(`-b`, with an empty configuration so the host's /etc/depmod.d does not apply): the initramfs is built from
its modules.dep like a host kernel's, and the tree placed in the guest (--kernel-modules) is what installing
the package would have left, aliases included, for the guest's udev.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import re
import shutil
import stat
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, cast

from converter.boot.kernel import _RELEASE, HEADER_BYTES, KERNEL_NAME, Kernel, bzimage_release, check_initrd
from converter.errors import MissingToolError, UsageError
from converter.oci.tarread import TarFormatError, TarReader
from converter.run import run

MiB = 1 << 20
DEB_MAGIC = b"!<arch>\n"
AR_HEADER = 60
MAX_AR_MEMBERS = 16  # a .deb has three (debian-binary, control.tar, data.tar), dpkg-deb allows a few more
MAX_CONTROL = 16 * MiB  # control.tar inflated: a kernel's is 400 KB (its md5sums)
MAX_DATA = 2048 * MiB  # data.tar inflated: Debian's generic kernel is 400 MiB
MAX_FILE = 256 * MiB  # one file written: a vmlinuz is 8 MiB, the largest module a few
MAX_ENTRIES = 100_000  # data.tar entries: Debian's generic kernel has 5,000
MODULES_DIR = re.compile(r"(?:usr/)?(lib/modules/[^/]+(?:/.*)?)")
ARCHITECTURE = "amd64"


class KernelPackageError(UsageError):
    """A --kernel .deb that is not a Debian package of one x86_64 Linux kernel (or breaks a bound)."""


@dataclass(frozen=True)
class ArMember:
    name: str
    offset: int  # of its data in the file
    size: int


@dataclass(frozen=True)
class KernelPackage:
    """What a kernel package holds, extracted: the kernel file and its depmod-ed modules tree."""

    release: str
    vmlinuz: Path
    modules: Path  # .../lib/modules/RELEASE, with modules.dep
    sha256: str  # "sha256:HEX" of the .deb


def is_deb(path: Path) -> bool:
    """*path* starts like an ar archive, which is what a .deb is (anything else is taken for a kernel file)."""
    try:
        with path.open("rb") as f:
            return f.read(len(DEB_MAGIC)) == DEB_MAGIC
    except OSError:
        return False


def ar_members(fd: int, size: int, deb: Path) -> list[ArMember]:
    """The members of the ar archive open on *fd* (*size* bytes long); each must lie inside the file."""
    if os.pread(fd, len(DEB_MAGIC), 0) != DEB_MAGIC:
        raise KernelPackageError(f"--kernel {deb} is not a Debian package (no ar archive header)")
    members: list[ArMember] = []
    pos = len(DEB_MAGIC)
    while pos < size:
        header = os.pread(fd, AR_HEADER, pos)
        if len(header) < AR_HEADER or header[58:60] != b"`\n":
            raise KernelPackageError(f"--kernel {deb} is not a Debian package (bad ar member header at byte {pos})")
        length_text = header[48:58].decode("ascii", "replace").strip()
        if not length_text.isdigit() or pos + AR_HEADER + int(length_text) > size:
            raise KernelPackageError(f"--kernel {deb}: an ar member at byte {pos} declares {length_text!r} bytes, "
                                     "more than the file holds")
        name = header[:16].decode("ascii", "replace").strip().removesuffix("/")
        members.append(ArMember(name, pos + AR_HEADER, int(length_text)))
        if len(members) > MAX_AR_MEMBERS:
            raise KernelPackageError(f"--kernel {deb} has more than {MAX_AR_MEMBERS} ar members; a .deb has 3")
        pos += AR_HEADER + int(length_text) + int(length_text) % 2
    if not members or members[0].name != "debian-binary" or not os.pread(fd, 4, members[0].offset) == b"2.0\n":
        raise KernelPackageError(f"--kernel {deb} is not a Debian package (no debian-binary 2.0 first)")
    return members


class _Slice(io.RawIOBase):
    """The bytes of one ar member, read by pread from the descriptor (no shared file position)."""

    def __init__(self, fd: int, member: ArMember) -> None:
        self.fd, self.pos, self.end = fd, member.offset, member.offset + member.size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = os.pread(self.fd, min(len(buffer), self.end - self.pos), self.pos)
        memoryview(buffer)[:len(data)] = data
        self.pos += len(data)
        return len(data)


class _Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class _Bounded:
    """A decompressed stream that fails once more than *limit* bytes came out of it (a bomb ends there)."""

    def __init__(self, stream: _Readable, limit: int, what: str) -> None:
        self.stream, self.left, self.what = stream, limit, what

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(self.left + 1 if n < 0 else min(n, self.left + 1))
        self.left -= len(data)
        if self.left < 0:
            raise KernelPackageError(f"{self.what} inflates to more than its bound; a kernel package is far smaller")
        return data


def _inflated(fd: int, member: ArMember, limit: int, what: str) -> BinaryIO:
    """*member*'s content decompressed as its name says (the compressions dpkg-deb writes)."""
    raw = io.BufferedReader(_Slice(fd, member), MiB)
    suffix = member.name.rsplit(".", 1)[-1]
    stream: _Readable
    if suffix == "xz":
        stream = lzma.LZMAFile(raw)
    elif suffix == "gz":
        stream = gzip.GzipFile(fileobj=raw)
    elif suffix == "zst":
        import zstandard

        stream = zstandard.ZstdDecompressor().stream_reader(raw)
    elif suffix == "tar":
        stream = raw
    else:
        raise KernelPackageError(f"{what} is compressed as {suffix!r}, which dpkg-deb does not write")
    return cast(BinaryIO, _Bounded(stream, limit, what))  # all the tar reader calls is read()


@contextmanager
def _package_errors(deb: Path) -> Iterator[None]:
    """Whatever a malformed package makes the decompressors or the tar reader raise, as one line of usage error."""
    try:
        yield
    except (TarFormatError, lzma.LZMAError, zlib.error, EOFError, gzip.BadGzipFile) as exc:
        raise KernelPackageError(f"--kernel {deb} is not a valid Debian package: {exc}") from exc
    except (NotADirectoryError, IsADirectoryError, FileExistsError) as exc:
        raise KernelPackageError(f"--kernel {deb}: its data.tar puts a file and a directory at one path") from exc
    except Exception as exc:  # zstandard.ZstdError has no useful base class
        if type(exc).__name__ != "ZstdError":
            raise
        raise KernelPackageError(f"--kernel {deb} is not a valid Debian package: {exc}") from exc


def _member(members: list[ArMember], prefix: str, deb: Path) -> ArMember:
    found = [m for m in members if m.name == prefix or m.name.startswith(prefix + ".")]
    if len(found) != 1:
        raise KernelPackageError(f"--kernel {deb} is not a Debian package (it has {len(found)} {prefix} members)")
    return found[0]


def control_fields(fd: int, members: list[ArMember], deb: Path) -> dict[str, str]:
    """The package's control file (Package, Architecture...), from control.tar."""
    reader = TarReader(_inflated(fd, _member(members, "control.tar", deb), MAX_CONTROL, f"{deb}'s control.tar"))
    for entry in reader:
        if entry.isreg() and entry.name.removeprefix("./") == "control":
            text = reader.extractfile(entry).read(MiB).decode("utf-8", "replace")
            fields: dict[str, str] = {}
            for line in text.splitlines():
                key, sep, value = line.partition(":")
                if sep and not line[:1].isspace():
                    fields[key.strip()] = value.strip()
            return fields
    raise KernelPackageError(f"--kernel {deb} is not a Debian package (its control.tar has no control file)")


def _clean(name: str, deb: Path) -> str:
    """A member name as a relative path; one that climbs out (`..`) makes the whole package refused."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts or "\0" in name or any(len(p.encode("utf-8", "surrogateescape")) > 255 for p in parts):
        raise KernelPackageError(f"--kernel {deb}: its data.tar names {name[:200]!r}, which is not a plain path")
    return "/".join(parts)


def _write(root: Path, rel: str, data: BinaryIO, deb: Path) -> None:
    """One regular file under *root* (fresh, holding only directories and files: no symlink to follow)."""
    path = root / rel
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except (NotADirectoryError, IsADirectoryError, FileExistsError) as exc:
        raise KernelPackageError(f"--kernel {deb}: its data.tar has /{rel} where a directory or file "
                                 "already is") from exc
    with os.fdopen(fd, "wb") as out:
        os.fchmod(out.fileno(), 0o644)  # whatever the umask
        written = 0
        while chunk := data.read(MiB):
            written += len(chunk)
            if written > MAX_FILE:
                raise KernelPackageError(f"--kernel {deb}: /{rel} is larger than {MAX_FILE // MiB} MiB")
            out.write(chunk)


def extract(fd: int, members: list[ArMember], deb: Path, root: Path) -> dict[str, str]:
    """The kernel files and modules trees of data.tar written under *root*; each kernel file's path (under
    *root*) and the release its bzImage header names ("" when it has no x86 header)."""
    reader = TarReader(_inflated(fd, _member(members, "data.tar", deb), MAX_DATA, f"{deb}'s data.tar"))
    kernels: dict[str, str] = {}
    for count, entry in enumerate(reader):
        if count >= MAX_ENTRIES:
            raise KernelPackageError(f"--kernel {deb}: its data.tar has more than {MAX_ENTRIES} entries")
        rel = _clean(entry.name, deb)
        modules = MODULES_DIR.fullmatch(rel)
        if KERNEL_NAME.fullmatch(rel) and entry.isreg():
            _write(root, rel, reader.extractfile(entry), deb)
            with (root / rel).open("rb") as f:
                kernels[rel] = bzimage_release(f.read(HEADER_BYTES)) or ""
        elif modules and entry.isreg():
            _write(root, modules.group(1), reader.extractfile(entry), deb)
        elif modules and entry.isdir():
            (root / modules.group(1)).mkdir(mode=0o755, parents=True, exist_ok=True)
    return kernels


def _one_kernel(kernels: dict[str, str], deb: Path) -> tuple[str, str]:
    """The package's one kernel (its path under the extraction root, its release)."""
    if not kernels:
        raise KernelPackageError(f"--kernel {deb} holds no kernel (no /boot/vmlinuz-*): is it a linux-image package?")
    releases = sorted(set(kernels.values()))
    if len(releases) > 1:
        raise KernelPackageError(f"--kernel {deb} holds {len(kernels)} kernels ({', '.join(sorted(kernels))}); "
                                 "pass a package of one")
    path, release = next(iter(kernels.items()))
    if not release:
        raise KernelPackageError(f"--kernel {deb}: /{path} is not an x86 Linux kernel image (no bzImage header)")
    if not _RELEASE.fullmatch(release):
        raise KernelPackageError(f"--kernel {deb}: its kernel names the release {release[:80]!r}, "
                                 "not a plain word")
    return path, release


def depmod(root: Path, release: str, scratch: Path) -> None:
    """modules.dep and the other indexes for the extracted tree, as the package's postinst would make them."""
    program = shutil.which("depmod") or next((p for p in ("/usr/sbin/depmod", "/sbin/depmod")
                                              if os.access(p, os.X_OK)), None)
    if program is None:
        raise MissingToolError("depmod is required to index a --kernel package's modules (Debian package: kmod)")
    config = scratch / "depmod.d"
    config.mkdir(exist_ok=True)
    run([program, "-C", config, "-b", root, release], purpose=f"index the modules of kernel {release}",
        timeout=600)


def _settle_modes(root: Path) -> None:
    """Directories 0755, files 0644, whatever the umask was when they were made (by this module or depmod): the
    tree goes into the guest as it is here, and a reproducible disk must not depend on who converted it."""
    for base, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(base, name), 0o755)
        for name in files:
            os.chmod(os.path.join(base, name), 0o644)


def _sha256(fd: int) -> str:
    digest = hashlib.sha256()
    pos = 0
    while chunk := os.pread(fd, 4 * MiB, pos):
        digest.update(chunk)
        pos += len(chunk)
    return "sha256:" + digest.hexdigest()


def read_kernel_deb(deb: Path, scratch: Path) -> KernelPackage:
    """The kernel and modules of the package *deb*, extracted under *scratch*/package (see the module docstring)."""
    try:
        fd = os.open(deb, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise UsageError(f"cannot read --kernel {deb}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KernelPackageError(f"--kernel {deb} is not a regular file")
        members = ar_members(fd, st.st_size, deb)
        root = scratch / "package"
        root.mkdir(mode=0o755)
        with _package_errors(deb):
            fields = control_fields(fd, members, deb)
            if fields.get("Architecture") != ARCHITECTURE:
                raise KernelPackageError(f"--kernel {deb} is a package for {fields.get('Architecture', 'no')!r} "
                                         "architecture; imgconv boots x86_64 (amd64) guests only")
            path, release = _one_kernel(extract(fd, members, deb, root), deb)
        modules = root / "lib" / "modules" / release
        if not modules.is_dir():
            raise KernelPackageError(f"--kernel {deb} has no modules tree for its kernel {release} "
                                     f"(/lib/modules/{release})")
        depmod(root, release, scratch)
        _settle_modes(root)
        return KernelPackage(release, root / path, modules, _sha256(fd))
    finally:
        os.close(fd)


def package_kernel(deb: Path, initrd: Path | None, scratch: Path) -> Kernel:
    """--kernel PACKAGE.deb as a Kernel: the package's vmlinuz and modules tree, origin "package"."""
    check_initrd(initrd)
    package = read_kernel_deb(deb, scratch)
    return Kernel(package.release, "package", host_path=package.vmlinuz, host_initrd=initrd,
                  host_modules=package.modules, package=deb, package_sha256=package.sha256)
