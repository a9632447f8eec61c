"""`--kernel PACKAGE.deb`: the package's kernel and modules are read out of the .deb into a scratch dir, bounded
and confined like any untrusted input, and the initramfs gets what the root filesystem needs from them.

Packages are made with `dpkg-deb --build` (what Debian's tools write, in each compression dpkg-deb offers) and,
for the hostile ones dpkg-deb would not make, by hand (ar + tar)."""

from __future__ import annotations

import io
import lzma
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from converter.boot.initramfs import BOOT_MODULES, needed_modules
from converter.boot.kernel import from_flag
from converter.boot.kerneldeb import (
    MAX_AR_MEMBERS,
    KernelPackageError,
    is_deb,
    read_kernel_deb,
)
from converter.errors import UsageError
from tests.unit.test_kernel import bzimage

RELEASE = "6.1.0-99-amd64"
HOST_MODULES = Path("/lib/modules")
# Real modules (depmod reads their ELF .modinfo for the dependencies): virtio.ko depends on virtio_ring.ko.
REAL = ("kernel/drivers/virtio/virtio.ko", "kernel/drivers/virtio/virtio_ring.ko")


def host_tree() -> Path:
    trees = sorted(p for p in HOST_MODULES.glob("*") if all((p / rel).is_file() for rel in REAL))
    if not trees:
        pytest.skip("no host modules tree with virtio.ko and virtio_ring.ko to copy real modules from")
    return trees[-1]


def control(arch: str = "amd64") -> str:
    return (f"Package: linux-image-{RELEASE}\nVersion: 6.1.999-1\nArchitecture: {arch}\n"
            "Maintainer: imgconv tests <tests@example.org>\nDescription: a tiny kernel package\n")


