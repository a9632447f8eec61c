"""``imgconv boot``: run a disk under qemu, stream the workload's output, return its exit status.

The disk is never written: qemu runs on a throwaway qcow2 overlay. The serial console is qemu's
stdout (a pipe), decoded by :class:`~converter.boot.console.ConsoleDecoder`; a QMP socket (qemu
connects to ours) is used to ask the guest to stop (ctrl-alt-delete, which the guest init turns
into SIGTERM for the workload) and, failing that, to quit. Like ``docker run``, which makes a
container's /etc/resolv.conf from the host's when it starts, the boot passes the guest
:func:`docker_resolv_conf` of this host's, as the QEMU firmware config file
``opt/imgconv/resolv.conf`` (the guest init bind-mounts it on /etc/resolv.conf).

Exit statuses (:attr:`BootResult.status`), never above 255:

- 0-255: the workload's own status (128+N when it was killed by signal N), as ``docker run``;
- 124: the timeout expired (the guest was asked to stop, then the VM was quit);
- 125: there is no status from the workload: the guest init failed before starting it (its
  ``imgconv-init: error:`` text is in the message), or the VM ended without reporting one
  (kernel panic, qemu died...; the last console lines are in the message);
- 137: a stop was requested (``stop`` event) and the workload did not end within the grace
  period, so the VM was quit (docker reports 137 when ``docker stop`` has to SIGKILL). The
  workload is PID 1 of its PID namespace, as in a container: SIGTERM reaches it only if it
  handles it, so a shell without a TERM trap always ends this way, as under ``docker stop``.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import json
import logging
import math
import os
import re
import selectors
import shlex
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, TextIO

from converter.boot.accel import QEMU, Accel, choose_accel
from converter.boot.console import ConsoleDecoder, Exit, Firmware, Output
from converter.errors import DiskError, Interrupted, ToolError
from converter.run import require, run

log = logging.getLogger("imgconv.boot.qemu")

EXIT_TIMEOUT = 124
EXIT_NO_STATUS = 125
EXIT_KILLED = 137

QUIT_AFTER_EXIT_MARKER = 3.0  # the guest powers off right after its exit marker; if it hangs, quit
KILL_AFTER_QUIT = 5.0
QMP_TIMEOUT = 5.0
TAIL_LINES = 12
INIT_ERROR = "imgconv-init: error: "
RESOLV_CONF_FW_CFG = "opt/imgconv/resolv.conf"  # read by init.c
_PURPOSE = "boot the VM"


@dataclass(frozen=True)
class BootResult:
    """How a boot ended. ``status`` is what ``imgconv boot`` exits with (see the module docstring)."""

    status: int
    workload_status: int | None = None  # from the guest's exit marker, even after a timeout or stop
    timed_out: bool = False
    stopped: bool = False
    message: str = ""  # why there is no workload status, or what the timeout did; empty otherwise


# --------------------------------------------------------------------------- resolv.conf --
# docker's libnetwork (20.10, resolvconf and sandbox_dns_unix.go), its regular expressions kept as
# they are. Go's \s is [\t\n\f\r ] and \w is [0-9A-Za-z_]; both have Python's leftmost-first matching.

_GO_S = rb"[\t\n\f\r ]"
_IPV4_BLOCK = rb"(25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)"
_IPV4 = rb"(" + _IPV4_BLOCK + rb"\.){3}" + _IPV4_BLOCK
_IPV6 = rb"([0-9A-Fa-f]{0,4}:){2,7}([0-9A-Fa-f]{0,4})(%[0-9A-Za-z_]+)?"
_LOCALHOST_NS_RE = re.compile(
    rb"(?m)^nameserver" + _GO_S + rb"+((127\.([0-9]{1,3}\.){2}[0-9]{1,3})|(::1)$)" + _GO_S + rb"*\n*"
)
_IPV6_NS_RE = re.compile(rb"(?m)^nameserver" + _GO_S + rb"+" + _IPV6 + _GO_S + rb"*\n*")
_NS_LINE_RE = re.compile(
    _GO_S + rb"*nameserver" + _GO_S + rb"*((" + _IPV4 + rb")|(" + _IPV6 + rb"))" + _GO_S + rb"*"
)
_DEFAULT_IPV4_DNS = (b"nameserver 8.8.8.8", b"nameserver 8.8.4.4")
_DEFAULT_IPV6_DNS = (b"nameserver 2001:4860:4860::8888", b"nameserver 2001:4860:4860::8844")
HOST_RESOLV_CONF = Path("/etc/resolv.conf")
SYSTEMD_RESOLV_CONF = Path("/run/systemd/resolve/resolv.conf")


def _nameservers(content: bytes) -> list[bytes]:
    """libnetwork's GetNameservers: the addresses of the nameserver lines (comments cut at '#')."""
    lines = (_NS_LINE_RE.fullmatch(line.partition(b"#")[0]) for line in content.split(b"\n"))
    return [m.group(1) for m in lines if m is not None]


