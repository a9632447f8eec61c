"""No root needed: a user with no privileges (uid/gid 65534, no supplementary groups, a fresh HOME) converts an
image to a disk, boots it and turns the disk back into an image. The judges are the fixture's known output and
skopeo, not imgconv."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fixtures import BuiltFixture, busybox
from tests.cli import IMGCONV, Ran, imgconv

pytestmark = [pytest.mark.appliance, pytest.mark.boot]

NOBODY = 65534


def as_nobody(*args: str, home: Path, timeout: float = 900) -> Ran:
    """`imgconv ARGS` as uid/gid 65534 with no groups and only this environment."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "TMPDIR": str(home / "tmp"),
           "LANG": "C.UTF-8"}
    return imgconv(*args, prefix=["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"],
                   env=env, inherit_env=False, timeout=timeout)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("dropping to an unprivileged user takes root (the conversions themselves do not)")
    root = Path("/tmp") / f"imgconv-unprivileged-{os.getpid()}"
    root.mkdir(mode=0o755)
    for sub in ("home", "home/tmp", "out"):
        (root / sub).mkdir()
    os.chown(root / "home", NOBODY, NOBODY)
    os.chown(root / "home/tmp", NOBODY, NOBODY)
    os.chown(root / "out", NOBODY, NOBODY)
    probe = as_nobody("--version", home=root / "home")
    if probe.code != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"uid {NOBODY} cannot run this checkout's imgconv ({IMGCONV}): {probe.stderr[-300:]}")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_convert_boot_and_back_without_privileges(workdir: Path,
                                                  built_fixture: Callable[[str], BuiltFixture]) -> None:
    home, out = workdir / "home", workdir / "out"
    layout = workdir / "image"
    shutil.copytree(built_fixture("busybox").oci_dir, layout)  # the cache under /root is not nobody's to read
    disk = out / "busybox.qcow2"

    made = as_nobody("oci-to-qcow2", "--quiet", f"oci:{layout}:1", str(disk), home=home)
    assert made.code == 0, made.stderr
    assert (disk.stat().st_uid, disk.stat().st_mode & 0o777) == (NOBODY, 0o444)

    booted = as_nobody("boot", "--timeout", "240", str(disk), home=home)
    assert (booted.stdout_bytes.decode(), booted.code) == (busybox.EXPECTED_STDOUT, 0), booted.stderr

    back = out / "back"
    exported = as_nobody("vm-to-oci", "--quiet", str(disk), f"oci:{back}:1", home=home)
    assert exported.code == 0, exported.stderr
    config = json.loads(subprocess.run(["skopeo", "inspect", "--config", f"oci:{back}:1"], capture_output=True,
                                       check=True, timeout=120).stdout)
    assert config["config"]["Entrypoint"] == built_fixture("busybox").config["config"]["Entrypoint"]
    # nothing was written as root: every file the run made belongs to the unprivileged user
    assert {p.stat().st_uid for p in out.rglob("*")} == {NOBODY}
