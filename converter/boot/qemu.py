"""``imgconv boot``: run a disk under qemu, stream the workload's output, return its exit status.

A pipeline of steps (:data:`BOOT`):

- ``open-disk``: the disk is checked as ``vm-to-oci`` checks it (:func:`converter.disk.safety.open_disk`: format
  from the magic; no backing file, data file or extent elsewhere; a regular file or block device), and refused
  the same way;
- ``prepare-overlay``: a throwaway qcow2 overlay (with no backing file of its own) and the guest's resolv.conf;
- ``prepare-run``: docker run's flags as the firmware config file the init reads, and ``--state`` checked or made;
- ``share-volumes``: a virtiofsd per ``-v`` (:mod:`converter.boot.volumes`);
- ``choose-firmware``: SeaBIOS, or OVMF for a UEFI-only disk (:mod:`converter.disk.uefi`);
- ``start-vm``: qemu gets the disk read-only, as the very file that was checked, in its checked format and
  with ``"backing": null`` (nothing the disk names is opened, even if it was rewritten since), under the
  overlay: the disk is never written;
- ``run-workload``: the serial console is qemu's stdout (a pipe), decoded by
  :class:`~converter.boot.console.ConsoleDecoder`; :mod:`converter.boot.supervise` stops the VM when asked,
  over a QMP socket (qemu connects to ours). Like ``docker run``, which makes a container's /etc/resolv.conf
  from the host's when it starts, the guest gets :func:`~converter.boot.resolv.host_resolv_conf`, as the QEMU
  firmware config file ``opt/imgconv/resolv.conf`` (the guest init bind-mounts it on /etc/resolv.conf).

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
import contextlib
import io
import json
import logging
import os
import shlex
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO, TextIO

from converter.boot.accel import QEMU, Accel, choose_accel
from converter.boot.console import ConsoleSink
from converter.boot.lifeline import die_with
from converter.boot.network import NETWORK_FW_CFG, USER_NETWORK, Network
from converter.boot.qmp import QmpLink
from converter.boot.resolv import RESOLV_CONF_FW_CFG, host_resolv_conf
from converter.boot.runspec import RUN_SPEC_FW_CFG, RunOverrides, encode_overrides
from converter.boot.sshkeys import SSH_FW_CFG, SshAccess
from converter.boot.state import open_state
from converter.boot.streams import PORT_NAME, STREAM_FW_CFG, Stdio, StreamLink, host_terminal
from converter.boot.supervise import Limits, Outcome, supervise
from converter.boot.volumes import Volume
from converter.boot.volumes import serve as serve_volumes
from converter.disk.safety import CREATE_TIMEOUT, SafeDisk, blockdev_node, open_disk, pinned
from converter.disk.uefi import Firmware, disk_firmware, firmware_args
from converter.errors import Interrupted
from converter.pipeline import Context, Pipeline, Slot, Step
from converter.progress import Monitor, NullMonitor, TextMonitor
from converter.run import require, run

log = logging.getLogger("imgconv.boot.qemu")

EXIT_TIMEOUT = 124
EXIT_NO_STATUS = 125
EXIT_KILLED = 137

_PURPOSE = "boot the VM"
DISK_NODE = "disk"
OVERLAY_NODE = "overlay"


@dataclass(frozen=True)
class BootResult:
    """How a boot ended. ``status`` is what ``imgconv boot`` exits with (see the module docstring)."""

    status: int
    workload_status: int | None = None  # from the guest's exit marker, even after a timeout or stop
    timed_out: bool = False
    stopped: bool = False
    message: str = ""  # why there is no workload status, or what the timeout did; empty otherwise


@dataclass(frozen=True)
class BootRequest:
    """What :func:`boot` was asked (see there)."""

    disk: Path
    limits: Limits
    memory_mib: int
    cpus: int
    verbose: bool
    stdout: BinaryIO
    stderr: TextIO
    direct_kernel: tuple[Path, Path, str] | None
    network: Network = USER_NETWORK
    overrides: RunOverrides = field(default_factory=RunOverrides)  # docker run's flags (converter.boot.runspec)
    state: Path | None = None  # --state FILE (converter.boot.state)
    volumes: tuple[Volume, ...] = ()  # -v (converter.boot.volumes)
    stdin: int | None = None  # -i: this descriptor is the workload's stdin (converter.boot.streams)
    ssh: SshAccess | None = None  # --ssh-key, --ssh-user (converter.boot.sshkeys)
    firmware: Firmware | None = None  # None: what the disk's partition table says (converter.disk.uefi)


@dataclass(frozen=True)
class Scratch:
    """The run's own files, removed when it ends."""

    overlay: Path
    qmp_socket: Path
    resolv_conf: Path
    network_conf: Path | None = None  # opt/imgconv/network for the guest init; None without a NIC
    stream_socket: Path | None = None  # the stream port's socket (converter.boot.streams)


