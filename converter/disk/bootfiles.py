"""The kernel and initramfs a converted disk boots, and where they go in it.

A host kernel (or ``--kernel``) is copied in (on the host, after the appliance); an image's own kernel stays
where the image has it. The initramfs is the user's ``--initrd`` or one imgconv builds with the modules the boot
needs: a host kernel's from the host, an image kernel's read out of the image (each name checked: modules.dep is
image data).
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from converter.boot.extlinux import boot_entry
from converter.boot.initbin import init_binary
from converter.boot.initramfs import BOOT_MODULES, build_initramfs, needed_modules
from converter.boot.kernel import Kernel, resolve_in_tree
from converter.disk.appliance import Appliance
from converter.errors import ImageError
from converter.guest import BOOT_DIR
from converter.oci.flatten import FlatTree
from converter.records import BootEntry

MiB = 1 << 20
BUILT_INITRAMFS = "initramfs.img"  # in the scratch directory: the initramfs imgconv built, kept for a UKI
MAX_GUEST_MODULE = 64 * MiB  # a module, modules.dep or modules.builtin larger than this is not one


def _guest_file(app: Appliance, path: str) -> bool:
    """*path* in the guest is a regular file (not a symlink, FIFO or device) of a plausible size."""
    if not app.call(f"look for {path}", app.g.is_file, path):  # symlinks are not followed
        return False
    if app.call(f"measure {path}", app.g.filesize, path) > MAX_GUEST_MODULE:
        raise ImageError(f"the image's {path} is too large to be part of a kernel's modules")
    return True


def fetch_guest_modules(app: Appliance, release: str, guest_modules: str, scratch: Path) -> Path:
    """Copy what the initramfs needs of an image kernel's modules out of the guest.

    The image's modules.dep names the files: each name must stay inside the modules tree (it becomes a
    path on the host) and be a regular file in the guest.
    """
    local = scratch / "modules" / release
    local.mkdir(parents=True)
    for name in ("modules.dep", "modules.builtin"):
        guest = f"/{guest_modules}/{name}"
        if _guest_file(app, guest):
            app.call(f"read {guest}", app.g.download, guest, str(local / name))
    for rel in needed_modules(local, BOOT_MODULES):
        clean = posixpath.normpath(rel)
        if rel.startswith("/") or clean == "." or clean.startswith("../") or clean == ".." or "\0" in rel:
            raise ImageError(f"the image's /{guest_modules}/modules.dep names {rel!r}, which is outside its "
                             "modules tree")
        guest = f"/{guest_modules}/{clean}"
        if not _guest_file(app, guest):
            raise ImageError(f"the image's kernel module {guest} is not a regular file")
        (local / clean).parent.mkdir(parents=True, exist_ok=True)
        app.call(f"read {guest}", app.g.download, guest, str(local / clean))
    return local


@dataclass(frozen=True)
class PlacedKernel:
    """What :func:`place_kernel` decided: the boot entry, and the host files that go into the disk at guest paths
    (written on the host once the appliance is gone: converter.disk.reproducible.write_guest_files)."""

    entry: BootEntry
    files: tuple[tuple[str, Path], ...]


def place_kernel(app: Appliance | None, kernel: Kernel, tree: FlatTree, scratch: Path, uuid: str,
                 prebuilt: Callable[[Kernel], bytes | None] = lambda _: None) -> PlacedKernel:
    """Kernel and initramfs for the disk; the boot entry that names them. Only an image kernel's modules are read
    through the appliance: the files themselves are written on the host, which is faster than uploading them.
    *prebuilt* may have the initramfs of a host kernel ready (built while the appliance started)."""
    files: list[tuple[str, Path]] = []
    if kernel.host_path is not None:
        kernel_guest = f"{BOOT_DIR}/vmlinuz-{kernel.release}"
        files.append((kernel_guest, kernel.host_path))
    elif kernel.guest_path is not None:
        kernel_guest = resolve_in_tree(kernel.guest_path, tree.symlinks)
    else:
        raise ValueError(f"{kernel.describe()} has no file")
    initrd_guest = f"{BOOT_DIR}/initramfs-{kernel.release}.img"
    if kernel.host_initrd is not None:
        files.append((initrd_guest, kernel.host_initrd))
    else:
        built = prebuilt(kernel)
        if built is None:
            if kernel.host_modules is not None:
                modules = kernel.host_modules
            elif kernel.guest_modules is not None and app is not None:
                modules = fetch_guest_modules(app, kernel.release, kernel.guest_modules, scratch)
            else:  # ruled out when the kernel is chosen (build.check_inputs)
                raise ValueError(f"{kernel.describe()} has no modules")
            built = build_initramfs(kernel.release, modules, init_binary())
        initramfs = scratch / BUILT_INITRAMFS
        initramfs.write_bytes(built)
        files.append((initrd_guest, initramfs))
    return PlacedKernel(boot_entry(kernel_guest, initrd_guest, uuid), tuple(files))


def boot_files_on_host(app: Appliance | None, kernel: Kernel, entry: BootEntry, scratch: Path) -> tuple[Path, Path]:
    """The kernel and initramfs *entry* boots, as host files (a unified kernel image is built on the host): the
    host's or --kernel/--initrd's where they came from, the initramfs :func:`place_kernel` built, and an image's
    own kernel read back out of the disk (the file :func:`place_kernel` resolved inside the image)."""
    kernel_file = kernel.host_path
    if kernel_file is None:
        if app is None:
            raise ValueError("an image's own kernel is read in the appliance")
        kernel_file = scratch / "vmlinuz"
        app.call(f"read the image's kernel {entry.kernel}", app.g.download, entry.kernel, str(kernel_file))
    return kernel_file, kernel.host_initrd or scratch / BUILT_INITRAMFS
