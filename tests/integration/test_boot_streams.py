"""`imgconv boot`'s stdio judged by `docker run` of the same image on the test world's dockerd: stdout and stderr
reach the host apart and byte-exact (not through the serial console's line discipline); `-i` forwards stdin byte
for byte and its end; `-t` gives the workload a terminal; `-it` on a real terminal (a pty made here) follows the
terminal's size and delivers Ctrl-C to the workload, as a terminal does.
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from fixtures.dockerd import DOCKER
from tests.cli import IMGCONV, Ran, assert_one_line_error, environment, imgconv
from tests.world import DockerWorld, FixtureImage

pytestmark = [pytest.mark.boot, pytest.mark.appliance]

SH = ["--entrypoint", "/bin/sh"]
# Bytes a line discipline would change (\n -> \r\n, a lone \r, NUL, DEL, ^C, ^D), high bytes, no final newline.
AWKWARD = r"printf 'a\nb\r\nc\0d\177e\003f\004g\377'"


def docker_run(world: DockerWorld, image: FixtureImage, flags: Sequence[str], args: Sequence[str],
               stdin: bytes | None = None) -> Ran:
    argv = [DOCKER, "run", "--rm", "--network", "none", *flags, image.repo_tag, *args]
    proc = subprocess.run(argv, env=world.env, capture_output=True, input=stdin,
                          stdin=subprocess.DEVNULL if stdin is None else None, timeout=180, check=False)
    return Ran(tuple(argv), proc.returncode, proc.stdout, proc.stderr)


def boot(disk: Path, flags: Sequence[str], args: Sequence[str], stdin: bytes | None = None) -> Ran:
    return imgconv("boot", "--timeout", "240", "--network", "none", *flags, str(disk), *args, input=stdin,
                   timeout=300)


def judge(world: DockerWorld, image: FixtureImage, disk: Path, flags: Sequence[str], args: Sequence[str],
          stdin: bytes | None = None) -> Ran:
    """The same stdout bytes, stderr bytes and exit code as `docker run`; returns imgconv's run."""
    docker = docker_run(world, image, flags, args, stdin)
    booted = boot(disk, flags, args, stdin)
    assert booted.stdout_bytes == docker.stdout_bytes, (booted.stdout_bytes[-300:], docker.stdout_bytes[-300:])
    assert booted.stderr_bytes == docker.stderr_bytes, (booted.stderr_bytes[-300:], docker.stderr_bytes[-300:])
    assert booted.code == docker.code
    return booted


def test_stdout_and_stderr_apart_and_byte_exact(converted_disk: Callable[[str], Path], docker_world: DockerWorld,
                                                fixture_image: Callable[[str], FixtureImage]) -> None:
    script = f"{AWKWARD}; {AWKWARD} >&2; echo; echo to-err >&2; printf end; printf err-end >&2; exit 3"
    ran = judge(docker_world, fixture_image("busybox"), converted_disk("busybox"), SH, ["-c", script])
    assert ran.code == 3 and ran.stdout_bytes.startswith(b"a\nb\r\nc\0d\x7fe\x03f\x04g\xff")


def test_interactive_stdin_is_byte_exact_and_its_end_arrives(
        converted_disk: Callable[[str], Path], docker_world: DockerWorld,
        fixture_image: Callable[[str], FixtureImage]) -> None:
    """The script reads one line with the shell (byte by byte), then `cat`s the rest: 300 KB of every byte value,
    and `cat` ends, so the end of stdin reached it. Without -i stdin is empty (/dev/null), as Docker's."""
    data = b"first line\n" + bytes(range(256)) * 1200
    script = 'read -r line; echo "line=[$line]" >&2; cat; echo "cat ended $?" >&2'
    ran = judge(docker_world, fixture_image("busybox"), converted_disk("busybox"), [*SH, "-i"], ["-c", script], data)
    assert ran.stdout_bytes == data[len(b"first line\n"):] and b"cat ended 0" in ran.stderr_bytes
    judge(docker_world, fixture_image("busybox"), converted_disk("busybox"), SH,
          ["-c", "wc -c; read x || echo eof"], b"ignored without -i")


def test_tty_gives_a_terminal(converted_disk: Callable[[str], Path], docker_world: DockerWorld,
                              fixture_image: Callable[[str], FixtureImage]) -> None:
    """`-t` without a terminal on our side: the workload still has one (stdin, stdout and stderr; TERM=xterm);
    output then comes through it, \\r\\n and all, as from Docker."""
    script = 'test -t 0 && test -t 1 && test -t 2 && echo all-terminals; echo "TERM=$TERM"; echo err >&2; exit 4'
    ran = judge(docker_world, fixture_image("busybox"), converted_disk("busybox"), [*SH, "-t"], ["-c", script])
    assert ran.stdout_bytes == b"all-terminals\r\nTERM=xterm\r\nerr\r\n"


def test_interactive_tty_needs_a_terminal(converted_disk: Callable[[str], Path]) -> None:
    ran = imgconv("boot", "-i", "-t", str(converted_disk("busybox")), input=b"")
    assert_one_line_error(ran, "the input device is not a TTY")


def _read_until(fd: int, needle: bytes, deadline: float, seen: bytearray) -> bytes:
    while needle not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{needle!r} did not appear; got {bytes(seen[-500:])!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the other side closed
                chunk = b""
            assert chunk, f"the terminal closed before {needle!r}; got {bytes(seen[-500:])!r}"
            seen += chunk
    return bytes(seen)


def test_interactive_terminal_follows_its_size_and_takes_ctrl_c(converted_disk: Callable[[str], Path]) -> None:
    """`-it` on a real terminal (a pty): the guest's terminal has its size, follows a resize (SIGWINCH), and
    Ctrl-C typed on it is the guest terminal's interrupt character, so the workload's trap runs; the host terminal
    is restored afterwards."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
    before = termios.tcgetattr(slave)
    script = ('stty size; trap "echo got-INT; stty size; exit 9" INT; echo ready; '
              'while :; do sleep 0.2; done')
    proc = subprocess.Popen([str(IMGCONV), "boot", "-it", "--network", "none", "--timeout", "240", *SH,
                             str(converted_disk("busybox")), "-c", script],
                            stdin=slave, stdout=slave, stderr=slave, env=environment(), start_new_session=True)
    seen = bytearray()
    try:
        deadline = time.monotonic() + 200
        _read_until(master, b"ready", deadline, seen)
        assert b"33 101" in seen
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        os.killpg(proc.pid, 0)  # still there
        proc.send_signal(signal.SIGWINCH)  # as the terminal sends it to its foreground process group
        time.sleep(1.0)  # the size goes over with the supervisor's next tick
        os.write(master, b"\x03")
        _read_until(master, b"got-INT", deadline, seen)
        _read_until(master, b"40 120", deadline, seen)
        assert proc.wait(timeout=60) == 9
        assert termios.tcgetattr(slave) == before
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
        os.close(slave)