@dataclass(frozen=True)
class GuestRun:
    """What this invocation runs on the disk: docker run's overrides and where its writes go."""

    run_spec: Path | None  # opt/imgconv/run.spec: the overrides; None without any
    state: SafeDisk | None  # --state FILE, checked: the overlay instead of the throwaway one
    ssh_keys: Path | None = None  # opt/imgconv/ssh: --ssh-user and --ssh-key's keys, for a system-mode guest


@dataclass(frozen=True)
class RunningVm:
    proc: subprocess.Popen[bytes]
    control: QmpLink
    stream: StreamLink | None


# ------------------------------------------------------------------------------- command line --


def _opt(value: str | Path) -> str:
    """A value inside a qemu ``-chardev``/``-fw_cfg`` option: commas are doubled."""
    return str(value).replace(",", ",,")


def drive_args(disk: SafeDisk, filename: Path, overlay: Path) -> list[str]:
    """The guest's one disk: *filename* (the checked disk) read-only under the writable qcow2 *overlay*, whose
    backing is given here rather than read from its header; the disk's node has ``"backing": null``."""
    top = {"driver": "qcow2", "node-name": OVERLAY_NODE, "backing": DISK_NODE,
           "file": {"driver": "file", "filename": str(overlay)}}
    return ["-blockdev", json.dumps(blockdev_node(disk, filename, DISK_NODE)), "-blockdev", json.dumps(top),
            "-device", f"virtio-blk-pci,drive={OVERLAY_NODE}"]


def qemu_argv(
    *,
    accel: Accel,
    drive: Sequence[str],
    memory_mib: int,
    cpus: int,
    direct_kernel: tuple[Path, Path, str] | None,
    qmp_socket: Path | None,
    resolv_conf: Path | None = None,
    network: Network | None = None,
    network_conf: Path | None = None,
    run_spec: Path | None = None,
    ssh_keys: Path | None = None,
    stream_socket: Path | None = None,
    volumes: Sequence[str] = (),
    firmware: Sequence[str] = (),
) -> list[str]:
    """The qemu command line; *drive* are the disk's arguments (:func:`drive_args`). Console on stdio (the
    serial port). *resolv_conf* is given to the guest as the firmware config file ``opt/imgconv/resolv.conf``.
    *network* adds its NIC (none without it: ``-nodefaults``), and *network_conf* is its settings for the guest
    init, the firmware config file ``opt/imgconv/network`` (:mod:`converter.boot.network`). *stream_socket* is the
    host end of the workload's stdio port (:mod:`converter.boot.streams`; qemu connects to it).
    """
    argv = [
        QEMU,
        "-machine", f"pc,accel={accel}",
        "-cpu", "host" if accel == "kvm" else "max",
        "-m", str(memory_mib),
        "-smp", str(cpus),
        "-nodefaults", "-display", "none", "-no-reboot",
        "-serial", "stdio",
        *firmware,  # -bios OVMF for a UEFI disk, nothing (SeaBIOS) otherwise: converter.disk.uefi.firmware_args
        *drive,
    ]  # fmt: skip
    if qmp_socket is not None:
        argv += ["-chardev", f"socket,id=qmp,path={_opt(qmp_socket)}", "-mon", "chardev=qmp,mode=control"]
    if resolv_conf is not None:
        argv += ["-fw_cfg", f"name={RESOLV_CONF_FW_CFG},file={_opt(resolv_conf)}"]
    if ssh_keys is not None:
        argv += ["-fw_cfg", f"name={SSH_FW_CFG},file={_opt(ssh_keys)}"]
    if run_spec is not None:  # docker run's overrides: data in a file, never on the kernel command line
        argv += ["-fw_cfg", f"name={RUN_SPEC_FW_CFG},file={_opt(run_spec)}"]
    if stream_socket is not None:
        argv += ["-device", "virtio-serial-pci,id=imgconv-serial",
                 "-chardev", f"socket,id=imgconv-stream,path={_opt(stream_socket)}",
                 "-device", f"virtserialport,bus=imgconv-serial.0,chardev=imgconv-stream,name={PORT_NAME}",
                 "-fw_cfg", f"name={STREAM_FW_CFG},string={PORT_NAME}"]
    if network is not None:
        argv += network.qemu_args()
    if network_conf is not None:
        argv += ["-fw_cfg", f"name={NETWORK_FW_CFG},file={_opt(network_conf)}"]
    argv += volumes  # -v: virtiofs devices and shared RAM (converter.boot.volumes.qemu_args)
    if direct_kernel is not None:
        kernel, initrd, append = direct_kernel
        argv += ["-kernel", str(kernel), "-initrd", str(initrd), "-append", append]
    return argv


