"""``imgconv boot -v/--volume HOSTDIR:GUESTDIR[:ro|:rw]``: host directories shared with the guest, as ``docker run``'s
bind mounts.

Mechanism: virtiofs. Each volume is a ``vhost-user-fs-pci`` device served by its own ``virtiofsd`` (the C one
qemu 7.2 ships as ``/usr/lib/qemu/virtiofsd``), and imgconv's guest init mounts it (``init/volumes.h``) before
the workload starts, so ``-w`` may point inside a volume. virtiofs rather than 9p: the Debian cloud kernel,
the default guest kernel, has virtiofs as a module and no 9p at all (nor its virtio transport); virtiofs is also
the faster of the two and closer to a local filesystem's semantics; and it does what Docker's bind mounts do with
owners: virtiofsd runs as root and creates each file with the guest's uid/gid (fsuid/fsgid per request), so the
host sees the guest user's numbers, as it sees a container's.

Root: qemu 7.2's virtiofsd runs only as root (it makes a mount, PID and network namespace of its own and
pivot_roots into HOSTDIR, so nothing outside HOSTDIR is reachable even through the guest's symlinks; it needs
``/run/virtiofsd`` for its lock). ``-v`` without root is refused in one line before qemu starts; everything else
``imgconv boot`` does needs no root.

Read-only (``:ro``) is enforced on the host: the guest is untrusted, and a guest-side read-only mount can be
remounted read-write by the guest's root. This virtiofsd has no read-only option, so it is started in a private
mount namespace of its own where HOSTDIR is bind-mounted over itself and made read-only recursively
(``mount_setattr``, Linux 5.12+); virtiofsd's own bind of HOSTDIR inherits that, so every write fails with EROFS
on the host, as in a ``:ro`` container. The guest mounts it read-only too, so the error comes at once.

HOSTDIR must exist: Docker creates a missing one (as root, empty), which turns a typo into a new empty folder;
imgconv refuses it instead (exit 2, before qemu starts). A relative HOSTDIR (starting with '.', as the docker
CLI 23+ wants) is taken from the current directory; a bare name, a named volume to Docker, is refused. GUESTDIR
must be absolute; it is created in the guest when missing, with its parents, as Docker does. Volumes are
mounted parents first (as Docker sorts them), so one may sit inside another.

virtiofsd never outlives imgconv: it is started with a parent-death signal (SIGKILL when imgconv goes, however it
goes; its own inner process has SIGTERM for when it goes), in a session of its own (a terminal's Ctrl-C is for
imgconv, which stops the guest first), exits by itself when qemu disconnects, and is killed in cleanup if it
did not. Its socket and log live in the run's temporary directory; the pid lock it insists on making in
``/run/virtiofsd`` (named after the socket's path) is removed after it.

The list reaches the guest as the QEMU firmware config file ``opt/imgconv/volumes`` (format in ``volumes.h``),
never on the kernel command line. qemu needs the guest's RAM shared with virtiofsd for vhost-user, so a boot with
volumes gets a shared memfd memory backend; boots without ``-v`` are started exactly as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import posixpath
import stat
import struct
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from converter.boot.lifeline import die_with, libc
from converter.errors import MissingToolError, ToolError, UsageError, one_line

VIRTIOFSD = Path("/usr/lib/qemu/virtiofsd")
VIRTIOFSD_PACKAGE = "qemu-system-common"
LOCK_DIR = Path("/var/run/virtiofsd")  # virtiofsd's own choice (qemu's local state dir)
VOLUMES_FW_CFG = "opt/imgconv/volumes"  # read by init/volumes.h
MAX_VOLUMES = 16  # each is a PCI device on the one bus, which has 32 slots in all
MAX_GUEST_PATH = 4000  # the init's buffer is 4096 bytes
START_TIMEOUT = 10.0  # virtiofsd listens within milliseconds; a slow machine gets room
STOP_TIMEOUT = 3.0
_LISTENING = "Waiting for vhost-user socket connection"  # virtiofsd's info line once it listens
MODES = ("rw", "ro")


@dataclass(frozen=True)
class Volume:
    """One ``-v``: *host* (absolute, symlinks resolved, an existing directory) seen at *guest* (absolute, clean)."""

    host: Path
    guest: str
    read_only: bool = False

    @property
    def mode(self) -> str:
        return "ro" if self.read_only else "rw"


def _guest_path(text: str, spec: str) -> str:
    if not text.startswith("/"):
        raise UsageError(f"-v {spec!r}: GUESTDIR {text!r} must be an absolute path")
    guest = "/" + posixpath.normpath(text).lstrip("/")
    if guest == "/":
        raise UsageError(f"-v {spec!r}: GUESTDIR cannot be '/'")
    if len(guest.encode("utf-8", "surrogateescape")) > MAX_GUEST_PATH:
        raise UsageError(f"-v {spec[:60]!r}...: GUESTDIR is longer than {MAX_GUEST_PATH} bytes")
    return guest


def _host_dir(text: str, spec: str, cwd: Path) -> Path:
    """HOSTDIR as an absolute path with its symlinks resolved; it must be an existing directory (module docstring).
    A relative one starts with '.', as the docker CLI wants it: a bare name is a named volume there, which imgconv
    does not have, so it is refused rather than taken as a directory of that name."""
    if not text.startswith(("/", ".")):
        raise UsageError(f"-v {spec!r}: {text!r} would be a named volume in Docker, which imgconv does not have; "
                         f"give a directory (./{text} for one in the current directory)")
    path = Path(os.path.realpath(cwd / text))
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise UsageError(f"-v {spec!r}: HOSTDIR {path} does not exist (imgconv does not create it, unlike docker: "
                         "create it first)") from exc
    except OSError as exc:
        raise UsageError(f"-v {spec!r}: cannot use HOSTDIR {path}: {exc.strerror}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"-v {spec!r}: HOSTDIR {path} is not a directory (virtiofs shares directories only)")
    return path


def parse_volume(spec: str, cwd: Path | None = None) -> Volume:
    """``HOSTDIR:GUESTDIR[:ro|:rw]``, split on ':' as the docker CLI splits it on Linux (so neither path may contain
    one). A relative HOSTDIR is taken from *cwd* (default: the current directory)."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise UsageError(f"-v takes HOSTDIR:GUESTDIR[:ro|:rw], not {spec!r}")
    mode = parts[2] if len(parts) == 3 else "rw"
    if mode not in MODES:
        raise UsageError(f"-v {spec!r}: the mode is ro or rw, not {mode!r}")
    guest = _guest_path(parts[1], spec)
    return Volume(_host_dir(parts[0], spec, Path.cwd() if cwd is None else cwd), guest, mode == "ro")


