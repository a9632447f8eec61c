"""`imgconv boot -v/--volume`: the parser, the qemu arguments and the guest's list; and, as root, the real
virtiofsd's lifecycle (it listens before qemu would start, never outlives imgconv, leaves no lock behind) and the
host-side read-only bind it runs in (the guest cannot lift it: the host refuses every write with EROFS)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from converter.boot.qemu import qemu_argv
from converter.boot.volumes import (
    MAX_VOLUMES,
    VIRTIOFSD,
    Volume,
    _child_setup,
    guest_config,
    lock_file,
    parse_volume,
    parse_volumes,
    qemu_args,
    serve,
    tag,
    virtiofsd_argv,
)
from converter.errors import EXIT_USAGE, UsageError
from tests.cli import assert_one_line_error, imgconv

as_root = pytest.mark.skipif(os.geteuid() != 0 or not VIRTIOFSD.exists(), reason="virtiofsd runs only as root")


def test_specs(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    real = tmp_path / "real"
    assert parse_volume(f"{real}:/data") == Volume(real, "/data", False)
    assert parse_volume(f"{real}:/data:rw") == Volume(real, "/data", False)
    assert parse_volume(f"{real}:/data:ro") == Volume(real, "/data", True)
    assert parse_volume(f"{real}:/data:ro").mode == "ro"
    # relative HOSTDIR: from the current directory (no named volumes); symlinks resolved
    assert parse_volume("./real:/a", cwd=tmp_path).host == real
    assert parse_volume("../real:/a", cwd=tmp_path / "link").host == real
    assert parse_volume("./link/:/a", cwd=tmp_path).host == real
    assert parse_volume(".:/a", cwd=real).host == real
    # GUESTDIR is cleaned as Docker cleans it
    assert parse_volume(f"{real}:/a//b/../c/", cwd=tmp_path).guest == "/a/c"
    assert parse_volume(f"{real}://x", cwd=tmp_path).guest == "/x"


@pytest.mark.parametrize(("spec", "message"), [
    ("", "-v takes HOSTDIR:GUESTDIR[:ro|:rw], not ''"),
    ("real", "-v takes HOSTDIR:GUESTDIR[:ro|:rw], not 'real'"),
    ("real:/x", "-v 'real:/x': 'real' would be a named volume in Docker, which imgconv does not have; give a "
                "directory (./real for one in the current directory)"),
    ("real/sub:/x", "-v 'real/sub:/x': 'real/sub' would be a named volume in Docker, which imgconv does not have; "
                    "give a directory (./real/sub for one in the current directory)"),
    (":/x", "-v takes HOSTDIR:GUESTDIR[:ro|:rw], not ':/x'"),
    ("real:", "-v takes HOSTDIR:GUESTDIR[:ro|:rw], not 'real:'"),
    ("./real:/x:ro:z", "-v takes HOSTDIR:GUESTDIR[:ro|:rw], not './real:/x:ro:z'"),
    ("./real:/x:z", "-v './real:/x:z': the mode is ro or rw, not 'z'"),
    ("./real:/x:", "-v './real:/x:': the mode is ro or rw, not ''"),
    ("./real:x", "-v './real:x': GUESTDIR 'x' must be an absolute path"),
    ("./real:./x", "-v './real:./x': GUESTDIR './x' must be an absolute path"),
    ("./real:/", "-v './real:/': GUESTDIR cannot be '/'"),
    ("./real:/a/..", "-v './real:/a/..': GUESTDIR cannot be '/'"),
    ("./missing:/x", "-v './missing:/x': HOSTDIR {tmp}/missing does not exist (imgconv does not create it, unlike "
                   "docker: create it first)"),
    ("./file:/x", "-v './file:/x': HOSTDIR {tmp}/file is not a directory (virtiofs shares directories only)"),
])  # fmt: skip
def test_bad_specs_are_one_line_usage_errors(spec: str, message: str, tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError) as info:
        parse_volume(spec, cwd=tmp_path)
    assert str(info.value) == message.format(tmp=tmp_path)


def test_volumes_together(tmp_path: Path) -> None:
    """Parents are mounted first whatever the order given (as Docker sorts mounts); equal depths keep their order;
    a mount point given twice, or more volumes than PCI slots allow, are refused."""
    specs = [f"{tmp_path}:/w/a/b", f"{tmp_path}:/z", f"{tmp_path}:/w:ro", f"{tmp_path}:/w/a"]
    assert [v.guest for v in parse_volumes(specs)] == ["/z", "/w", "/w/a", "/w/a/b"]
    with pytest.raises(UsageError, match=r"^-v: duplicate mount point /w$"):
        parse_volumes([f"{tmp_path}:/w", f"{tmp_path}:/w/:ro"])
    with pytest.raises(UsageError, match=rf"^-v: at most {MAX_VOLUMES} volumes, not {MAX_VOLUMES + 1}$"):
        parse_volumes([f"{tmp_path}:/v{i}" for i in range(MAX_VOLUMES + 1)])
    assert parse_volumes([]) == ()


def test_guest_list_and_qemu_arguments(tmp_path: Path) -> None:
    volumes = [Volume(tmp_path, "/data"), Volume(tmp_path, "/data/ro dir", True)]
    assert guest_config(volumes) == b"version\x001\x00imgconv0\x00rw\x00/data\x00imgconv1\x00ro\x00/data/ro dir\x00"
    assert guest_config([]) == b"version\x001\x00"
    assert [tag(i) for i in range(2)] == ["imgconv0", "imgconv1"]
    args = qemu_args([Path("/t/a,b.sock"), Path("/t/c.sock")], 768, Path("/t/volumes"))
    assert args == [
        "-object", "memory-backend-memfd,id=imgconv-ram,size=768M,share=on", "-numa", "node,memdev=imgconv-ram",
        "-chardev", "socket,id=imgconv-vol0,path=/t/a,,b.sock",
        "-device", "vhost-user-fs-pci,chardev=imgconv-vol0,tag=imgconv0",
        "-chardev", "socket,id=imgconv-vol1,path=/t/c.sock",
        "-device", "vhost-user-fs-pci,chardev=imgconv-vol1,tag=imgconv1",
        "-fw_cfg", "name=opt/imgconv/volumes,file=/t/volumes",
    ]  # fmt: skip


def test_virtiofsd_arguments_escape_its_option_list() -> None:
    """HOSTDIR goes inside virtiofsd's comma-separated -o list: a comma in it must not start another option."""
    argv = virtiofsd_argv(Volume(Path("/a,b\\c"), "/x"), Path("/t/s.sock"))
    assert argv[:4] == [str(VIRTIOFSD), "--socket-path=/t/s.sock", "-o", "source=/a\\,b\\\\c"]
    assert "sandbox=namespace" in argv


