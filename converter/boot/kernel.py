"""Which kernel a converted disk boots, and where its modules come from.

In order of preference: the user's `--kernel`; the image's own (`/boot/vmlinuz-*`,
`/usr/lib/modules/*/vmlinuz`); the host's newest under /boot. The release string decides which
modules tree belongs to the kernel, so it is read from the bzImage header itself rather than
guessed from a file name.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from converter.errors import ImageError, UsageError

HOST_BOOT = Path("/boot")
HOST_MODULES = Path("/lib/modules")
HEADER_BYTES = 0x10000  # enough for the setup header and the kernel_version string it points to


@dataclass(frozen=True)
class Kernel:
    """A chosen kernel. Exactly one of *host_path* (a host file) and *guest_path* (in the image) is set."""

    release: str
    origin: str  # "flag" | "image" | "host" | "package" (--kernel of a .deb: converter.boot.kerneldeb)
    host_path: Path | None = None
    guest_path: str | None = None
    host_initrd: Path | None = None  # a user-supplied initramfs, used as is
    host_modules: Path | None = None  # the modules tree to place in the guest (host kernels only)
    guest_modules: str | None = None  # the image's own modules tree (image kernels)
    package: Path | None = None  # the .deb a "package" kernel was read from (host_path is its extracted vmlinuz)
    package_sha256: str = ""  # "sha256:HEX" of that .deb, recorded in the sidecar

    def describe(self) -> str:
        where = {"flag": "given with --kernel", "image": "the image's own",
                 "host": "this machine's newest", "package": "from the package"}[self.origin]
        path = self.package or self.host_path or f"/{self.guest_path}"
        return f"kernel {self.release} ({where}: {path})"


def bzimage_release(header: bytes) -> str | None:
    """The release (`6.1.0-56-cloud-amd64`) from an x86 bzImage's setup header, or None.

    The header holds, at 0x20e, a pointer (minus 0x200) to the kernel_version string.
    """
    if len(header) < 0x210 or header[0x202:0x206] != b"HdrS":
        return None
    (offset,) = struct.unpack_from("<H", header, 0x20E)
    start = offset + 0x200
    if start >= len(header):
        return None
    text = header[start : start + 256].split(b"\0", 1)[0].decode("ascii", "replace")
    release = text.split(" ", 1)[0]
    return release or None


def version_key(release: str) -> tuple[object, ...]:
    """Order kernel releases the way people expect: 6.1.10 after 6.1.9."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", release))


def read_release(path: Path) -> str:
    try:
        with path.open("rb") as f:
            header = f.read(HEADER_BYTES)
    except OSError as exc:
        raise UsageError(f"cannot read kernel {path}: {exc.strerror}") from exc
    release = bzimage_release(header)
    if release is None:
        raise UsageError(f"{path} is not an x86 Linux kernel image (no bzImage header)")
    return release


def check_initrd(initrd: Path | None) -> None:
    if initrd is not None and not initrd.is_file():
        raise UsageError(f"initrd {initrd} does not exist")
    if initrd is not None and not os.access(initrd, os.R_OK):
        raise UsageError(f"initrd {initrd} cannot be read")


def from_flag(kernel: Path, initrd: Path | None, scratch: Path | None = None) -> Kernel:
    """--kernel: a kernel file (its modules, if any, from this machine's /lib/modules), or a Debian package
    (a .deb, read into *scratch*: the kernel and modules are the package's)."""
    from converter.boot.kerneldeb import is_deb, package_kernel  # it builds on this module

    if scratch is not None and (is_deb(kernel) or kernel.suffix == ".deb"):
        return package_kernel(kernel, initrd, scratch)
    release = read_release(kernel)
    check_initrd(initrd)
    modules = HOST_MODULES / release
    return Kernel(release, "flag", host_path=kernel, host_initrd=initrd,
                  host_modules=modules if modules.is_dir() else None)


def host_kernel() -> Kernel:
    candidates = []
    for path in HOST_BOOT.glob("vmlinuz-*"):
        release = path.name.removeprefix("vmlinuz-")
        if path.is_file() and (HOST_MODULES / release).is_dir():
            candidates.append((version_key(release), release, path))
    if not candidates:
        raise UsageError(
            "no kernel to boot: the image has none, and this machine has no /boot/vmlinuz-* with modules "
            "(install linux-image-cloud-amd64, or pass --kernel)"
        )
    _, release, path = max(candidates)
    return Kernel(release, "host", host_path=path, host_modules=HOST_MODULES / release)


# One path component after boot/ (a file `boot/vmlinuz-x/f0` is not a kernel): each match costs a header read.
KERNEL_NAME = re.compile(r"boot/vmlinuz-[^/]+|(?:usr/)?lib/modules/[^/]+/vmlinuz")
MAX_KERNEL_CANDIDATES = 64  # files named like kernels that are looked at; an image ships one or two
_RELEASE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~-]{0,127}")


def image_kernel(kinds: Mapping[str, str], symlinks: Mapping[str, str],
                 releases: Mapping[str, str]) -> Kernel | None:
    """The newest kernel the flattened image ships, with its modules tree, if it has one.

    *releases* maps each file named like a kernel that is a real bzImage to the release its own header
    names (:func:`bzimage_release`): what `uname -r` will say, so where modprobe looks. A file name is never
    trusted for it: an image's files are untrusted, and a name is only a name.
    """
    found: dict[str, str] = {}
    for path, release in releases.items():
        if not KERNEL_NAME.fullmatch(path) or path in symlinks or kinds.get(path, "dir") == "dir":
            continue
        if _RELEASE.fullmatch(release):
            found.setdefault(release, path)
    best = None
    for release in sorted(found, key=version_key, reverse=True):
        modules = resolve_in_tree(f"lib/modules/{release}", symlinks)
        if kinds.get(modules) == "dir":
            best = Kernel(release, "image", guest_path=found[release], guest_modules=modules)
            break
    return best


def resolve_in_tree(path: str, symlinks: Mapping[str, str], *, limit: int = 40) -> str:
    """Resolve *path* against the image's own symlinks, as the guest kernel would under its root.

    Absolute targets start again from the image's root and `..` stops at it, so the answer is
    always inside the image; this is what keeps imgconv from following a symlink out of the
    guest when it places files into it.
    """
    pending = [p for p in path.split("/") if p not in ("", ".")]
    done: list[str] = []
    hops = 0
    while pending:
        part = pending.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        candidate = "/".join([*done, part])
        target = symlinks.get(candidate)
        if target is None:
            done.append(part)
            continue
        hops += 1
        if hops > limit:
            raise ImageError(f"too many levels of symbolic links resolving /{path} in the image")
        if target.startswith("/"):
            done = []
        pending = [p for p in target.split("/") if p not in ("", ".")] + pending
    return "/".join(done)
