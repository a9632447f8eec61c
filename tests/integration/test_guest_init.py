"""The guest init, for real: one small test disk, booted under qemu with the real initramfs.

The disk (built once with libguestfs, cached by content hash) holds a static busybox, a passwd
and group with test users, an /etc/hosts of its own, the init at /.imgconv/init and several run
specs under /.imgconv/specs/; each test boots the host's kernel directly with ``imgconv.spec=``
naming its spec and checks what a user of ``imgconv boot`` would see. What docker itself does is
checked against the real dockerd with the fixture images (tests/integration/test_oci_to_qcow2.py);
the expectations here that are docker's were taken from it.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from converter.boot.accel import configure_guestfs
from converter.boot.cachedir import cache_dir
from converter.boot.initbin import init_binary
from converter.boot.initramfs import InitSpec, build_initramfs, docker_env, encode_spec
from converter.boot.qemu import BootResult, boot, host_resolv_conf

pytestmark = [pytest.mark.boot, pytest.mark.appliance]

ROOT_UUID = "5a1e0c0d-1234-4abc-8def-0123456789ab"
BUSYBOX = Path("/bin/busybox")
APPLETS = (
    "sh", "env", "id", "printf", "echo", "sleep", "cat", "ls", "pwd", "stat", "grep", "cut", "sort",
    "kill", "readlink", "hostname", "touch", "true", "tr", "mount",
)  # fmt: skip
HOSTNAME = "imgconv-test"

PASSWD = """root:x:0:0:root:/root:/bin/sh
alice:x:1000:1000:Alice:/home/alice:/bin/sh
bob:x:1001:1001::/home/bob:/bin/sh
"""
GROUP = """root:x:0:
tty:x:5:
wheel:x:10:root,alice
staff:x:50:alice,bob
alice:x:1000:
bob:x:1001:
"""
IMAGE_HOSTS = "10.1.2.3\tfrom-the-image\n"  # mode 0600; /etc/hostname and /etc/resolv.conf are missing
DOCKER_HOSTS = (
    b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\n"
    b"ff00::0\tip6-mcastprefix\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n"
)

HOSTILE_ARGS = (
    "a b",
    "'single'",
    '"double"',
    "$(echo injected)",
    "`echo injected`",
    "; echo injected",
    "& echo injected",
    "| cat",
    "line1\nline2",
    "",
    "*",
    "back\\slash %s %d",
    "tab\there",
    "\udcff\udcfe not utf-8",
    "ünïcødé",
)
IMAGE_ENV = (
    "FOO=bar baz",
    "QUOTED='q' \"dq\"",
    "EMPTY=",
    "SUBST=$(echo no);&",
    "MULTI=line1\nline2",
    "PATH=/usr/local/bin:/usr/bin:/bin",
    "FOO=override",
)
BASICS_SCRIPT = r"""printf '[%s]\n' "$0" "$@"
echo "cwd=$(pwd)"
stat -c 'mode=%a uid=%u gid=%g' .
echo "hostname=$(hostname)"
id
echo "umask=$(umask)"
cut -d' ' -f2,3 /proc/mounts | sort
for l in /dev/fd /dev/stdin /dev/stdout /dev/stderr /dev/ptmx; do readlink "$l"; done
stat -c '%n %a' /tmp /dev/shm
echo "lo=$(cat /sys/class/net/lo/flags)"
cat /proc/$$/environ
for f in hostname hosts resolv.conf; do stat -c '%n %a %u:%g' /etc/$f; cat /etc/$f; done
mount --bind / /mnt && stat -c '%n %a %s' /mnt/etc/hostname /mnt/etc/hosts /mnt/etc/resolv.conf && cat /mnt/etc/hosts
printf 'no newline at the end'
exit 3
"""
TRAP_SCRIPT = 'trap "echo got TERM; exit 0" TERM; echo ready; while :; do sleep 0.1; done'

SPECS = {
    "basics": InitSpec(
        argv=("sh", "-c", BASICS_SCRIPT, "argv0 $(x)", *HOSTILE_ARGS),
        env=docker_env(IMAGE_ENV, HOSTNAME),
        cwd="/work dir/not yet/there",
        hostname=HOSTNAME,
    ),
    "alice": InitSpec(
        argv=(
            "sh",
            "-c",
            'id; echo "HOME=$HOME"; echo "umask=$(umask)"; echo to-stdout > /dev/stdout; '
            'echo to-stderr > /dev/stderr; touch /tmp/f && stat -c "%U %G %a" /tmp/f; pwd',
        ),
        env=docker_env([], HOSTNAME),
        user="alice",
        cwd="/home/alice",
    ),
    "bob": InitSpec(
        argv=("sh", "-c", 'id; echo "HOME=$HOME"'),
        env=docker_env(["HOME=/custom"], HOSTNAME),
        user="1001:staff",
    ),
    "ghost": InitSpec(argv=("true",), env=docker_env([], HOSTNAME), user="ghost"),
    "notfound": InitSpec(argv=("no-such-command", "x"), env=docker_env([], HOSTNAME)),
    "noshell": InitSpec(argv=("printf", "%s|", "$(id)", "a;b", "*", "$HOME"), env=docker_env([], HOSTNAME)),
    "pid1": InitSpec(
        argv=(
            "sh",
            "-c",
            # As PID 1 of its namespace the shell ignores signals it has no handler for, even
            # SIGKILL from itself; a fault still kills it (the stack overflows): 128+11.
            'echo "pid=$$ ppid=$PPID"; kill -TERM $$; kill -KILL $$; echo survived; ulimit -s 1024; f() { f; }; f',
        ),
        env=docker_env([], HOSTNAME),
    ),
    "reap": InitSpec(
        argv=(
            "sh",
            "-c",
            # The inner shell exits at once: its sleep is orphaned to the workload (PID 1 of its
            # namespace), which reaps it as busybox sh does under docker.
            "sh -c 'sleep 0.2 &'; sleep 1.5; z=0; "
            'for s in /proc/[0-9]*/stat; do read -r l < "$s"; case "$l" in *") Z "*) z=$((z+1));; esac; done; '
            'echo "zombies=$z"; '
            # Left behind, holding stdout: the VM must still end as soon as the main process does.
            "sleep 1000 & (sleep 1000; echo never) & echo done",
        ),
        env=docker_env([], HOSTNAME),
    ),
    "trap": InitSpec(argv=("sh", "-c", TRAP_SCRIPT), env=docker_env([], HOSTNAME)),
    # No TERM trap: as PID 1 of its namespace the shell never sees the stop's SIGTERM.
    "untrapped": InitSpec(argv=("sh", "-c", "echo ready; while :; do sleep 0.1; done"), env=docker_env([], HOSTNAME)),
}


def _b(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


# ------------------------------------------------------------------------------------ fixtures --


@dataclass(frozen=True)
class Guest:
    disk: Path
    kernel: Path
    initrd: Path

    def boot(
        self,
        spec: str,
        *,
        timeout: float = 90,
        stop_on: bytes | None = None,
        stop_grace: float = 10.0,
        cmdline: str = "",
    ) -> tuple[BootResult, bytes, str, float]:
        """Boot with one spec (and more kernel *cmdline*): (result, workload output, stderr text, seconds)."""
        stop = threading.Event()
        out = _Watch(stop_on, stop)
        err = io.StringIO()
        append = (f"console=ttyS0 root=UUID={ROOT_UUID} imgconv.spec=/.imgconv/specs/{spec} quiet panic=-1 "
                  f"no_timer_check {cmdline}")
        started = time.monotonic()
        result = boot(
            self.disk,
            timeout=timeout,
            verbose=False,
            stdout=out,
            stderr=err,
            direct_kernel=(self.kernel, self.initrd, append),
            stop=stop if stop_on is not None else None,
            stop_grace=stop_grace,
        )
        return result, out.getvalue(), err.getvalue(), time.monotonic() - started


class _Watch(io.BytesIO):
    """Collects the workload's output; sets *event* once *needle* has appeared."""

    def __init__(self, needle: bytes | None, event: threading.Event) -> None:
        super().__init__()
        self._needle, self._event = needle, event

    def write(self, data: bytes) -> int:  # type: ignore[override]
        n = super().write(data)
        if self._needle is not None and self._needle in self.getvalue():
            self._event.set()
        return n