def test_a_boot_without_volumes_is_unchanged() -> None:
    """Only -v adds shared memory and devices: other boots get exactly the command line they had."""
    common = {"accel": "tcg", "drive": ["-drive", "x"], "memory_mib": 512, "cpus": 1, "direct_kernel": None,
              "qmp_socket": None}
    plain = qemu_argv(**common)  # type: ignore[arg-type]
    assert not any("memory-backend" in a or "vhost-user" in a or "numa" in a for a in plain)
    shared = qemu_argv(**common, volumes=["-numa", "node,memdev=m"])  # type: ignore[arg-type]
    assert shared[: len(plain)] == plain and shared[len(plain):] == ["-numa", "node,memdev=m"]


def test_cli_refuses_before_anything_starts(tmp_path: Path) -> None:
    """A missing HOSTDIR, or a relative GUESTDIR, is one line and exit 2 before the disk is even opened; -v is
    --volume (as Docker's), --verbose is long only."""
    ran = imgconv("boot", "-v", f"{tmp_path}/nope:/x", str(tmp_path / "no-such-disk.qcow2"))
    assert_one_line_error(ran, f"{tmp_path}/nope does not exist", "create it first")
    ran = imgconv("boot", "--volume", f"{tmp_path}:data", str(tmp_path / "no-such-disk.qcow2"))
    assert_one_line_error(ran, "GUESTDIR 'data' must be an absolute path")
    help_text = imgconv("boot", "--help", env={"COLUMNS": "200"}).ok().stdout
    lines = {line.split()[1]: line.split()[2] for line in help_text.splitlines() if line.startswith("│ --")}
    assert lines["--volume"] == "-v" and lines["--verbose"] == "<bool>"  # no short name


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another uid")
def test_without_root_volumes_are_refused_in_one_line(tmp_path: Path) -> None:
    ran = imgconv("boot", "-v", "/usr/share:/x", str(tmp_path / "disk.qcow2"),  # a HOSTDIR uid 65534 can see
                  prefix=["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"])
    assert_one_line_error(ran, "-v needs root", code=EXIT_USAGE)