def _print_command(request: BootRequest, accel: Accel, disk: SafeDisk, firmware: Sequence[str]) -> None:
    """The command a user can run again: the disk by its name, the overlay and the sockets left out."""
    shown = qemu_argv(accel=accel, drive=drive_args(disk, disk.path, Path("OVERLAY.qcow2")), firmware=firmware,
                      memory_mib=request.memory_mib, cpus=request.cpus, direct_kernel=request.direct_kernel,
                      qmp_socket=None, network=request.network)
    request.stderr.write(
        "imgconv: qemu command (imgconv ran it on a throwaway overlay, `qemu-img create -f qcow2 OVERLAY.qcow2 "
        f"{disk.virtual_size}`,\n"
        "imgconv:  the disk read-only through a descriptor of the file it checked, with a QMP socket and the\n"
        "imgconv:  host's DNS settings as docker passes them: -fw_cfg name=opt/imgconv/resolv.conf,file=...):\n"
        f"{shlex.join(shown)}\n"
    )
    request.stderr.flush()


# ---------------------------------------------------------------------------------- the steps --

REQUEST: Slot[BootRequest] = Slot("request")


def open_safely(ctx: Context) -> SafeDisk:
    require(QEMU, _PURPOSE)
    require("qemu-img", _PURPOSE)
    from converter.store.store import disk_input  # store:NAME[:TAG]: the version's file, kept from gc meanwhile

    return open_disk(ctx.enter(disk_input(ctx[REQUEST].disk)))


