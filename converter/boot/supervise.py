"""Watch a running VM until qemu is gone: its console streamed as it comes, and a stop when one is due.

How a boot is stopped is a small state machine (:class:`Supervisor`), driven by the clock and by what the
console says; a loop (:func:`supervise`) feeds it qemu's two pipes and the user's ctrl-C:

- ``RUNNING``: the guest boots or the workload runs; nothing was asked of it.
- ``STOP_REQUESTED``: the timeout expired, a stop was requested or ctrl-C was pressed: ctrl-alt-delete was sent
  over QMP (the guest init turns it into SIGTERM for the workload). If the workload has not started yet there is
  nobody to ask (and ctrl-alt-delete would reboot), so the VM is quit at once instead.
- ``EXIT_MARKER_SEEN``: the guest reported the workload's exit status and should power off by itself.
- ``QUITTING``: QMP ``quit`` was sent: the grace period after a stop request passed, or the guest stayed silent
  for :data:`QUIT_AFTER_EXIT_MARKER` seconds after its exit marker without powering off.
- ``KILLED``: qemu was still there :data:`KILL_AFTER_QUIT` seconds after ``quit``, or ctrl-C came twice.

Whatever the phase, the loop runs until qemu has closed both pipes.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import os
import selectors
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any, Protocol, TextIO

from converter.boot.console import ConsoleSink
from converter.boot.qmp import CTRL_ALT_DELETE
from converter.boot.streams import StreamLink

log = logging.getLogger("imgconv.boot.supervise")

QUIT_AFTER_EXIT_MARKER = 3.0  # the guest powers off right after its exit marker; if it hangs, quit
KILL_AFTER_QUIT = 5.0
# A system-mode guest hears the power button only once its init system listens (logind, late in a boot): a press
# before that is lost, as on a machine, so it is pressed again this often until the guest is gone.
PRESS_AGAIN = 5.0
POLL = 0.25
STDERR_KEPT = 8192


class Phase(enum.Enum):
    RUNNING = "running"
    STOP_REQUESTED = "stop requested"
    EXIT_MARKER_SEEN = "exit marker seen"
    QUITTING = "quitting"
    KILLED = "killed"


@dataclass(frozen=True)
class Limits:
    """When to stop: *timeout* seconds after the start (``math.inf``: never), or when *stop* is set; then quit
    the VM *stop_grace* seconds later if the workload has not ended."""

    timeout: float
    stop: threading.Event | None = None
    stop_grace: float = 10.0


@dataclass
class Outcome:
    """How the run went, for the result: why it was stopped, and what qemu said."""

    timed_out: bool = False
    stopped: bool = False
    interrupted: bool = False
    before_start: bool = False  # the stop came before the workload started: the VM was just quit
    qemu_stderr: bytes = b""
    returncode: int | None = None


class Control(Protocol):
    """What the supervisor needs of the VM's QMP connection."""

    def send(self, command: str, arguments: dict[str, Any] | None = None) -> None: ...


class Supervisor:
    """The state machine (module docstring). Time comes in as *now*: nothing here reads a clock or a pipe."""

    def __init__(self, console: ConsoleSink, control: Control, kill: Callable[[], None], limits: Limits,
                 started: float) -> None:
        self.console, self.control, self.kill, self.limits = console, control, kill, limits
        self.phase = Phase.RUNNING
        self.outcome = Outcome()
        self.deadline = started + limits.timeout if math.isfinite(limits.timeout) else math.inf
        self.last_output = started
        self.stop_asked_at: float | None = None
        self.pressed_at: float | None = None  # the power button, last (system mode)
        self.quit_at: float | None = None

    # -- events -------------------------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """The clock moved: start a stop that is due, and escalate one that is taking too long."""
        if self.stop_asked_at is None:
            if now >= self.deadline:
                self.outcome.timed_out = True
                self._request_stop(now)
            elif self.limits.stop is not None and self.limits.stop.is_set():
                self.outcome.stopped = True
                self._request_stop(now)
        if self.pressed_at is not None and self.phase is Phase.STOP_REQUESTED and now >= self.pressed_at + PRESS_AGAIN:
            self._press_power_button(now)
        if self.stop_asked_at is not None and now >= self.stop_asked_at + self.limits.stop_grace:
            self._quit(now)
        if self.phase is Phase.EXIT_MARKER_SEEN and now >= self.last_output + QUIT_AFTER_EXIT_MARKER:
            self._quit(now)  # the guest said it is done but did not power off
        if self.phase is Phase.QUITTING and self.quit_at is not None and now >= self.quit_at + KILL_AFTER_QUIT:
            self._kill()

    def console_data(self, data: bytes, now: float) -> None:
        self.last_output = now
        self.console.feed(data)
        marker = self.console.decoder.pending_exit is not None
        if marker and self.phase in (Phase.RUNNING, Phase.STOP_REQUESTED):
            self.phase = Phase.EXIT_MARKER_SEEN
        elif not marker and self.phase is Phase.EXIT_MARKER_SEEN:  # more came: the marker was output after all
            self.phase = Phase.RUNNING if self.stop_asked_at is None else Phase.STOP_REQUESTED

    def interrupt(self, now: float) -> None:
        """Ctrl-C: stop the guest as a stop request would; a second one kills qemu."""
        if self.outcome.interrupted:
            self._kill()
        self.outcome.interrupted = True
        self._request_stop(now)

    def wait_time(self, now: float) -> float:
        """How long the loop may wait for output before the next :meth:`tick` is due."""
        if self.stop_asked_at is None and math.isfinite(self.deadline):
            return min(POLL, max(self.deadline - now, 0.0))
        return POLL

    # -- transitions --------------------------------------------------------------------------------------------

    def _request_stop(self, now: float) -> None:
        if self.stop_asked_at is not None:
            return
        self.stop_asked_at = now
        if not self.console.decoder.started:
            # Nobody to ask yet (and before the init disables it, ctrl-alt-delete reboots).
            self.outcome.before_start = True
            self._quit(now)
            return
        if self.console.decoder.system:  # the image's init system: the ACPI power button, as a machine's
            self._press_power_button(now)
        else:
            log.debug("asking the guest to stop (ctrl-alt-delete)")
            self.control.send("send-key", CTRL_ALT_DELETE)
        if self.phase is Phase.RUNNING:
            self.phase = Phase.STOP_REQUESTED

    def _press_power_button(self, now: float) -> None:
        log.debug("asking the guest to stop (power button)")
        self.pressed_at = now
        self.control.send("system_powerdown")

    def _quit(self, now: float) -> None:
        if self.quit_at is not None:
            return
        self.quit_at = now
        self.phase = Phase.QUITTING
        log.debug("quitting qemu")
        self.control.send("quit")

    def _kill(self) -> None:
        log.debug("killing qemu")
        self.phase = Phase.KILLED
        self.kill()