def parse_volumes(specs: Sequence[str], cwd: Path | None = None) -> tuple[Volume, ...]:
    """Every ``-v``, checked together, in the order they are mounted: parents before what they hold (by depth, as
    Docker sorts mounts; equal depths keep the command line's order)."""
    volumes = [parse_volume(spec, cwd) for spec in specs]
    if len(volumes) > MAX_VOLUMES:
        raise UsageError(f"-v: at most {MAX_VOLUMES} volumes, not {len(volumes)}")
    seen: set[str] = set()
    for volume in volumes:
        if volume.guest in seen:
            raise UsageError(f"-v: duplicate mount point {volume.guest}")
        seen.add(volume.guest)
    return tuple(sorted(volumes, key=lambda v: v.guest.count("/")))


def tag(index: int) -> str:
    """The virtiofs tag of the *index*-th volume: what the guest mounts (at most 36 bytes)."""
    return f"imgconv{index}"


def guest_config(volumes: Sequence[Volume]) -> bytes:
    """The firmware config file ``opt/imgconv/volumes``: ``version\\0 1\\0`` then ``TAG\\0 MODE\\0 GUESTDIR\\0`` per
    volume, in mount order."""
    out = bytearray(b"version\0" b"1\0")
    for index, volume in enumerate(volumes):
        for value in (tag(index), volume.mode, volume.guest):
            out += value.encode("utf-8", "surrogateescape") + b"\0"
    return bytes(out)


def _opt(value: str | Path) -> str:
    """A value inside a qemu option list: commas are doubled."""
    return str(value).replace(",", ",,")


def qemu_args(sockets: Sequence[Path], memory_mib: int, config: Path) -> list[str]:
    """The devices for virtiofsd sockets *sockets* (one per volume, in mount order), the guest's RAM shared with
    them (vhost-user maps it into virtiofsd), and the volume list for the init as *config*."""
    argv = ["-object", f"memory-backend-memfd,id=imgconv-ram,size={memory_mib}M,share=on",
            "-numa", "node,memdev=imgconv-ram"]
    for index, sock in enumerate(sockets):
        argv += ["-chardev", f"socket,id=imgconv-vol{index},path={_opt(sock)}",
                 "-device", f"vhost-user-fs-pci,chardev=imgconv-vol{index},tag={tag(index)}"]
    return [*argv, "-fw_cfg", f"name={VOLUMES_FW_CFG},file={_opt(config)}"]


def _fuse_opt(value: Path) -> str:
    """A value inside virtiofsd's ``-o`` list (libfuse's fuse_opt): commas and backslashes are escaped."""
    return str(value).replace("\\", "\\\\").replace(",", "\\,")


def virtiofsd_argv(volume: Volume, sock: Path) -> list[str]:
    """virtiofsd for one volume: sandboxed in namespaces, pivot_rooted into HOSTDIR (module docstring)."""
    return [str(VIRTIOFSD), f"--socket-path={sock}", "-o", f"source={_fuse_opt(volume.host)}",
            "-o", "sandbox=namespace", "-o", "cache=auto", "-o", "log_level=info"]


