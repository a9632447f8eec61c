"""`imgconv boot [OPTIONS] DISK [COMMAND...]` judged by `docker run` of the same image with the same flags on the
test world's dockerd: arguments after DISK, --entrypoint, -e (KEY alone from the host), --env-file, -w, -u,
--hostname give the same stdout and exit code; --state keeps writes only with the same state file, refuses another
disk's, and the disk is never written. One converted disk per image for the session (conftest.converted_disk).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from converter.boot.network import Network
from converter.boot.qemu import BootResult
from converter.boot.qemu import boot as qemu_boot
from converter.boot.runspec import RunOverrides
from fixtures.dockerd import DOCKER
from tests.cli import Ran, assert_one_line_error, imgconv, start
from tests.integration.test_guest_init import ROOT_UUID, Guest, guest  # noqa: F401  (the init's test disk)
from tests.world import DockerWorld, FixtureImage

pytestmark = [pytest.mark.boot, pytest.mark.appliance]

HOST_ENV = {"FROM_HOST": "host value with $ and 'quotes'"}


def docker_run(world: DockerWorld, image: FixtureImage, flags: Sequence[str], args: Sequence[str] = ()) -> Ran:
    """`docker run --rm --network none --hostname imgconv FLAGS IMAGE ARGS` (a later --hostname wins), with
    HOST_ENV in the docker CLI's environment, as in imgconv's."""
    argv = [DOCKER, "run", "--rm", "--network", "none", "--hostname", "imgconv", *flags, image.repo_tag, *args]
    proc = subprocess.run(argv, env={**world.env, **HOST_ENV}, capture_output=True, stdin=subprocess.DEVNULL,
                          timeout=180, check=False)
    return Ran(tuple(argv), proc.returncode, proc.stdout, proc.stderr)


def boot(disk: Path, flags: Sequence[str], args: Sequence[str] = ()) -> Ran:
    return imgconv("boot", "--timeout", "240", "--network", "none", *flags, str(disk), *args,
                   env={**os.environ, **HOST_ENV}, inherit_env=False, timeout=300)


def judge(world: DockerWorld, image: FixtureImage, disk: Path, flags: Sequence[str], args: Sequence[str] = ()) -> None:
    docker = docker_run(world, image, flags, args)
    assert docker.code not in (125, 126, 127) or not docker.stderr.startswith("docker:"), docker.stderr
    booted = boot(disk, flags, args)
    assert booted.stdout == docker.stdout, (
        f"imgconv boot printed:\n{booted.stdout}\ndocker run printed:\n{docker.stdout}\nstderr: {booted.stderr}")
    assert booted.code == docker.code, booted.stderr


def test_arguments_env_env_file_and_hostname(converted_disk: Callable[[str], Path], docker_world: DockerWorld,
                                             fixture_image: Callable[[str], FixtureImage], tmp_path: Path) -> None:
    """tricky prints its argv, `env | sort` and `id`: arguments replace Cmd (the Entrypoint stays), -e replaces
    the image's entries of the same key, KEY alone takes the host's value or, without one, unsets the image's
    (DOLLAR),
    env files come before -e, --hostname changes HOSTNAME."""
    env_file = tmp_path / "env"
    env_file.write_text("# a comment\n\nFROM_FILE=file value\nFROM_HOST\nEMPTY=from file\n  SPACED=  kept  \n")
    image_key = next(e.split("=", 1)[0] for e in fixture_image("tricky").config["config"]["Env"]
                     if not e.startswith(("PATH=", "HOSTNAME=")))
    flags = ["-e", f"{image_key}=replaced", "-e", "NEW=a b", "--env", "FROM_HOST", "-e", "NOT_ON_HOST", "-e", "DOLLAR",
             "--env-file", str(env_file), "-e", "EMPTY=from flag", "--hostname", "other-host"]
    judge(docker_world, fixture_image("tricky"), converted_disk("tricky"), flags, ["x y", "$(id)", "-e", ""])


def test_entrypoint_workdir_and_user(converted_disk: Callable[[str], Path], docker_world: DockerWorld,
                                     fixture_image: Callable[[str], FixtureImage]) -> None:
    """Options after DISK go to the guest; -w creates a missing directory; -u with a group gives that group."""
    script = 'printf "[%s]\\n" "$0" "$@"; pwd; id; echo "HOME=$HOME"; exit 7'
    judge(docker_world, fixture_image("tricky"), converted_disk("tricky"),
          ["--entrypoint", "/bin/sh", "-w", "/new/work dir", "-u", "1000:0"], ["-c", script, "zero", "a b", "-v"])


def test_entrypoint_alone_drops_the_image_cmd(converted_disk: Callable[[str], Path], docker_world: DockerWorld,
                                              fixture_image: Callable[[str], FixtureImage]) -> None:
    judge(docker_world, fixture_image("tricky"), converted_disk("tricky"), ["--entrypoint", "/bin/echo"])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_state_keeps_writes_only_in_its_own_file(converted_disk: Callable[[str], Path], tmp_path: Path) -> None:
    disk, other = converted_disk("busybox"), converted_disk("tricky")
    before = _sha256(disk)
    state, fresh = tmp_path / "state.qcow2", tmp_path / "fresh.qcow2"
    script = ["-c", "cat /etc/kept 2>/dev/null || echo none; echo kept-$0 > /etc/kept", "one"]

    first = boot(disk, ["--entrypoint", "/bin/sh", "--state", str(state)], script)
    assert (first.code, first.stdout) == (0, "none\n"), first.stderr
    script[2] = "two"
    again = boot(disk, ["--entrypoint", "/bin/sh", "--state", str(state)], script)
    assert (again.code, again.stdout) == (0, "kept-one\n"), again.stderr
    elsewhere = boot(disk, ["--entrypoint", "/bin/sh", "--state", str(fresh)], script)
    assert (elsewhere.code, elsewhere.stdout) == (0, "none\n"), elsewhere.stderr
    assert _sha256(disk) == before
    copy = tmp_path / "copy.qcow2"  # the same bytes elsewhere are the same disk (its sha256 is checked)
    shutil.copyfile(disk, copy)
    copied = boot(copy, ["--entrypoint", "/bin/sh", "--state", str(state)], script)
    assert (copied.code, copied.stdout) == (0, "kept-two\n"), copied.stderr

    refused = boot(other, ["--state", str(state)])
    assert_one_line_error(refused, str(state), "belongs to another disk")
    (tmp_path / "plain.qcow2").write_bytes(fresh.read_bytes())
    not_ours = boot(disk, ["--state", str(tmp_path / "plain.qcow2")])
    assert_one_line_error(not_ours, "was not made by imgconv boot")
    assert _sha256(disk) == before


def test_a_disk_made_before_the_image_keys_still_takes_overrides(guest: Guest) -> None:  # noqa: F811
    """test_guest_init's disk has specs without the image's Entrypoint/Cmd/Env (as older imgconv wrote them):
    --entrypoint, -e, -w, -u and --hostname still apply; arguments without --entrypoint are refused by the init
    in one line, since it cannot know the Entrypoint they follow."""
    def run(overrides: RunOverrides) -> tuple[BootResult, bytes]:
        out, err = io.BytesIO(), io.StringIO()
        append = f"console=ttyS0 root=UUID={ROOT_UUID} imgconv.spec=/.imgconv/specs/bob quiet panic=-1 no_timer_check"
        result = qemu_boot(guest.disk, timeout=90, verbose=False, stdout=out, stderr=err, overrides=overrides,
                           direct_kernel=(guest.kernel, guest.initrd, append), network=Network(mode="none"))
        return result, out.getvalue()

    script = 'echo "$HOSTNAME $HOME $A"; pwd; id -u; hostname; env | grep -c HOSTNAME'
    result, out = run(RunOverrides(cmd=("-c", script), entrypoint="sh", env=("A=1", "HOME=/h"), cwd="/tmp/w",
                                   user="0", hostname="newname"))
    assert (result.status, out) == (0, b"newname /h 1\n/tmp/w\n0\nnewname\n1\n"), result.message
    result, out = run(RunOverrides(cmd=("-c", "echo no")))
    assert result.status == 125 and out == b""
    assert "older imgconv" in result.message and "--entrypoint" in result.message


def test_stop_timeout_powers_off_a_workload_that_ignores_sigterm(converted_disk: Callable[[str], Path]) -> None:
    """The shell is PID 1 of its namespace with no TERM trap: SIGTERM does nothing, as under `docker stop`; the
    VM is powered off --stop-timeout seconds after SIGINT (exit 137, as docker's SIGKILL), not after 10 s."""
    proc = start("boot", "--network", "none", "--stop-timeout", "1", "--entrypoint", "/bin/sh",
                 str(converted_disk("busybox")), "-c", "echo ready; while :; do sleep 0.1; done")
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        asked = time.monotonic()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
        took = time.monotonic() - asked
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert code in (130, 137)
    assert took < 6, f"stopped {took:.1f} s after SIGINT; --stop-timeout 1"


def _descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            with contextlib.suppress(OSError):
                for child in (task / "children").read_text().split():
                    found.add(int(child))
                    todo.append(int(child))
    return found


def test_no_qemu_outlives_a_killed_imgconv(converted_disk: Callable[[str], Path]) -> None:
    """SIGKILL leaves imgconv no chance to clean up: qemu (started with a parent-death signal) goes with it."""
    proc = start("boot", "--network", "none", "--entrypoint", "/bin/sh", str(converted_disk("busybox")),
                 "-c", "echo ready; while :; do sleep 0.1; done")
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        children = _descendants(proc.pid)
        assert any(Path(f"/proc/{pid}/exe").resolve().name.startswith("qemu") for pid in children), children
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while (alive := {pid for pid in children if Path(f"/proc/{pid}").exists()}) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive, f"still running after imgconv was killed: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