def _filter_resolv_dns(content: bytes, *, ipv6: bool) -> bytes:
    """libnetwork's FilterResolvDNS: localhost nameservers out (and IPv6 ones without IPv6); Google's
    public DNS when no nameserver is left."""
    cleaned = _LOCALHOST_NS_RE.sub(b"", content)
    if not ipv6:
        cleaned = _IPV6_NS_RE.sub(b"", cleaned)
    if not _nameservers(cleaned):
        cleaned += b"\n" + b"\n".join(_DEFAULT_IPV4_DNS + (_DEFAULT_IPV6_DNS if ipv6 else ()))
    return cleaned


def docker_resolv_conf(host: bytes | None, systemd: bytes | None = None) -> bytes:
    """The /etc/resolv.conf ``docker run --network none`` gives a container on a host whose
    /etc/resolv.conf holds *host* (None: there is none) and whose systemd-resolved file holds *systemd*.

    libnetwork reads systemd-resolved's file instead when the host's only nameserver is its stub
    (127.0.0.53), filters it when the sandbox is made (IPv6 assumed), and again when the container
    joins the ``none`` network (no IPv6).
    """
    if _nameservers(host or b"") == [b"127.0.0.53"]:
        host = systemd
    return _filter_resolv_dns(_filter_resolv_dns(host or b"", ipv6=True), ipv6=False)


