"""Which kernel a disk boots: an image's file counts as its kernel only if it is a real bzImage, and its release
(where modprobe looks) comes from the header, never from the file's name."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from converter.boot.initramfs import needed_modules
from converter.boot.kernel import bzimage_release, image_kernel


def bzimage(release: str) -> bytes:
    """The parts of an x86 setup header that name the kernel: 'HdrS' and a pointer to the version string."""
    header = bytearray(0x1000)
    header[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", header, 0x20E, 0x800 - 0x200)
    version = f"{release} (builder@example) #1 SMP".encode()
    header[0x800:0x800 + len(version)] = version
    return bytes(header)


KINDS = {"boot": "dir", "lib": "dir", "lib/modules": "dir", "lib/modules/6.1.0-9-amd64": "dir",
         "lib/modules/9.9.9-bogus": "dir", "boot/vmlinuz-6.1.0-9-amd64": "nondir", "boot/vmlinuz-9.9.9-bogus": "nondir",
         "boot/vmlinuz-renamed": "nondir"}


def test_the_header_names_the_release() -> None:
    assert bzimage_release(bzimage("6.1.0-9-amd64")) == "6.1.0-9-amd64"
    assert bzimage_release(b"not a kernel") is None


def releases(headers: dict[str, bytes]) -> dict[str, str]:
    """What oci-to-qcow2 keeps of the files named like kernels: the release of each real bzImage."""
    return {path: release for path, head in headers.items() if (release := bzimage_release(head)) is not None}


def test_only_a_bzimage_is_a_kernel() -> None:
    headers = {"boot/vmlinuz-9.9.9-bogus": b"not a kernel", "boot/vmlinuz-6.1.0-9-amd64": bzimage("6.1.0-9-amd64")}
    kernel = image_kernel(KINDS, {}, releases(headers))
    assert kernel is not None and (kernel.release, kernel.guest_path) == ("6.1.0-9-amd64", "boot/vmlinuz-6.1.0-9-amd64")
    assert image_kernel(KINDS, {}, releases({"boot/vmlinuz-9.9.9-bogus": b"not a kernel"})) is None


def test_the_release_comes_from_the_header() -> None:
    kernel = image_kernel(KINDS, {}, releases({"boot/vmlinuz-renamed": bzimage("6.1.0-9-amd64")}))
    assert kernel is not None
    assert (kernel.release, kernel.guest_modules) == ("6.1.0-9-amd64", "lib/modules/6.1.0-9-amd64")


def test_only_one_path_component_after_boot_is_a_kernel_name() -> None:
    kinds = KINDS | {"boot/vmlinuz-x": "dir", "boot/vmlinuz-x/f0": "nondir"}
    assert image_kernel(kinds, {}, releases({"boot/vmlinuz-x/f0": bzimage("6.1.0-9-amd64")})) is None


@pytest.mark.parametrize("release", ["..", "../../etc", "a/b", "", " x"])
def test_releases_that_are_not_names_are_refused(release: str) -> None:
    assert image_kernel(KINDS | {f"lib/modules/{release}": "dir"}, {},
                        releases({"boot/vmlinuz-renamed": bzimage(release)})) is None


def test_a_long_modules_dep_chain_is_no_recursion_error(tmp_path: Path) -> None:
    """An image's modules.dep is untrusted: a 20 000-long dependency chain must not overflow Python's stack."""
    n = 20_000
    lines = [f"kernel/m{i}.ko: kernel/m{i + 1}.ko" for i in range(n)] + [f"kernel/m{n}.ko:"]
    lines[0] = "kernel/virtio_blk.ko: kernel/m1.ko"
    (tmp_path / "modules.dep").write_text("\n".join(lines) + "\n")
    order = needed_modules(tmp_path, ["virtio_blk"])
    assert order[0] == f"kernel/m{n}.ko" and order[-1] == "kernel/virtio_blk.ko" and len(order) == n + 1
