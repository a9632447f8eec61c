"""`imgconv boot -v HOSTDIR:GUESTDIR[:ro|:rw]` judged by `docker run -v` of the same image on the test world's
dockerd: the same output and exit code, and the same files with the same owners left in the host directories.
Three boots: one judged by docker (two volumes, one read-only inside the other, -w inside a volume that creates
it, a relative HOSTDIR, a user), one docker cannot judge (the guest's root remounts the read-only volume
read-write and still cannot write: read-only is enforced on the host), and one whose initramfs lacks virtiofs
(refused by the init before the workload). A missing HOSTDIR is refused before qemu starts.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from converter.boot import initramfs
from converter.boot.initbin import init_binary
from converter.boot.network import NO_NETWORK
from converter.boot.qemu import boot as qemu_boot
from converter.boot.volumes import parse_volumes
from tests.cli import Ran, assert_one_line_error
from tests.integration.test_boot_run import boot, docker_run
from tests.integration.test_guest_init import ROOT_UUID, Guest, _host_kernel, guest  # noqa: F401  (the init's disk)
from tests.world import DockerWorld, FixtureImage

pytestmark = [pytest.mark.boot, pytest.mark.appliance, pytest.mark.skipif(
    os.geteuid() != 0, reason="-v needs root (qemu's virtiofsd runs only as root)")]

# Run from inside the read-write volume: -w is there (and created), the read-only one is inside it. Everything
# the shell says, errors included, goes to stdout so that docker's and ours compare as one stream.
SCRIPT = """exec 2>&1
pwd
id
ls -nd . | cut -c1-30
echo written-by-guest > /data/new.txt
mkdir -p /data/made/deeper && echo x > /data/made/deeper/f
ls -n /data/ro | sed 's/ [A-Z][a-z][a-z] .*:[0-9][0-9] / DATE /'
cat /data/ro/inside
echo no > /data/ro/refused; echo "write in ro: $?"
mkdir /data/ro/dir; echo "mkdir in ro: $?"
rm /data/ro/inside; echo "rm in ro: $?"
exit 3
"""


def _tree(root: Path) -> dict[str, tuple[int, int, int, bytes]]:
    """Every path under *root* with its owner, group, mode and (for files) content."""
    found = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        data = path.read_bytes() if path.is_file() else b""
        found[str(path.relative_to(root))] = (st.st_uid, st.st_gid, st.st_mode, data)
    return found


def _host_dirs(base: Path) -> Path:
    """A fresh pair of host directories: rw/ (writable by anyone, as the user's home would be for them) and ro/."""
    (base / "rw").mkdir(parents=True)
    (base / "rw").chmod(0o777)
    (base / "ro").mkdir()
    (base / "ro" / "inside").write_text("from the host\n")
    return base


def test_volumes_as_docker_run(converted_disk: Callable[[str], Path], docker_world: DockerWorld,
                               fixture_image: Callable[[str], FixtureImage], tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    ours, theirs = _host_dirs(tmp_path / "ours"), _host_dirs(tmp_path / "docker")
    flags = ["-u", "1234:2345", "-w", "/data/work", "--entrypoint", "/bin/sh"]

    # The child is given first (parents are mounted first). Ours is relative, from the current directory, as the
    # docker CLI takes one since 23.0; the test world's docker (Debian 12's 20.10) wants absolute paths.
    docker = docker_run(docker_world, fixture_image("busybox"),
                        [*flags, "-v", f"{theirs}/ro:/data/ro:ro", "-v", f"{theirs}/rw:/data"], ["-c", SCRIPT])
    assert docker.code == 3, docker.describe()
    monkeypatch.chdir(ours)
    booted = boot(converted_disk("busybox"), [*flags, "-v", "./ro:/data/ro:ro", "-v", "./rw/../rw:/data"],
                  ["-c", SCRIPT])
    assert booted.stdout.splitlines() == docker.stdout.splitlines(), booted.describe()
    assert booted.code == docker.code
    assert "Read-only file system" in booted.stdout
    assert _tree(ours) == _tree(theirs)
    assert (ours / "rw" / "new.txt").stat().st_uid == 1234 and (ours / "rw" / "new.txt").stat().st_gid == 2345


def test_read_only_holds_against_the_guests_root(converted_disk: Callable[[str], Path], tmp_path: Path) -> None:
    """The guest's root lifts its own read-only mount (`mount -o remount,rw` succeeds) and still cannot write:
    the host serves the volume from a read-only bind mount. A missing HOSTDIR is refused before qemu starts."""
    base = _host_dirs(tmp_path)
    script = ("mount -o remount,rw /ro && echo remounted; grep ' /ro ' /proc/mounts | cut -d' ' -f3,4 | cut -c1-11; "
              "echo no > /ro/refused 2>&1 || echo refused; touch /rw/ok && echo written")
    ran: Ran = boot(converted_disk("busybox"), ["--entrypoint", "/bin/sh", "-v", f"{base}/ro:/ro:ro",
                                                "-v", f"{base}/rw:/rw"], ["-c", script])
    assert (ran.code, ran.stdout) == (0, "remounted\nvirtiofs rw\nrefused\nwritten\n"), ran.describe()
    assert "Read-only file system" in ran.stderr
    assert sorted(p.name for p in base.rglob("*")) == ["inside", "ok", "ro", "rw"]

    missing = boot(converted_disk("busybox"), ["-v", f"{base}/nope:/x"])
    assert_one_line_error(missing, f"{base}/nope does not exist")


def test_a_kernel_without_virtiofs_stops_the_init_before_the_workload(
        guest: Guest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """An initramfs without virtiofs (a kernel that lacks it): the init refuses -v in one line, the workload never
    runs without its volume."""
    monkeypatch.setattr(initramfs, "BOOT_MODULES", tuple(m for m in initramfs.BOOT_MODULES if m != "virtiofs"))
    _kernel, release = _host_kernel()
    initrd = tmp_path / "initramfs.img"
    initrd.write_bytes(initramfs.build_initramfs(release, Path("/lib/modules") / release, init_binary()))
    out, err = io.BytesIO(), io.StringIO()
    append = f"console=ttyS0 root=UUID={ROOT_UUID} imgconv.spec=/.imgconv/specs/basics quiet panic=-1 no_timer_check"
    result = qemu_boot(guest.disk, timeout=90, verbose=False, stdout=out, stderr=err, network=NO_NETWORK,
                       direct_kernel=(guest.kernel, initrd, append), volumes=parse_volumes([f"{tmp_path}:/v"]))
    assert (result.status, out.getvalue()) == (125, b""), result.message
    assert result.message.startswith("the guest init failed before starting the workload: --volume needs the kernel's "
                                     "virtiofs filesystem")
