"""The boot supervisor's state machine, driven by hand: time passed in, console bytes fed, QMP commands recorded.
(The integration tests boot real VMs through it: tests/integration/test_guest_init.py.)"""

from __future__ import annotations

import io
import math
import threading
from typing import Any

from converter.boot.console import ConsoleSink
from converter.boot.qemu import BOOT
from converter.boot.qmp import CTRL_ALT_DELETE
from converter.boot.supervise import (
    KILL_AFTER_QUIT,
    POLL,
    PRESS_AGAIN,
    QUIT_AFTER_EXIT_MARKER,
    Limits,
    Phase,
    Supervisor,
)

START = b"[    1.0] Run /init as init process\r\n<<imgconv:start>>\r\n"


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any] | None]] = []
        self.kills = 0

    def send(self, command: str, arguments: dict[str, Any] | None = None) -> None:
        self.sent.append((command, arguments))

    def kill(self) -> None:
        self.kills += 1


def supervisor(timeout: float = math.inf, stop: threading.Event | None = None,
               grace: float = 10.0) -> tuple[Supervisor, Recorder, io.BytesIO]:
    out = io.BytesIO()
    vm = Recorder()
    sink = ConsoleSink(out, io.StringIO(), verbose=False)
    return Supervisor(sink, vm, vm.kill, Limits(timeout, stop, grace), started=0.0), vm, out


def test_boot_steps_have_stable_ids() -> None:
    assert BOOT.step_ids == ("open-disk", "prepare-overlay", "prepare-run", "share-volumes", "choose-firmware",
                             "start-vm", "run-workload")


def test_a_workload_that_ends_by_itself_is_left_alone() -> None:
    sup, vm, out = supervisor(timeout=100)
    sup.console_data(START + b"hello\r\n", 1.0)
    sup.tick(2.0)
    assert sup.phase is Phase.RUNNING and vm.sent == []
    sup.console_data(b"<<imgconv:exit status=0>>\r\n", 3.0)
    assert sup.phase is Phase.EXIT_MARKER_SEEN
    sup.tick(3.0 + QUIT_AFTER_EXIT_MARKER - 0.1)
    assert vm.sent == [] and out.getvalue() == b"hello\n"


def test_an_exit_marker_without_a_power_off_is_quit() -> None:
    sup, vm, _ = supervisor()
    sup.console_data(START + b"<<imgconv:exit status=3>>\r\n", 1.0)
    sup.tick(1.0 + QUIT_AFTER_EXIT_MARKER)
    assert sup.phase is Phase.QUITTING and vm.sent == [("quit", None)]
    sup.tick(1.0 + QUIT_AFTER_EXIT_MARKER + KILL_AFTER_QUIT)
    assert sup.phase is Phase.KILLED and vm.kills == 1


def test_an_exit_marker_followed_by_output_was_output() -> None:
    sup, vm, _ = supervisor()
    sup.console_data(START + b"<<imgconv:exit status=3>>", 1.0)
    assert sup.phase is Phase.EXIT_MARKER_SEEN
    sup.console_data(b" and more\r\n", 2.0)
    assert sup.phase is Phase.RUNNING
    sup.tick(10.0)
    assert vm.sent == []


def test_a_timeout_asks_the_guest_to_stop_then_quits_after_the_grace() -> None:
    sup, vm, _ = supervisor(timeout=5, grace=2)
    sup.console_data(START, 1.0)
    assert sup.wait_time(4.9) < POLL
    sup.tick(5.0)
    assert sup.phase is Phase.STOP_REQUESTED and sup.outcome.timed_out
    assert vm.sent == [("send-key", CTRL_ALT_DELETE)]
    sup.tick(6.9)
    assert len(vm.sent) == 1
    sup.tick(7.0)
    assert sup.phase is Phase.QUITTING and vm.sent[-1] == ("quit", None)


def test_a_stop_before_the_workload_starts_quits_at_once() -> None:
    """Nobody to ask yet, and ctrl-alt-delete would reboot the guest."""
    stop = threading.Event()
    sup, vm, _ = supervisor(stop=stop)
    sup.console_data(b"SeaBIOS\r\n", 0.5)
    stop.set()
    sup.tick(1.0)
    assert sup.outcome.stopped and sup.outcome.before_start
    assert sup.phase is Phase.QUITTING and vm.sent == [("quit", None)]


def test_ctrl_c_twice_kills() -> None:
    sup, vm, _ = supervisor()
    sup.console_data(START, 1.0)
    sup.interrupt(2.0)
    assert sup.phase is Phase.STOP_REQUESTED and sup.outcome.interrupted and vm.kills == 0
    sup.interrupt(2.5)
    assert sup.phase is Phase.KILLED and vm.kills == 1
    assert vm.sent == [("send-key", CTRL_ALT_DELETE)]  # asked once


def test_a_stop_after_the_exit_marker_keeps_waiting_for_the_power_off() -> None:
    stop = threading.Event()
    sup, vm, _ = supervisor(stop=stop, grace=30)
    sup.console_data(START + b"<<imgconv:exit status=0>>\r\n", 1.0)
    stop.set()
    sup.tick(1.5)
    assert sup.phase is Phase.EXIT_MARKER_SEEN and sup.outcome.stopped
    assert vm.sent == [("send-key", CTRL_ALT_DELETE)]  # as for any stop: the guest may still be shutting down
    sup.tick(1.0 + QUIT_AFTER_EXIT_MARKER)
    assert sup.phase is Phase.QUITTING


def test_a_system_guest_is_asked_with_the_power_button_until_it_goes() -> None:
    """An init system hears the button only once it listens: a press lost early in its boot is repeated every
    PRESS_AGAIN seconds; the VM is quit after the grace as for a container."""
    sup, vm, out = supervisor(grace=12)
    sup.console_data(b"SeaBIOS\r\n<<imgconv:system>>\r\nWelcome\r\n", 1.0)
    sup.interrupt(2.0)
    assert vm.sent == [("system_powerdown", None)] and sup.phase is Phase.STOP_REQUESTED
    sup.tick(2.0 + PRESS_AGAIN - 0.1)
    assert len(vm.sent) == 1
    sup.tick(2.0 + PRESS_AGAIN)
    sup.tick(2.0 + 2 * PRESS_AGAIN)
    assert vm.sent == [("system_powerdown", None)] * 3
    sup.tick(14.0)
    assert sup.phase is Phase.QUITTING and vm.sent[-1] == ("quit", None)
    assert out.getvalue() == b"Welcome\n"