def _host_kernel() -> tuple[Path, str]:
    for vmlinuz in sorted(Path("/boot").glob("vmlinuz-*"), reverse=True):
        release = vmlinuz.name.removeprefix("vmlinuz-")
        if (Path("/lib/modules") / release / "modules.dep").is_file() and os.access(vmlinuz, os.R_OK):
            return vmlinuz, release
    pytest.skip("no readable kernel under /boot with its modules (Debian: linux-image-cloud-amd64)")


def _build_disk(path: Path, init: Path) -> None:
    import guestfs

    os.environ.setdefault("LIBGUESTFS_BACKEND", "direct")
    with open(path, "wb") as f:
        f.truncate(64 << 20)
    g = guestfs.GuestFS(python_return_dict=True)
    try:
        configure_guestfs(g)
        g.add_drive_opts(str(path), format="raw")
        g.launch()
        g.part_disk("/dev/sda", "mbr")
        g.mkfs("ext4", "/dev/sda1")
        g.set_uuid("/dev/sda1", ROOT_UUID)
        g.mount("/dev/sda1", "/")
        for directory in ("/bin", "/etc", "/mnt", "/root", "/home/alice", "/home/bob", "/.imgconv/specs"):
            g.mkdir_p(directory)
        g.chown(1000, 1000, "/home/alice")
        g.chown(1001, 1001, "/home/bob")
        g.upload(str(BUSYBOX), "/bin/busybox")
        g.chmod(0o755, "/bin/busybox")
        for applet in APPLETS:
            g.ln_s("busybox", f"/bin/{applet}")
        g.write("/etc/passwd", PASSWD)
        g.write("/etc/group", GROUP)
        g.write("/etc/hosts", IMAGE_HOSTS)
        g.chmod(0o600, "/etc/hosts")
        g.upload(str(init), "/.imgconv/init")
        g.chmod(0o755, "/.imgconv/init")
        for name, spec in SPECS.items():
            g.write(f"/.imgconv/specs/{name}", encode_spec(spec))
        g.shutdown()
    finally:
        g.close()