def _virtiofsds() -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "exe").resolve() == VIRTIOFSD:
                    found.add(int(entry.name))
            except OSError:
                continue
    return found


@as_root
def test_virtiofsd_listens_then_is_stopped_with_nothing_left(tmp_path: Path) -> None:
    share, work = tmp_path / "share", tmp_path / "work"
    share.mkdir()
    work.mkdir()
    before = _virtiofsds()
    volumes = parse_volumes([f"{share}:/a", f"{share}:/b:ro"])
    with serve(volumes, work, 256) as args:
        sockets = [work / "virtiofsd0.sock", work / "virtiofsd1.sock"]
        assert all(s.is_socket() for s in sockets)
        assert f"socket,id=imgconv-vol1,path={sockets[1]}" in args
        assert (work / "volumes").read_bytes() == guest_config(volumes)
        assert len(_virtiofsds() - before) >= 2  # each also forks its sandboxed inner process
        assert all(lock_file(s).exists() for s in sockets)
    deadline = time.monotonic() + 5
    while _virtiofsds() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _virtiofsds() - before
    assert not any(lock_file(s).exists() for s in sockets)


@as_root
def test_virtiofsd_dies_with_imgconv(tmp_path: Path) -> None:
    """imgconv killed with SIGKILL (no cleanup at all): its virtiofsd go too (parent-death signal)."""
    (tmp_path / "share").mkdir()
    before = _virtiofsds()
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from converter.boot.volumes import parse_volumes, serve
        with serve(parse_volumes(["{tmp_path}/share:/a:ro"]), Path("{tmp_path}"), 128):
            print("serving", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60, check=False)
    assert proc.returncode == -signal.SIGKILL and proc.stdout == b"serving\n", proc.stderr
    deadline = time.monotonic() + 5
    while _virtiofsds() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _virtiofsds() - before
    lock_file(tmp_path / "virtiofsd0.sock").unlink(missing_ok=True)  # the one thing only cleanup removes


@as_root
def test_read_only_is_a_host_side_bind_that_the_child_cannot_lift(tmp_path: Path) -> None:
    """What virtiofsd runs in for :ro: HOSTDIR read-only in a private mount namespace, so a write fails with
    EROFS, while the host's own view stays writable and its mount table unchanged. (The guest is not in that
    namespace: its remount only changes its own mount; test_boot_volumes checks that from a guest.)"""
    share = tmp_path / "share"
    share.mkdir()
    mounts = Path("/proc/self/mountinfo").read_text()
    probe = textwrap.dedent(f"""
        import errno, os, sys
        try:
            open("{share}/x", "w")
        except OSError as exc:
            sys.exit(0 if exc.errno == errno.EROFS else 3)
        sys.exit(4)
    """)
    ran = subprocess.run([sys.executable, "-c", probe], preexec_fn=_child_setup(os.getpid(), share),
                         capture_output=True, timeout=60, check=False)
    assert ran.returncode == 0, ran.stderr
    assert Path("/proc/self/mountinfo").read_text() == mounts
    (share / "y").write_text("the host still writes here")
