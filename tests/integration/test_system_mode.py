"""System mode (`oci-to-qcow2 --init auto|system`): a Debian system image (systemd, udev, dbus, sshd; CMD
/lib/systemd/systemd) boots its own init. Judged from outside, as a user would: SSH in through `-p` with a key given
to `imgconv boot --ssh-key`, `systemctl is-system-running`, `systemctl poweroff` ends `imgconv boot` with 0; a
service-style command runs as a unit with its output on the console, and SIGINT powers the system off; vm-to-oci
gives back an image whose command is the init (checked with skopeo). One boot per disk: every check on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures import BuiltFixture
from tests.cli import imgconv, start
from tests.world import World

pytestmark = [pytest.mark.boot, pytest.mark.appliance]

SSH_OPTIONS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
               "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR"]
SERVICE = ['echo "service says $((6*7)) \\"quoted\\" 100% $HOSTNAME"; exec sleep infinity']


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def system_image(world: World) -> BuiltFixture:
    return world.built("system")


@pytest.fixture(scope="module")
def system_disk(system_image: BuiltFixture, tmp_path_factory: pytest.TempPathFactory) -> Path:
    disk = tmp_path_factory.mktemp("system") / "system.qcow2"
    ran = imgconv("oci-to-qcow2", f"oci:{system_image.oci_dir}:{system_image.tag}", str(disk), timeout=900).ok()
    assert "init: system" in ran.stderr, "auto chose system mode for an image whose command is systemd, and said so"
    return disk


def _ssh(key: Path, port: int, command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ssh", *SSH_OPTIONS, "-i", str(key), "-p", str(port), "root@127.0.0.1", command],
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture
def ssh_key(tmp_path: Path) -> Path:
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


@pytest.fixture
def booting() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_ssh_in_with_a_key_given_at_boot_then_poweroff(system_disk: Path, ssh_key: Path, tmp_path: Path,
                                                       booting: list[subprocess.Popen[bytes]]) -> None:
    before = _sha256(system_disk)
    port = _free_port()
    proc = start("boot", "--ssh-key", f"{ssh_key}.pub", "-p", f"127.0.0.1:{port}:22", "--timeout", "600",
                 str(system_disk))
    booting.append(proc)
    deadline = time.monotonic() + 300
    while True:
        probe = _ssh(ssh_key, port, "true", timeout=30)
        if probe.returncode == 0:
            break
        assert proc.poll() is None, f"imgconv boot ended ({proc.returncode}) before SSH answered"
        assert time.monotonic() < deadline, f"no SSH login within 300 s: {probe.stderr}"
        time.sleep(2)
    state = _ssh(ssh_key, port, "systemctl is-system-running --wait; cat /proc/1/comm; hostname; "
                                "systemctl --failed --no-legend --plain", timeout=300)
    lines = state.stdout.splitlines()
    assert lines[:3] == ["running", "systemd", "imgconv"], state.stdout + state.stderr
    _ssh(ssh_key, port, "systemctl poweroff")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    assert b"login:" in out, "the console (a getty on ttyS0) is imgconv boot's output"
    assert _sha256(system_disk) == before, "the key went to the run's layer, never into the disk"

    # The disk back to an image: the command is the init again (skopeo reads the config, not imgconv).
    layout = tmp_path / "back"
    imgconv("vm-to-oci", str(system_disk), f"oci:{layout}:1", timeout=900).ok()
    config = json.loads(subprocess.run(["skopeo", "inspect", "--config", f"oci:{layout}:1"], capture_output=True,
                                       check=True).stdout)
    assert config["config"]["Cmd"] == ["/lib/systemd/systemd"]


def test_a_service_style_command_runs_as_a_unit_and_sigint_powers_off(
        system_image: BuiltFixture, tmp_path: Path, booting: list[subprocess.Popen[bytes]]) -> None:
    """The image with a service's command instead of the init, converted with --init system: the command runs as a
    unit under systemd (its quotes, $ and % kept: nothing is expanded twice), its output on the console; SIGINT
    presses the power button and the system shuts down within the stop timeout."""
    layout = tmp_path / "svc"
    shutil.copytree(system_image.oci_dir, layout, copy_function=os.link)
    for name in ("index.json", "oci-layout"):  # rewritten by umoci: real copies, not links into the cache
        (layout / name).unlink()
        shutil.copyfile(system_image.oci_dir / name, layout / name)
    subprocess.run(["umoci", "config", "--image", f"{layout}:{system_image.tag}", "--tag", "svc",
                    "--config.entrypoint", "/bin/sh", "--config.entrypoint", "-c",
                    *[arg for part in SERVICE for arg in ("--config.cmd", part)]], check=True, capture_output=True)
    disk = tmp_path / "svc.qcow2"
    imgconv("oci-to-qcow2", "--init", "system", f"oci:{layout}:svc", str(disk), timeout=900).ok()

    proc = start("boot", "--network", "none", "--stop-timeout", "60", "--timeout", "600", str(disk))
    booting.append(proc)
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + 300
    while b"service says" not in seen or not seen.endswith(b"\n"):
        assert time.monotonic() < deadline, seen[-2000:]
        if not select.select([proc.stdout], [], [], 5)[0]:
            continue
        chunk = proc.stdout.read1(65536)
        assert chunk, f"imgconv boot ended before the service's output: {seen[-2000:]!r}"
        seen += chunk
    assert b'\nservice says 42 "quoted" 100% imgconv\n' in b"\n" + seen, "its own bytes, no prefix"
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=90)
    assert proc.returncode == 130
    assert b"reboot: Power down" in seen + rest, "the guest shut down, not killed"
    assert b"the VM was asked to stop, then shut down" in err