def host_resolv_conf() -> bytes:
    """:func:`docker_resolv_conf` of this host."""

    def read(path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.debug("cannot read %s: %s", path, exc)
            return None

    return docker_resolv_conf(read(HOST_RESOLV_CONF), read(SYSTEMD_RESOLV_CONF))


# ------------------------------------------------------------------------------------- QMP --


class Qmp:
    """A minimal QMP client: JSON lines over a unix socket, events skipped."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = b""

    @classmethod
    def accept(cls, listener: socket.socket, timeout: float = QMP_TIMEOUT) -> Qmp:
        listener.settimeout(timeout)
        conn, _ = listener.accept()
        conn.settimeout(timeout)
        qmp = cls(conn)
        greeting = qmp._read()
        if "QMP" not in greeting:
            raise ToolError(f"qemu's QMP socket did not greet as expected: {greeting}")
        qmp.execute("qmp_capabilities")
        return qmp

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("qemu closed its QMP socket")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        message = json.loads(line)
        if not isinstance(message, dict):
            raise ToolError(f"unexpected QMP message: {line!r}")
        return message

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise ToolError(f"qemu refused {command}: {reply['error'].get('desc', reply['error'])}")
            # an asynchronous event ({"event": ...}): not ours to handle

    def close(self) -> None:
        self._sock.close()


CTRL_ALT_DELETE = {"keys": [{"type": "qcode", "data": key} for key in ("ctrl", "alt", "delete")]}


# ------------------------------------------------------------------------------- command line --


def disk_format(disk: Path) -> str:
    """The disk's format as ``qemu-img info`` detects it (so qemu itself never has to probe)."""
    proc = run(["qemu-img", "info", "--output=json", disk], purpose=f"read the format of {disk}")
    try:
        fmt = json.loads(proc.stdout)["format"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DiskError(f"{disk}: qemu-img could not tell its format") from exc
    if not isinstance(fmt, str):
        raise DiskError(f"{disk}: qemu-img could not tell its format")
    return fmt


def _opt(value: str | Path) -> str:
    """A value inside a qemu ``-drive``/``-chardev`` option: commas are doubled."""
    return str(value).replace(",", ",,")


def qemu_argv(
    *,
    accel: Accel,
    drive: str,
    memory_mib: int,
    cpus: int,
    direct_kernel: tuple[Path, Path, str] | None,
    qmp_socket: Path | None,
    resolv_conf: Path | None = None,
) -> list[str]:
    """The qemu command line; *drive* is the ``-drive`` value. Console on stdio (the serial port).

    *resolv_conf* is given to the guest as the firmware config file ``opt/imgconv/resolv.conf``.
    """
    argv = [
        QEMU,
        "-machine", f"pc,accel={accel}",
        "-cpu", "host" if accel == "kvm" else "max",
        "-m", str(memory_mib),
        "-smp", str(cpus),
        "-nodefaults", "-display", "none", "-no-reboot",
        "-serial", "stdio",
        "-drive", drive,
    ]  # fmt: skip
    if qmp_socket is not None:
        argv += ["-chardev", f"socket,id=qmp,path={_opt(qmp_socket)}", "-mon", "chardev=qmp,mode=control"]
    if resolv_conf is not None:
        argv += ["-fw_cfg", f"name={RESOLV_CONF_FW_CFG},file={_opt(resolv_conf)}"]
    if direct_kernel is not None:
        kernel, initrd, append = direct_kernel
        argv += ["-kernel", str(kernel), "-initrd", str(initrd), "-append", append]
    return argv


# ------------------------------------------------------------------------------------- boot --


class _Console:
    """Where decoded console events go: output to the user, firmware to stderr when asked."""

    def __init__(self, stdout: BinaryIO, stderr: TextIO, verbose: bool) -> None:
        self.stdout, self.stderr, self.verbose = stdout, stderr, verbose
        self.decoder = ConsoleDecoder()
        self.status: int | None = None
        self.lines: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.init_errors: list[str] = []
        self._text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._partial = ""

    def feed(self, chunk: bytes) -> None:
        self._handle(self.decoder.feed(chunk))

    def close(self) -> None:
        self._handle(self.decoder.close())
        if self._partial:
            self._line(self._partial)

    def _handle(self, events: list[Firmware | Output | Exit]) -> None:
        for event in events:
            if isinstance(event, Output):
                self.stdout.write(event.data)
                self.stdout.flush()
            elif isinstance(event, Firmware):
                text = self._text.decode(event.data)
                if self.verbose:
                    self.stderr.write(text)
                    self.stderr.flush()
                *complete, self._partial = (self._partial + text).split("\n")
                for line in complete:
                    self._line(line)
            else:
                self.status = event.status

    def _line(self, line: str) -> None:
        line = line.rstrip("\r")
        if line.strip():
            self.lines.append(line)
        if line.startswith(INIT_ERROR):
            self.init_errors.append(line.removeprefix(INIT_ERROR))


def _print_command(stderr: TextIO, argv: list[str], disk: Path, fmt: str, overlay_drive: str) -> None:
    drive = f"file={_opt(disk)},format={fmt},if=virtio,snapshot=on"
    shown = [drive if arg == overlay_drive else arg for arg in argv]
    stderr.write(
        "imgconv: qemu command (imgconv ran it on a throwaway qcow2 overlay of the disk, with a QMP socket and\n"
        "imgconv:  the host's DNS settings as docker passes them: -fw_cfg name=opt/imgconv/resolv.conf,file=...;\n"
        "imgconv:  snapshot=on keeps the disk unchanged in the same way):\n"
        f"{shlex.join(shown)}\n"
    )
    stderr.flush()


def boot(
    disk: Path,
    *,
    timeout: float,
    memory_mib: int = 512,
    cpus: int = 1,
    verbose: bool,
    stdout: BinaryIO,
    stderr: TextIO,
    direct_kernel: tuple[Path, Path, str] | None = None,
    stop: threading.Event | None = None,
    stop_grace: float = 10.0,
) -> BootResult:
    """Boot *disk* (any format qemu-img knows; never written), stream the workload's output to
    *stdout* as it comes, and return how it ended (statuses in the module docstring).

    *timeout* (seconds, from qemu's start; ``math.inf`` for none) and *stop* (an event another
    thread sets) both ask the guest to stop gracefully (the workload gets SIGTERM) and quit the VM
    after *stop_grace* seconds. *direct_kernel* = ``(kernel, initrd, append)`` boots that kernel
    instead of the disk's bootloader. With *verbose*, the qemu command line and everything on the
    console before the workload starts go to *stderr*. Nothing else is printed: why a boot ended
    without the workload's own status is in :attr:`BootResult.message`.
    Ctrl-C (KeyboardInterrupt) stops the guest the same way, then raises :class:`Interrupted`.
    """
    require(QEMU, _PURPOSE)
    require("qemu-img", _PURPOSE)
    disk = disk.resolve()
    if not disk.is_file():
        raise DiskError(f"{disk}: no such disk image")
    fmt = disk_format(disk)
    accel = choose_accel()

    with tempfile.TemporaryDirectory(prefix="imgconv-boot-") as tmp:
        overlay = Path(tmp) / "overlay.qcow2"
        run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt, "-b", disk, overlay],
            purpose=f"create a throwaway overlay of {disk}",
        )
        qmp_path = Path(tmp) / "qmp.sock"
        resolv_conf = Path(tmp) / "resolv.conf"
        resolv_conf.write_bytes(host_resolv_conf())
        drive = f"file={_opt(overlay)},format=qcow2,if=virtio"
        argv = qemu_argv(
            accel=accel, drive=drive, memory_mib=memory_mib, cpus=cpus,
            direct_kernel=direct_kernel, qmp_socket=qmp_path, resolv_conf=resolv_conf,
        )  # fmt: skip
        if verbose:
            _print_command(stderr, qemu_argv(
                accel=accel, drive=drive, memory_mib=memory_mib, cpus=cpus,
                direct_kernel=direct_kernel, qmp_socket=None,
            ), disk, fmt, drive)  # fmt: skip
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(str(qmp_path))
            listener.listen(1)
            log.debug("run: %s", shlex.join(argv))
            # A session of its own: a terminal's ctrl-C reaches us, and we stop the guest properly.
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=True,
            )  # fmt: skip
            console = _Console(stdout, stderr, verbose)
            try:
                run_state = _supervise(proc, listener, console, timeout, stop, stop_grace, verbose, stderr)
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
                for stream in (proc.stdout, proc.stderr):
                    if stream is not None:
                        stream.close()
    return _result(run_state, console, timeout)