@pytest.fixture(scope="session")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    for tool in ("qemu-system-x86_64", "qemu-img"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if not BUSYBOX.is_file():
        pytest.skip("busybox-static is not installed")
    kernel, release = _host_kernel()
    init = init_binary()

    key = hashlib.sha256()
    for part in (init.read_bytes(), BUSYBOX.read_bytes(), PASSWD.encode(), GROUP.encode(), IMAGE_HOSTS.encode(),
                 ROOT_UUID.encode(), b"/mnt", b"hosts 0600"):
        key.update(hashlib.sha256(part).digest())
    for name, spec in sorted(SPECS.items()):
        key.update(name.encode() + b"\0" + encode_spec(spec))
    disks = cache_dir() / "test-disks"
    disks.mkdir(exist_ok=True)
    disk = disks / f"guest-init-{key.hexdigest()[:24]}.raw"
    if not disk.exists():
        partial = disks / f".{disk.name}.{os.getpid()}.tmp"
        try:
            _build_disk(partial, init)
            partial.chmod(0o444)
            partial.rename(disk)
        finally:
            partial.unlink(missing_ok=True)

    initrd = tmp_path_factory.mktemp("initrd") / "initramfs.img"
    initrd.write_bytes(build_initramfs(release, Path("/lib/modules") / release, init))
    yield Guest(disk, kernel, initrd)


Boot = tuple[BootResult, bytes, str, float]
# name: (spec, more kernel command line)
PLAIN = {
    **{name: (name, "") for name in ("basics", "alice", "bob", "ghost", "notfound", "noshell", "pid1", "reap")},
    "read-only": ("noshell", "ro"),  # the disk has no /proc, /sys, /dev: stage 2 cannot create them
    "no-stage2": ("noshell", "imgconv.init=/no/such/init"),
}


@pytest.fixture(scope="session")
def plain_boots(guest: Guest) -> dict[str, Boot]:
    """The specs that need no timing from the test, booted two at a time (qemu TCG uses one core)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(guest.boot, spec, cmdline=more) for name, (spec, more) in PLAIN.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.fixture
def booted(plain_boots: dict[str, Boot]) -> Callable[[str], Boot]:
    def get(name: str) -> Boot:
        result, output, err, seconds = plain_boots[name]
        print(f"{name}: {result} in {seconds:.1f}s\n{output!r}\n{err}", file=sys.stderr)
        return plain_boots[name]

    return get


# --------------------------------------------------------------------------------------- tests --


def test_argv_env_cwd_mounts_and_exit_code(booted: Callable[[str], Boot]) -> None:
    result, output, _, _ = booted("basics")
    assert result.status == 3
    assert result.workload_status == 3
    env = (*docker_env(IMAGE_ENV, HOSTNAME), "HOME=/root")
    assert env[:2] == ("PATH=/usr/local/bin:/usr/bin:/bin", f"HOSTNAME={HOSTNAME}")
    expected = b"".join(b"[%s]\n" % _b(arg) for arg in ("argv0 $(x)", *HOSTILE_ARGS))
    expected += (
        b"cwd=/work dir/not yet/there\n"
        b"mode=755 uid=0 gid=0\n"
        b"hostname=imgconv-test\n"
        b"uid=0(root) gid=0(root) groups=0(root),10(wheel)\n"
        b"umask=0022\n"
        b"/ ext4\n/dev devtmpfs\n/dev/pts devpts\n/dev/shm tmpfs\n"
        b"/etc/hostname tmpfs\n/etc/hosts tmpfs\n/etc/resolv.conf tmpfs\n"  # docker's generated files
        b"/proc proc\n/run tmpfs\n/sys sysfs\n/sys/fs/cgroup cgroup2\n/tmp tmpfs\n"
        b"/proc/self/fd\n/proc/self/fd/0\n/proc/self/fd/1\n/proc/self/fd/2\npts/ptmx\n"
        b"/tmp 1777\n/dev/shm 1777\n"
    )
    assert output.startswith(expected)
    rest = output[len(expected) :]
    lo, _, rest = rest.partition(b"\n")
    assert lo.startswith(b"lo=0x") and int(lo[3:], 16) & 1, "loopback is up"
    environ = b"".join(_b(e) + b"\0" for e in env)
    assert rest == environ + (
        # docker's content, root's, 0644, bind-mounted over the image's
        b"/etc/hostname 644 0:0\n" + HOSTNAME.encode() + b"\n"
        b"/etc/hosts 644 0:0\n" + DOCKER_HOSTS
        + b"/etc/resolv.conf 644 0:0\n" + host_resolv_conf()
        # beneath them, the image's own file is unchanged, and the missing ones are empty 0755 mount points
        + b"/mnt/etc/hostname 755 0\n/mnt/etc/hosts 600 %d\n/mnt/etc/resolv.conf 755 0\n" % len(IMAGE_HOSTS)
        + IMAGE_HOSTS.encode() + b"no newline at the end"
    ), "the exit marker follows the last byte mid-line and adds nothing"


def test_named_user_gets_groups_home_and_usable_stdio(booted: Callable[[str], Boot]) -> None:
    result, output, err, _ = booted("alice")
    assert result.status == 0
    assert output == (
        # the kernel keeps supplementary groups sorted, as under docker
        b"uid=1000(alice) gid=1000(alice) groups=10(wheel),50(staff),1000(alice)\n"
        b"HOME=/home/alice\n"
        b"umask=0022\n"
        b"to-stdout\n"
        b"alice alice 644\n"
        b"/home/alice\n"
    )
    assert err == "to-stderr\n"  # apart from stdout, as docker keeps them


def test_uid_and_group_name_no_supplementary_groups_env_home_kept(booted: Callable[[str], Boot]) -> None:
    result, output, _, _ = booted("bob")
    assert result.status == 0
    assert output == b"uid=1001(bob) gid=50(staff) groups=50(staff)\nHOME=/custom\n"


def test_unknown_user_fails_before_the_workload(booted: Callable[[str], Boot]) -> None:
    result, output, err, _ = booted("ghost")
    assert result.status == 125
    assert result.workload_status is None
    assert output == b""
    assert result.message == (
        "the guest init failed before starting the workload: "
        "unable to find user ghost: no matching entries in passwd file"
    )
    assert err == ""  # not verbose: the caller shows the message


def test_command_not_found(booted: Callable[[str], Boot]) -> None:
    result, output, err, _ = booted("notfound")
    assert result.status == 127
    assert output == b""
    assert err == 'imgconv-init: exec: "no-such-command": executable file not found in $PATH\n'


def test_no_shell_involved(booted: Callable[[str], Boot]) -> None:
    result, output, _, _ = booted("noshell")
    assert result.status == 0
    assert output == b"$(id)|a;b|*|$HOME|"


def test_workload_is_pid_1_of_its_namespace(booted: Callable[[str], Boot]) -> None:
    """As under docker: $$ is 1, its parent is outside (0), signals without a handler do nothing to
    it, even its own SIGKILL, and a fault still kills it: 128+11."""
    result, output, _, seconds = booted("pid1")
    assert output == b"pid=1 ppid=0\nsurvived\n"
    assert (result.status, result.workload_status) == (128 + 11, 128 + 11)
    assert seconds < 45


def test_orphans_go_to_the_workload_and_leftovers_do_not_hold_the_vm(booted: Callable[[str], Boot]) -> None:
    result, output, _, seconds = booted("reap")
    assert result.status == 0
    assert output == b"zombies=0\ndone\n"
    assert not result.timed_out
    assert seconds < 45


def test_stop_request_delivers_sigterm(guest: Guest) -> None:
    # Stopping once "ready\n" is out, newline included: the decoder holds no newline back.
    result, output, _, _ = guest.boot("trap", stop_on=b"ready\n")
    assert output == b"ready\ngot TERM\n"
    assert (result.status, result.workload_status, result.stopped) == (0, 0, True)


def test_stop_of_a_shell_without_a_trap_is_137(guest: Guest) -> None:
    """PID 1 of its namespace, the shell ignores SIGTERM: the stop ends in a kill, as docker stop's."""
    result, output, _, seconds = guest.boot("untrapped", stop_on=b"ready\n", stop_grace=2)
    assert output == b"ready\n"
    assert (result.status, result.workload_status, result.stopped) == (137, None, True)
    assert seconds < 30


def test_timeout_is_124_after_a_graceful_stop(guest: Guest) -> None:
    result, output, _, seconds = guest.boot("trap", timeout=12)
    assert output == b"ready\ngot TERM\n", "the workload had started and got SIGTERM at the timeout"
    assert (result.status, result.workload_status, result.timed_out) == (124, 0, True)
    assert "timed out after 12s" in result.message
    assert seconds < 20


def test_stage2_failure_on_a_read_only_root(booted: Callable[[str], Boot]) -> None:
    result, output, _, _ = booted("read-only")
    assert (result.status, result.workload_status, output) == (125, None, b"")
    assert result.message == (
        "the guest init failed before starting the workload: cannot create /proc: Read-only file system"
    )


def test_stage1_failure_is_reported_with_the_console_tail(booted: Callable[[str], Boot]) -> None:
    result, output, _, seconds = booted("no-stage2")
    assert (result.status, result.workload_status, output) == (125, None, b"")
    assert "the VM ended without reporting the workload's exit status" in result.message
    assert "imgconv-init: error: cannot run /no/such/init from the root filesystem" in result.message
    assert seconds < 30