def prepare_overlay(ctx: Context) -> Scratch:
    tmp = Path(ctx.enter(tempfile.TemporaryDirectory(prefix="imgconv-boot-")))
    disk = ctx[open_safely]
    overlay = tmp / "overlay.qcow2"
    size = -(-disk.virtual_size // 512) * 512  # qcow2 sizes are whole sectors
    run(["qemu-img", "create", "-q", "-f", "qcow2", overlay, str(size)],
        purpose=f"create a throwaway overlay of {disk.path}", timeout=CREATE_TIMEOUT)
    resolv_conf = tmp / "resolv.conf"
    resolv_conf.write_bytes(host_resolv_conf())
    network_conf = None
    guest_network = ctx[REQUEST].network.guest_config()
    if guest_network is not None:
        network_conf = tmp / "network"
        network_conf.write_bytes(guest_network)
    return Scratch(overlay, tmp / "qmp.sock", resolv_conf, network_conf, tmp / "stream.sock")


def prepare_run(ctx: Context) -> GuestRun:
    """The overrides as the guest init reads them, and the --state file checked (or created)."""
    request, scratch = ctx[REQUEST], ctx[prepare_overlay]
    run_spec = None
    if not request.overrides.empty:
        run_spec = scratch.qmp_socket.with_name("run.spec")
        run_spec.write_bytes(encode_overrides(request.overrides))
    state = open_state(request.state, ctx[open_safely]) if request.state is not None else None
    ssh_keys = None
    if request.ssh is not None:
        ssh_keys = scratch.qmp_socket.with_name("ssh")
        ssh_keys.write_bytes(request.ssh.fw_cfg())
    return GuestRun(run_spec, state, ssh_keys)


@contextlib.contextmanager
def _qemu_process(argv: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    log.debug("run: %s", shlex.join(argv))
    # A session of its own: a terminal's ctrl-C reaches us, and we stop the guest properly. It dies with us, even
    # when we are SIGKILLed (converter.boot.lifeline).
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, preexec_fn=die_with(os.getpid()))
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _top(ctx: Context, guest: GuestRun) -> Path:
    """The guest's writable layer: the --state file (through a descriptor of the file checked), or a throwaway."""
    return ctx[prepare_overlay].overlay if guest.state is None else ctx.enter(pinned(guest.state))


def start_vm(ctx: Context) -> RunningVm:
    request, disk, scratch = ctx[REQUEST], ctx[open_safely], ctx[prepare_overlay]
    accel = choose_accel()
    guest = ctx[prepare_run]
    checked = ctx.enter(pinned(disk))
    firmware = ctx[choose_firmware]
    argv = qemu_argv(
        accel=accel, drive=drive_args(disk, checked, _top(ctx, guest)), firmware=firmware,
        memory_mib=request.memory_mib, cpus=request.cpus, direct_kernel=request.direct_kernel,
        qmp_socket=scratch.qmp_socket, resolv_conf=scratch.resolv_conf,
        run_spec=guest.run_spec, ssh_keys=guest.ssh_keys, stream_socket=scratch.stream_socket,
        volumes=ctx[share_volumes],
        network=request.network, network_conf=scratch.network_conf,
    )  # fmt: skip
    if request.verbose:
        _print_command(request, accel, disk, firmware)
    qmp = _listen(ctx, scratch.qmp_socket)
    stream = ctx.enter(contextlib.closing(StreamLink(_listen(ctx, scratch.stream_socket), _stdio(request))))
    proc = ctx.enter(_qemu_process(argv))
    return RunningVm(proc, ctx.enter(contextlib.closing(QmpLink(qmp))), stream)


def choose_firmware(ctx: Context) -> list[str]:
    """qemu's firmware arguments: as asked, else what the disk's partition table says (OVMF for a UEFI-only disk,
    read from the checked file; converter.disk.uefi)."""
    request, disk = ctx[REQUEST], ctx[open_safely]
    if request.firmware is not None:
        return firmware_args(request.firmware)
    return firmware_args(disk_firmware(disk, ctx.enter(pinned(disk)), ctx[prepare_overlay].qmp_socket.parent))


def share_volumes(ctx: Context) -> list[str]:
    """``-v``: a virtiofsd per volume, listening before qemu starts; qemu's arguments for them (none without)."""
    request, scratch = ctx[REQUEST], ctx[prepare_overlay]
    if not request.volumes:
        return []
    return ctx.enter(serve_volumes(request.volumes, scratch.qmp_socket.parent, request.memory_mib))


def _listen(ctx: Context, path: Path | None) -> socket.socket:
    """A unix socket qemu connects to (``-chardev socket,path=...``): ours, so no other process can take it."""
    listener = ctx.enter(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
    listener.bind(str(path))
    listener.listen(1)
    return listener


class _TextBytes(io.RawIOBase):
    """Bytes onto a text stream (a caller's ``io.StringIO`` for stderr), decoded as they come."""

    def __init__(self, text: TextIO) -> None:
        super().__init__()
        self._text = text
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self._text.write(self._decoder.decode(bytes(data)))
        return len(data)

    def flush(self) -> None:
        self._text.flush()


def _stdio(request: BootRequest) -> Stdio:
    """The workload's streams: stdout as given, stderr as bytes onto the caller's stderr."""
    stderr: BinaryIO = getattr(request.stderr, "buffer", None) or io.BufferedWriter(_TextBytes(request.stderr))
    return Stdio(request.stdout, stderr, request.stdin, request.overrides.tty_size is not None)


def run_workload(ctx: Context) -> BootResult:
    request, vm = ctx[REQUEST], ctx[start_vm]
    console = ConsoleSink(request.stdout, request.stderr, request.verbose)
    with host_terminal(vm.stream, request.overrides.interactive):
        outcome = supervise(vm.proc, vm.control, console, request.limits,
                            request.stderr if request.verbose else None, vm.stream)
    request.stderr.flush()
    result = _result(outcome, console, request.limits.timeout)
    wanted = [flag for flag, on in (("-i", request.overrides.interactive),
                                    ("-t", request.overrides.tty_size is not None),
                                    ("-v", bool(request.volumes))) if on]  # an init without the hello lacks volumes.h
    if wanted and vm.stream is not None and not vm.stream.hello and console.decoder.started:
        return BootResult(EXIT_NO_STATUS, result.workload_status, message=(
            f"{' and '.join(wanted)} need a disk made by a newer imgconv (its init relays stdio over a port and "
            "mounts volumes); "
            "convert the image again"))
    return result


BOOT: Pipeline[BootResult] = Pipeline(
    "boot",
    (
        Step("open-disk", "checking the disk", open_safely, needs=(REQUEST,)),
        Step("prepare-overlay", "preparing a throwaway overlay", prepare_overlay, needs=(REQUEST, open_safely)),
        Step("prepare-run", "preparing the run's options and state", prepare_run,
             needs=(REQUEST, open_safely, prepare_overlay)),
        Step("share-volumes", "sharing the volumes", share_volumes, needs=(REQUEST, prepare_overlay)),
        Step("choose-firmware", "choosing the firmware", choose_firmware,
             needs=(REQUEST, open_safely, prepare_overlay)),
        Step("start-vm", "starting the VM", start_vm,
             needs=(REQUEST, open_safely, prepare_overlay, prepare_run, share_volumes, choose_firmware)),
        Step("run-workload", "running the workload", run_workload, needs=(REQUEST, start_vm)),
    ),
    result=run_workload,
    given=(REQUEST,),
)


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
    monitor: Monitor | None = None,
    overrides: RunOverrides | None = None,
    state: Path | None = None,
    network: Network | None = None,
    volumes: Sequence[Volume] = (),
    stdin: int | None = None,
    firmware: Firmware | None = None,
    ssh: SshAccess | None = None,
) -> BootResult:
    """Boot *disk* (checked as ``vm-to-oci`` checks disks; never written), stream the workload's output to
    *stdout* as it comes, and return how it ended (statuses in the module docstring).

    *timeout* (seconds, from qemu's start; ``math.inf`` for none) and *stop* (an event another
    thread sets) both ask the guest to stop gracefully (the workload gets SIGTERM) and quit the VM
    after *stop_grace* seconds. *direct_kernel* = ``(kernel, initrd, append)`` boots that kernel
    instead of the disk's bootloader. With *verbose*, the qemu command line and everything on the
    console before the workload starts go to *stderr*. Nothing else is printed (the steps go to *monitor*:
    by default nowhere, or a :class:`TextMonitor` on *stderr* with *verbose*): why a boot ended
    without the workload's own status is in :attr:`BootResult.message`.
    Ctrl-C (KeyboardInterrupt) stops the guest the same way, then raises :class:`Interrupted`.
    *overrides* are ``docker run``'s command, entrypoint, env, workdir, user and hostname
    (:mod:`converter.boot.runspec`); *state* keeps the guest's writes in that qcow2 (:mod:`converter.boot.state`)
    instead of throwing them away.
    *network* is the guest's (:mod:`converter.boot.network`); by default QEMU's user network, as Docker's
    default bridge.
    *volumes* are ``-v``'s shared host directories (:mod:`converter.boot.volumes`).
    The workload's stdout and stderr reach *stdout* and *stderr* apart, byte-exact, over a virtio-serial port
    (:mod:`converter.boot.streams`); with *stdin* (a descriptor: ``-i``) its stdin is that.
    *firmware* is SeaBIOS or OVMF (:mod:`converter.disk.uefi`); by default what the disk's partition table says.
    *ssh* authorises keys in a system-mode guest (:mod:`converter.boot.sshkeys`).
    """
    request = BootRequest(disk, Limits(timeout, stop, stop_grace), memory_mib, cpus, verbose, stdout, stderr,
                          direct_kernel, network if network is not None else USER_NETWORK)
    request = replace(request, overrides=overrides or RunOverrides(), state=state, volumes=tuple(volumes),
                      stdin=stdin, firmware=firmware, ssh=ssh)
    if monitor is None:
        monitor = TextMonitor(stderr) if verbose else NullMonitor()
    try:
        return BOOT.run(monitor, request=request)
    except KeyboardInterrupt as exc:  # before the VM ran (while it runs, ctrl-C is a stop request)
        raise Interrupted("interrupted before the VM started; nothing was left behind") from exc


# ---------------------------------------------------------------------------------- the result --


def _result(state: Outcome, console: ConsoleSink, timeout: float) -> BootResult:
    status = console.status
    if status is None and console.powered_off:
        status = 0  # a system-mode guest that powered off: a machine's clean end
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