@dataclass
class _RunState:
    timed_out: bool = False
    stopped: bool = False
    interrupted: bool = False
    before_start: bool = False  # the stop came before the workload started: the VM was just quit
    qemu_stderr: bytes = b""
    returncode: int | None = None


def _supervise(
    proc: subprocess.Popen[bytes],
    listener: socket.socket,
    console: _Console,
    timeout: float,
    stop: threading.Event | None,
    stop_grace: float,
    verbose: bool,
    stderr: TextIO,
) -> _RunState:
    state = _RunState()
    started = time.monotonic()
    deadline = started + timeout if math.isfinite(timeout) else math.inf
    qmp: Qmp | None = None
    stop_sent_at: float | None = None
    quit_sent_at: float | None = None
    last_data = started
    streams: dict[int, IO[bytes]] = {}
    selector = selectors.DefaultSelector()
    for name, stream in (("console", proc.stdout), ("qemu", proc.stderr)):
        assert stream is not None
        os.set_blocking(stream.fileno(), False)
        selector.register(stream, selectors.EVENT_READ, name)
        streams[stream.fileno()] = stream

    def qmp_execute(command: str, arguments: dict[str, Any] | None = None) -> None:
        nonlocal qmp
        try:
            if qmp is None:
                qmp = Qmp.accept(listener)
            qmp.execute(command, arguments)
        except (OSError, ToolError, ValueError) as exc:  # qemu may be gone already
            log.debug("QMP %s: %s", command, exc)

    def ask_to_stop() -> None:
        nonlocal stop_sent_at
        if stop_sent_at is None:
            stop_sent_at = time.monotonic()
            if not console.decoder.started:
                # Nobody to ask yet (and before the init disables it, ctrl-alt-delete reboots).
                state.before_start = True
                quit_vm()
                return
            log.debug("asking the guest to stop (ctrl-alt-delete)")
            qmp_execute("send-key", CTRL_ALT_DELETE)

    def quit_vm() -> None:
        nonlocal quit_sent_at
        if quit_sent_at is None:
            quit_sent_at = time.monotonic()
            log.debug("quitting qemu")
            qmp_execute("quit")

    try:
        while streams:
            try:
                now = time.monotonic()
                if stop_sent_at is None:
                    if now >= deadline:
                        state.timed_out = True
                        ask_to_stop()
                    elif stop is not None and stop.is_set():
                        state.stopped = True
                        ask_to_stop()
                if stop_sent_at is not None and now >= stop_sent_at + stop_grace:
                    quit_vm()
                if console.decoder.pending_exit is not None and now >= last_data + QUIT_AFTER_EXIT_MARKER:
                    quit_vm()  # the guest said it is done but did not power off
                if quit_sent_at is not None and now >= quit_sent_at + KILL_AFTER_QUIT:
                    proc.kill()

                wait = 0.25
                if stop_sent_at is None and math.isfinite(deadline):
                    wait = min(wait, max(deadline - now, 0.0))
                for key, _ in selector.select(wait):
                    stream = streams[key.fd]
                    data = os.read(key.fd, 65536)
                    if not data:
                        selector.unregister(stream)
                        del streams[key.fd]
                    elif key.data == "console":
                        last_data = time.monotonic()
                        console.feed(data)
                    else:
                        state.qemu_stderr = (state.qemu_stderr + data)[-8192:]
                        if verbose:
                            stderr.write(data.decode(errors="replace"))
                            stderr.flush()
            except KeyboardInterrupt:
                if state.interrupted:  # a second ctrl-C: no more patience
                    proc.kill()
                state.interrupted = True
                ask_to_stop()
        console.close()
    finally:
        selector.close()
        if qmp is not None:
            qmp.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
        state.returncode = proc.wait(timeout=KILL_AFTER_QUIT)
    return state