# -- the loop -------------------------------------------------------------------------------------------------------


class _Pipes:
    """qemu's stdout (the serial console) and stderr, read without blocking as they come, until both close; and
    the stream port's socket (:mod:`converter.boot.streams`), accepted when qemu connects, read until it closes."""

    def __init__(self, proc: subprocess.Popen[bytes], stream: StreamLink | None) -> None:
        self._selector = selectors.DefaultSelector()
        self._streams: dict[int, IO[bytes] | socket.socket] = {}
        self._stream = stream
        for name, pipe in (("console", proc.stdout), ("qemu", proc.stderr)):
            assert pipe is not None  # Popen(stdout=PIPE, stderr=PIPE)
            os.set_blocking(pipe.fileno(), False)
            self._selector.register(pipe, selectors.EVENT_READ, name)
            self._streams[pipe.fileno()] = pipe
        if stream is not None:
            self._selector.register(stream, selectors.EVENT_READ, "listener")

    @property
    def open(self) -> bool:
        return bool(self._streams)

    def read(self, wait: float) -> Iterator[tuple[str, bytes]]:
        for key, _ in self._selector.select(wait):
            if key.data == "listener":
                assert self._stream is not None
                self._selector.unregister(self._stream)
                conn = self._stream.accept()
                self._selector.register(conn, selectors.EVENT_READ, "stream")
                self._streams[conn.fileno()] = conn
                continue
            try:
                data = os.read(key.fd, 65536)
            except ConnectionResetError:
                data = b""
            if not data:
                self._selector.unregister(self._streams.pop(key.fd))
            else:
                yield key.data, data

    def close(self) -> None:
        self._selector.close()


def supervise(proc: subprocess.Popen[bytes], control: Control, console: ConsoleSink, limits: Limits,
              verbose_to: TextIO | None, stream: StreamLink | None = None) -> Outcome:
    """Run *proc* (qemu) to its end, its console into *console*, its stderr kept (and copied to *verbose_to*),
    the workload's stdio through *stream*."""
    supervisor = Supervisor(console, control, proc.kill, limits, time.monotonic())
    outcome = supervisor.outcome
    pipes = _Pipes(proc, stream)
    try:
        while pipes.open:
            try:
                now = time.monotonic()
                supervisor.tick(now)
                if stream is not None:
                    stream.tick()
                for name, data in pipes.read(supervisor.wait_time(now)):
                    if name == "stream":
                        assert stream is not None
                        stream.data(data)
                        continue
                    if name == "console":
                        supervisor.console_data(data, time.monotonic())
                        continue
                    outcome.qemu_stderr = (outcome.qemu_stderr + data)[-STDERR_KEPT:]
                    if verbose_to is not None:
                        verbose_to.write(data.decode(errors="replace"))
                        verbose_to.flush()
            except KeyboardInterrupt:
                supervisor.interrupt(time.monotonic())
        console.close()
    finally:
        pipes.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
        outcome.returncode = proc.wait(timeout=KILL_AFTER_QUIT)
    return outcome
