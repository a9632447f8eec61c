"""`oci-to-qcow2 --kernel linux-image-*.deb` end to end (issue 11 item 4): Debian's generic kernel package, as
`apt-get download` fetches it, turns the busybox fixture into a disk that boots and records that kernel.

The generic kernel has the virtio drivers and ext4 (with jbd2, mbcache, crc16, and crc32c for its checksums) as
modules, not built in as the cloud kernel has them, so the boot shows that imgconv's initramfs took what the root
needs from the package. The judge of what the package holds is dpkg-deb, not imgconv.

The package (about 70 MB) is downloaded once into the test cache (~/.cache/imgconv-tests/kernel-debs, under a
lock) and kept; its version is whatever linux-image-amd64 depends on today.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import re
import shutil
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fixtures import BuiltFixture, busybox, cache_root
from tests.cli import assert_one_line_error, imgconv

pytestmark = [pytest.mark.appliance, pytest.mark.boot]

META = "linux-image-amd64"  # Debian's generic kernel, whatever its current ABI


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def current_package() -> str:
    """linux-image-6.1.0-NN-amd64: what the metapackage depends on in this machine's apt lists."""
    if shutil.which("apt-cache") is None:
        pytest.skip("no apt-cache: not a Debian machine")
    out = subprocess.run(["apt-cache", "depends", META], capture_output=True, text=True, check=False).stdout
    found = re.search(r"Depends: (linux-image-[0-9][^\s]*-amd64)\b", out)
    if found is None:
        pytest.skip(f"apt knows no {META} (apt-get update?)")
    return found.group(1)


def kernel_package() -> Path:
    """The generic kernel's .deb, downloaded once into the test cache."""
    package = current_package()
    where = cache_root() / "kernel-debs"
    with _locked(cache_root() / "locks" / f"{package}.lock"):
        found = sorted(where.glob(f"{package}_*_amd64.deb"))
        if found:
            return found[-1]
        partial = where / f".download-{package}"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        subprocess.run(["apt-get", "download", "-q", package], cwd=partial, check=True, capture_output=True,
                       timeout=900)
        (deb,) = partial.glob(f"{package}_*_amd64.deb")
        deb.rename(where / deb.name)
        shutil.rmtree(partial)
        return where / deb.name


def judged(deb: Path, tmp: Path) -> tuple[str, bytes, set[str], set[str]]:
    """What dpkg-deb says the package holds: the release (from the vmlinuz name), the vmlinuz, the names in
    modules.builtin, and the module files of its tree (relative to it)."""
    tar = tmp / "data.tar"
    with tar.open("wb") as out:
        subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=out, check=True)
    with tarfile.open(tar) as archive:
        (kernel,) = [m for m in archive.getmembers() if re.fullmatch(r"\./boot/vmlinuz-[^/]+", m.name)]
        release = kernel.name.removeprefix("./boot/vmlinuz-")
        vmlinuz = archive.extractfile(kernel).read()  # type: ignore[union-attr]
        builtin = archive.extractfile(f"./lib/modules/{release}/modules.builtin").read().decode()  # type: ignore[union-attr]
        tree = f"./lib/modules/{release}/"
        modules = {m.name.removeprefix(tree) for m in archive.getmembers()
                   if m.name.startswith(tree) and m.name.endswith(".ko")}
    tar.unlink()
    return release, vmlinuz, {line.rsplit("/", 1)[-1] for line in builtin.split()}, modules


def guest_modules(disk: Path, release: str) -> tuple[list[str], set[str], str]:
    """What libguestfs (not imgconv) finds in the disk: /lib/modules's entries, the module files of the tree,
    and its modules.dep."""
    import os

    import guestfs  # type: ignore[import-not-found]

    from converter.boot.accel import configure_guestfs  # the host's accelerator choice, nothing else

    os.environ.setdefault("LIBGUESTFS_BACKEND", "direct")
    g = guestfs.GuestFS(python_return_dict=True)
    try:
        configure_guestfs(g)
        g.set_network(False)
        g.add_drive_opts(str(disk), readonly=1, format="qcow2")
        g.launch()
        g.mount_ro("/dev/sda1", "/")
        tree = f"/lib/modules/{release}"
        found = {name.lstrip("/") for name in g.find(tree) if name.endswith(".ko")}  # find says /kernel/...
        return sorted(g.ls("/lib/modules")), found, g.cat(f"{tree}/modules.dep")
    finally:
        g.close()


def test_a_disk_made_with_debians_generic_kernel_package_boots_and_records_it(
        built_fixture: Callable[[str], BuiltFixture], tmp_path: Path) -> None:
    deb = kernel_package()
    release, vmlinuz, builtin, modules = judged(deb, tmp_path)
    # what makes this test mean something: the root filesystem's drivers are modules in this kernel
    assert not {"ext4.ko", "jbd2.ko", "virtio_blk.ko", "crc32c_generic.ko"} & builtin

    image = built_fixture("busybox")
    out = tmp_path / "generic.qcow2"
    made = imgconv("oci-to-qcow2", "--kernel", str(deb), "--kernel-modules", f"oci:{image.oci_dir}:{image.tag}",
                   str(out), timeout=900)
    assert made.code == 0, made.describe()
    assert f"kernel {release} (from the package: {deb})" in made.stderr
    assert "kernel modules: placed in the guest" in made.stderr
    # the tree placed in the guest is the package's, indexed as its postinst's depmod would have
    listed, found, dep = guest_modules(out, release)
    assert listed == [release] and found == modules
    assert "kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko" in dep

    sidecar = json.loads(Path(f"{out}.json").read_text())
    assert sidecar["kernel"] == {"release": release, "origin": "package",
                                 "package_sha256": "sha256:" + hashlib.sha256(deb.read_bytes()).hexdigest()}
    assert sidecar["boot"]["kernel"] == f"/.imgconv/boot/vmlinuz-{release}"
    assert sidecar["boot"]["kernel_sha256"] == "sha256:" + hashlib.sha256(vmlinuz).hexdigest()
    statement = json.loads(Path(f"{out}.intoto.json").read_text())  # the package is a dependency, by its digest
    deps = {d["name"]: d for d in statement["predicate"]["buildDefinition"]["resolvedDependencies"]}
    assert deps["kernel-package"]["digest"] == {"sha256": hashlib.sha256(deb.read_bytes()).hexdigest()}
    assert deps["kernel-package"]["annotations"] == {"release": release, "file": str(deb)}
    assert deps["kernel"]["digest"] == {"sha256": hashlib.sha256(vmlinuz).hexdigest()}

    booted = imgconv("boot", "--timeout", "300", str(out), timeout=400)
    assert (booted.stdout_bytes, booted.code) == (busybox.EXPECTED_STDOUT.encode(), 0), booted.stderr[-3000:]


def test_a_file_that_is_no_kernel_package_is_a_usage_error(built_fixture: Callable[[str], BuiltFixture],
                                                             tmp_path: Path) -> None:
    image = built_fixture("busybox")
    fake = tmp_path / "linux-image-9.9.9-1-amd64_9.9.9-1_amd64.deb"
    fake.write_text("not an ar archive\n")
    ran = imgconv("oci-to-qcow2", "--kernel", str(fake), f"oci:{image.oci_dir}:{image.tag}",
                  str(tmp_path / "out.qcow2"))
    assert_one_line_error(ran, "is not a Debian package")
    assert not (tmp_path / "out.qcow2").exists()