def check_host() -> None:
    """What ``-v`` needs on the host, refused in one line before qemu starts."""
    if not os.access(VIRTIOFSD, os.X_OK):
        raise MissingToolError(f"{VIRTIOFSD} is required to share a directory with -v "
                               f"(Debian package: {VIRTIOFSD_PACKAGE})")
    if os.geteuid() != 0:
        raise UsageError("-v needs root: qemu's virtiofsd, which shares the directory, runs only as root "
                         "(everything else imgconv boot does works without root)")


# ------------------------------------------------------------------------------------------ virtiofsd --

_CLONE_NEWNS = 0x00020000
_MS_BIND, _MS_REC, _MS_PRIVATE = 0x1000, 0x4000, 1 << 18
_SYS_MOUNT_SETATTR = 442  # the same number on every architecture
_AT_FDCWD, _AT_RECURSIVE = -100, 0x8000
_MOUNT_ATTR_RDONLY = 0x1


def _child_setup(parent: int, read_only: Path | None) -> Callable[[], None]:
    """What virtiofsd's process does between fork and exec (everything resolved beforehand: after a fork only
    this thread exists). Dies with imgconv; for a read-only volume, a private mount namespace where HOSTDIR is a
    read-only bind of itself. A failure is written to the log (stderr is already there) and ends the child."""
    arm = die_with(parent)
    c = libc()
    unshare, mount, syscall = c.unshare, c.mount, c.syscall
    source = None if read_only is None else os.fsencode(read_only)
    attr = ctypes.create_string_buffer(struct.pack("=QQQQ", _MOUNT_ATTR_RDONLY, 0, 0, 0), 32)

    def fail(what: str) -> None:
        os.write(2, f"imgconv: {what}: {os.strerror(ctypes.get_errno())}\n".encode())
        os._exit(126)

    def setup() -> None:
        arm()
        if source is None:
            return
        if unshare(_CLONE_NEWNS) != 0:
            fail("no mount namespace for a read-only volume")
        if mount(b"none", b"/", None, ctypes.c_ulong(_MS_REC | _MS_PRIVATE), None) != 0:
            fail("cannot make the volume's mount namespace private")
        if mount(source, source, None, ctypes.c_ulong(_MS_BIND | _MS_REC), None) != 0:
            fail("cannot bind the read-only volume")
        if syscall(ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_long(_AT_FDCWD), source,
                   ctypes.c_long(_AT_RECURSIVE), attr, ctypes.c_long(32)) != 0:
            fail("cannot make the volume read-only (mount_setattr needs Linux 5.12 or later)")

    return setup


def _wait_listening(proc: subprocess.Popen[bytes], log: Path, volume: Volume) -> None:
    """Until virtiofsd listens on its socket (qemu must find it there), or say why it ended."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        said = log.read_text(errors="replace")
        if _LISTENING in said:
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            why = "did not start in time" if proc.returncode is None else f"exited with status {proc.returncode}"
            said = one_line(said, 300) or "no output"
            raise ToolError(f"virtiofsd for -v {volume.host}:{volume.guest} {why}: {said}")
        time.sleep(0.005)


def lock_file(sock: Path) -> Path:
    """Where virtiofsd keeps the pid lock of the daemon serving *sock* (it never removes it)."""
    return LOCK_DIR / (str(sock).replace("/", ".") + ".pid")


def _stop(proc: subprocess.Popen[bytes], sock: Path) -> None:
    """virtiofsd ends by itself once qemu has disconnected; if it has not, it is asked, then killed. Its lock
    file goes too: one per run would pile up in /run otherwise."""
    try:
        proc.wait(timeout=0.5)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    lock_file(sock).unlink(missing_ok=True)


@contextlib.contextmanager
def serve(volumes: Sequence[Volume], workdir: Path, memory_mib: int) -> Iterator[list[str]]:
    """Start one virtiofsd per volume (files in *workdir*, the run's temporary directory), each listening before
    this yields qemu's arguments for them; stop them all when the block ends."""
    check_host()
    config = workdir / "volumes"
    config.write_bytes(guest_config(volumes))
    procs: list[subprocess.Popen[bytes]] = []
    sockets = [workdir / f"virtiofsd{index}.sock" for index in range(len(volumes))]
    try:
        for volume, sock in zip(volumes, sockets, strict=True):
            log = sock.with_suffix(".log")
            with log.open("wb") as out:
                procs.append(subprocess.Popen(
                    virtiofsd_argv(volume, sock), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                    start_new_session=True,
                    preexec_fn=_child_setup(os.getpid(), volume.host if volume.read_only else None)))
            _wait_listening(procs[-1], log, volume)
        yield qemu_args(sockets, memory_mib, config)
    finally:
        for proc, sock in zip(procs, sockets, strict=False):
            _stop(proc, sock)