def _result(state: _RunState, console: _Console, timeout: float) -> BootResult:
    status = console.status
    if state.interrupted:
        raise Interrupted("interrupted: the VM was asked to stop, then shut down")
    if state.timed_out:
        if state.before_start:
            ended = "the workload had not started yet; the VM was quit"
        elif status is not None:
            ended = f"the guest was asked to stop and the workload exited with status {status}"
        else:
            ended = "the guest was asked to stop, then the VM was quit"
        return BootResult(EXIT_TIMEOUT, status, timed_out=True, message=f"timed out after {timeout:g}s; {ended}")
    if state.stopped:
        if status is None:
            why = "stopped before the workload started" if state.before_start else "the workload did not stop in time"
            return BootResult(EXIT_KILLED, None, stopped=True, message=why)
        return BootResult(status, status, stopped=True)
    if status is not None:
        if status == EXIT_NO_STATUS and console.init_errors and not console.decoder.started:
            return BootResult(
                status, None, message=f"the guest init failed before starting the workload: {console.init_errors[-1]}"
            )
        return BootResult(status, status)

    said = " | ".join(console.lines) or "nothing"
    qemu_said = " ".join(state.qemu_stderr.decode(errors="replace").split())
    message = (
        "the VM ended without reporting the workload's exit status (kernel panic, init failure, or qemu died"
        f"{'' if state.returncode is None else f', qemu exit {state.returncode}'}); last console lines: {said}"
    )
    if qemu_said:
        message += f"; qemu said: {qemu_said[-600:]}"
    return BootResult(EXIT_NO_STATUS, None, message=message)