def package_tree(root: Path, *, arch: str = "amd64", kernels: dict[str, bytes] | None = None,
                 modules: bool = True) -> Path:
    """A directory dpkg-deb --build turns into a kernel package."""
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(control(arch))
    for name, data in (kernels if kernels is not None else {f"boot/vmlinuz-{RELEASE}": bzimage(RELEASE)}).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    if modules:
        tree = root / "lib" / "modules" / RELEASE
        for rel in REAL:
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(host_tree() / rel, tree / rel)
        (tree / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\n")
    (root / "usr" / "share" / "doc").mkdir(parents=True)
    (root / "usr" / "share" / "doc" / "README").write_text("not extracted\n")
    return root


def dpkg_build(tree: Path, out: Path, compression: str = "xz") -> Path:
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed")
    subprocess.run(["dpkg-deb", "--root-owner-group", f"-Z{compression}", "--build", str(tree), str(out)],
                   check=True, capture_output=True)
    return out


def tar_bytes(entries: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in entries:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def reg(name: str, data: bytes = b"") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def ar(members: list[tuple[str, bytes]]) -> bytes:
    """An ar archive as dpkg-deb writes one."""
    out = bytearray(b"!<arch>\n")
    for name, data in members:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        out += data + (b"\n" if len(data) % 2 else b"")
    return bytes(out)


def hand_deb(path: Path, data: bytes, *, arch: str = "amd64", data_name: str = "data.tar.xz") -> Path:
    control_tar = tar_bytes([reg("./control", control(arch).encode())])
    compressed = lzma.compress(data) if data_name.endswith(".xz") else data
    path.write_bytes(ar([("debian-binary", b"2.0\n"), ("control.tar", control_tar), (data_name, compressed)]))
    return path


@pytest.mark.parametrize("compression", ["xz", "gzip", "zstd", "none"])
def test_a_package_gives_its_kernel_and_an_indexed_modules_tree(tmp_path: Path, compression: str) -> None:
    deb = dpkg_build(package_tree(tmp_path / "tree"), tmp_path / "k.deb", compression)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    kernel = from_flag(deb, None, scratch)
    assert (kernel.release, kernel.origin, kernel.package) == (RELEASE, "package", deb)
    assert kernel.package_sha256.startswith("sha256:") and len(kernel.package_sha256) == 71
    assert kernel.host_path is not None and kernel.host_path.read_bytes() == bzimage(RELEASE)
    assert kernel.host_modules == scratch / "package" / "lib" / "modules" / RELEASE
    # depmod ran on the package's tree (Debian ships no modules.dep): the dependency comes from the ELF files
    assert "kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko" in \
        (kernel.host_modules / "modules.dep").read_text()
    assert needed_modules(kernel.host_modules, ("virtio",)) == list(reversed(REAL))
    # nothing but the kernel and its modules was written, and nothing outside the scratch dir
    assert sorted(p.name for p in (scratch / "package").iterdir()) == ["boot", "lib"]
    assert kernel.describe() == f"kernel {RELEASE} (from the package: {deb})"


def test_a_kernel_file_is_still_a_kernel_file(tmp_path: Path) -> None:
    (tmp_path / "vmlinuz").write_bytes(bzimage(RELEASE))
    kernel = from_flag(tmp_path / "vmlinuz", None, tmp_path)
    assert (kernel.origin, kernel.package, kernel.package_sha256) == ("flag", None, "")
    assert not is_deb(tmp_path / "vmlinuz")


def refused(deb: Path, tmp_path: Path, *words: str) -> str:
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    with pytest.raises(UsageError) as caught:
        from_flag(deb, None, scratch)
    message = str(caught.value)
    assert "\n" not in message and caught.value.exit_code == 2
    for word in words:
        assert word in message, message
    return message


def test_a_file_named_deb_that_is_not_one(tmp_path: Path) -> None:
    (tmp_path / "linux-image-x_amd64.deb").write_bytes(b"this is text, not an ar archive\n")
    refused(tmp_path / "linux-image-x_amd64.deb", tmp_path, "is not a Debian package")


def test_a_package_without_a_kernel(tmp_path: Path) -> None:
    deb = dpkg_build(package_tree(tmp_path / "tree", kernels={}), tmp_path / "k.deb")
    refused(deb, tmp_path, "holds no kernel")


def test_a_package_with_two_kernels(tmp_path: Path) -> None:
    kernels = {f"boot/vmlinuz-{RELEASE}": bzimage(RELEASE), "boot/vmlinuz-6.1.0-98-amd64": bzimage("6.1.0-98-amd64")}
    deb = dpkg_build(package_tree(tmp_path / "tree", kernels=kernels), tmp_path / "k.deb")
    refused(deb, tmp_path, "holds 2 kernels")


def test_a_package_for_another_architecture(tmp_path: Path) -> None:
    deb = dpkg_build(package_tree(tmp_path / "tree", arch="arm64"), tmp_path / "k.deb")
    refused(deb, tmp_path, "'arm64'", "x86_64")


def test_a_vmlinuz_that_is_no_x86_kernel(tmp_path: Path) -> None:
    kernels = {f"boot/vmlinuz-{RELEASE}": b"MZ an arm64 Image, say" + bytes(4096)}
    deb = dpkg_build(package_tree(tmp_path / "tree", kernels=kernels), tmp_path / "k.deb")
    refused(deb, tmp_path, "not an x86 Linux kernel image")


def test_a_kernel_without_its_modules(tmp_path: Path) -> None:
    deb = dpkg_build(package_tree(tmp_path / "tree", modules=False), tmp_path / "k.deb")
    refused(deb, tmp_path, f"no modules tree for its kernel {RELEASE}")


def test_names_that_climb_out_are_refused(tmp_path: Path) -> None:
    data = tar_bytes([reg(f"./boot/vmlinuz-{RELEASE}", bzimage(RELEASE)),
                      reg(f"./lib/modules/{RELEASE}/../../../../../escaped", b"x")])
    refused(hand_deb(tmp_path / "k.deb", data), tmp_path, "not a plain path")
    assert not list(tmp_path.rglob("escaped"))


def test_symlinks_and_devices_are_never_created(tmp_path: Path) -> None:
    link = tarfile.TarInfo(f"./lib/modules/{RELEASE}/kernel")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc"
    dev = tarfile.TarInfo(f"./lib/modules/{RELEASE}/null")
    dev.type, dev.devmajor, dev.devminor = tarfile.CHRTYPE, 1, 3
    data = tar_bytes([reg(f"./boot/vmlinuz-{RELEASE}", bzimage(RELEASE)), (link, b""), (dev, b""),
                      reg(f"./lib/modules/{RELEASE}/kernel/passwd", b"written in the tree, not /etc\n")])
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    package = read_kernel_deb(hand_deb(tmp_path / "k.deb", data), scratch)
    assert not (package.modules / "kernel").is_symlink() and (package.modules / "kernel" / "passwd").is_file()
    assert not (package.modules / "null").exists()


def test_an_ar_member_larger_than_the_file(tmp_path: Path) -> None:
    header = f"{'data.tar.xz':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{9_999_999_999:<10}`\n".encode()
    raw = ar([("debian-binary", b"2.0\n")]) + header
    (tmp_path / "k.deb").write_bytes(raw)
    refused(tmp_path / "k.deb", tmp_path, "more than the file holds")


def test_too_many_ar_members(tmp_path: Path) -> None:
    (tmp_path / "k.deb").write_bytes(ar([("debian-binary", b"2.0\n")] + [(f"m{i}", b"") for i in range(40)]))
    refused(tmp_path / "k.deb", tmp_path, f"more than {MAX_AR_MEMBERS} ar members")


def test_a_data_tar_bomb_stops_at_its_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("converter.boot.kerneldeb.MAX_DATA", 4 << 20)
    data = tar_bytes([reg(f"./boot/vmlinuz-{RELEASE}", bzimage(RELEASE)), reg("./usr/share/zeros", bytes(8 << 20))])
    deb = hand_deb(tmp_path / "k.deb", data)
    assert deb.stat().st_size < 64 << 10  # 8 MiB of zeros in a few KB of xz
    refused(deb, tmp_path, "inflates to more than its bound")


def test_a_corrupt_data_tar(tmp_path: Path) -> None:
    deb = tmp_path / "k.deb"
    control_tar = tar_bytes([reg("./control", control().encode())])
    deb.write_bytes(ar([("debian-binary", b"2.0\n"), ("control.tar", control_tar),
                        ("data.tar.xz", b"\xfd7zXZ\x00 then garbage" * 10)]))
    refused(deb, tmp_path, "not a valid Debian package")


def test_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    import os

    os.mkfifo(tmp_path / "k.deb")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with pytest.raises(KernelPackageError, match="not a regular file"):
        read_kernel_deb(tmp_path / "k.deb", scratch)


def test_the_root_filesystem_modules_come_when_not_built_in(tmp_path: Path) -> None:
    """Debian's generic kernel has ext4 (and the crc32c its checksums need) as modules; the cloud kernel builds
    them in. The initramfs loads them in the first case, with ext4's dependencies before it, and not the second."""
    dep = ("kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko\n"
           "kernel/fs/jbd2/jbd2.ko:\nkernel/fs/mbcache.ko:\nkernel/lib/crc16.ko:\n"
           "kernel/crypto/crc32c_generic.ko:\nkernel/drivers/block/virtio_blk.ko:\n")
    (tmp_path / "modules.dep").write_text(dep)
    wanted = needed_modules(tmp_path, BOOT_MODULES)
    assert wanted[-5:] == ["kernel/crypto/crc32c_generic.ko", "kernel/fs/jbd2/jbd2.ko", "kernel/fs/mbcache.ko",
                           "kernel/lib/crc16.ko", "kernel/fs/ext4/ext4.ko"]
    (tmp_path / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\nkernel/crypto/crc32c_generic.ko\n")
    assert needed_modules(tmp_path, BOOT_MODULES) == ["kernel/drivers/block/virtio_blk.ko"]


def test_a_package_sizes_the_esp_by_the_kernel_it_holds(tmp_path: Path) -> None:
    """The EFI system partition holds the unified kernel image: the package's vmlinuz, not the whole .deb."""
    from converter.boot.kernel import Kernel
    from converter.disk.build import BuildOptions, plan_layout
    from converter.disk.plan import ESP_MIN
    from converter.disk.uefi import Firmware

    deb, vmlinuz = tmp_path / "big.deb", tmp_path / "vmlinuz"
    with deb.open("wb") as f:
        f.truncate(200 << 20)  # sparse: a 200 MiB package
    vmlinuz.write_bytes(bzimage(RELEASE))
    options = BuildOptions(output=tmp_path / "x.qcow2", kernel=deb, firmware=Firmware.UEFI)
    kernel = Kernel(RELEASE, "package", host_path=vmlinuz, package=deb)
    assert plan_layout(options, kernel).esp_bytes == ESP_MIN
    assert plan_layout(options).esp_bytes > 200 << 20  # a kernel file given as such counts whole


def test_a_file_where_a_directory_is_and_modes_whatever_the_umask(tmp_path: Path) -> None:
    import os

    clash = tarfile.TarInfo(f"./lib/modules/{RELEASE}/kernel")
    clash.type = tarfile.DIRTYPE
    data = tar_bytes([reg(f"./boot/vmlinuz-{RELEASE}", bzimage(RELEASE)), reg(f"./lib/modules/{RELEASE}/kernel"),
                      (clash, b"")])
    refused(hand_deb(tmp_path / "clash.deb", data), tmp_path, "a file and a directory at one path")

    deb = dpkg_build(package_tree(tmp_path / "tree"), tmp_path / "k.deb")
    scratch = tmp_path / "umask"
    scratch.mkdir()
    old = os.umask(0o077)
    try:
        package = read_kernel_deb(deb, scratch)
    finally:
        os.umask(old)
    modes = {path.stat().st_mode & 0o777 for path in package.modules.rglob("*")}
    assert modes == {0o755, 0o644}
    assert (package.modules / "modules.dep").stat().st_mode & 0o777 == 0o644
