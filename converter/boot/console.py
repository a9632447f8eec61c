"""Turn the guest's serial console back into the workload's output and exit status.

The guest init (``init/init.c``) writes, on the console:

- ``<<imgconv:start>>\\n`` right before it starts the workload. Everything before it (SeaBIOS,
  bootloader, kernel, init errors) is *firmware* text.
- the workload's stdout and stderr bytes, unchanged;
- at the end, ``<<imgconv:exit status=N>>\\n`` right after the workload's last byte, in the middle
  of a line if that is where the output stopped: nothing is added to the output. A failure of the
  init before the workload starts prints an ``imgconv-init: error: ...`` line and the exit marker
  with status 125, without a start marker.

The serial tty turns every ``\\n`` into ``\\r\\n`` (ONLCR) and is left that way, so that a console
watched by a person looks right; :class:`ConsoleDecoder` undoes it by turning every ``\\r\\n`` into
``\\n``, which inverts ONLCR exactly. A workload can print text that looks like an exit marker: only
a marker that nothing follows counts, so a complete marker is held back until more bytes come
(then it was output) or the console closes (then it is the exit), and so is a trailing part of a
line that could still become one (``<<imgconv:ex``). Nothing else is held back, newlines included:
a server that prints ``listening\\n`` and waits shows that line at once. The init silences the
kernel before it prints the real marker, so that nothing follows it; should a kernel still print
its power-off lines (``[    2.1] reboot: Power down``) after the marker, they are firmware, not
output.

Disks made by an older imgconv print ``<<imgconv:exit status=N nl=0|1>>\\n`` at a line start,
after a newline of their own when the output did not end with one (``nl=1``). Their status is
read the same way; that added newline then stays in the output.
"""

from __future__ import annotations

import codecs
import collections
import re
from dataclasses import dataclass
from typing import BinaryIO, TextIO

START_MARKER = b"<<imgconv:start>>\n"
# A system-mode disk (oci-to-qcow2 --init system): the image's init system takes over; from here the console is
# the machine's console, shown as output, and the run ends when the guest powers off.
SYSTEM_MARKER = b"<<imgconv:system>>\n"
POWER_DOWN = b"reboot: Power down"  # the kernel's last line (KERN_EMERG) when the guest powers off
_STATUS = rb"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_EXIT_RE = re.compile(rb"<<imgconv:exit status=" + _STATUS + rb"(?: nl=[01])?>>")
# What a kernel may print while powering off, with or without printk timestamps.
_KERNEL_LINES_RE = re.compile(rb"(?:(?:\[[ 0-9.]*\] |reboot: )[^\n]*\n)*")
_KERNEL_PARTIAL_RE = re.compile(rb"\[[ 0-9.]*(?:\](?: [^\n]*)?)?|reboot: [^\n]*|r(?:e(?:b(?:o(?:o(?:t:?)?)?)?)?)?")
_MAX_TRAILER = 4096
TAIL_LINES = 12
INIT_ERROR = "imgconv-init: error: "


def _kernel_trailer(text: bytes, *, complete: bool) -> bool:
    """*text* is only kernel lines (the last one possibly cut, unless *complete*)."""
    if len(text) > _MAX_TRAILER:
        return False
    rest = text[_KERNEL_LINES_RE.match(text).end() :]  # type: ignore[union-attr]  # matches empty
    return not rest or (not complete and _KERNEL_PARTIAL_RE.fullmatch(rest) is not None)


def _after_marker(rest: bytes, *, complete: bool) -> bytes | None:
    """The kernel text after an exit marker's own newline, if *rest* (what follows the marker) is
    only that; None if anything else follows, which makes the marker workload output.

    With *complete* false, *rest* may still grow (the newline or a kernel line not there yet).
    """
    if not rest:
        return b""
    if not rest.startswith(b"\n"):
        return None
    return rest[1:] if _kernel_trailer(rest[1:], complete=complete) else None


def _exit_markers() -> frozenset[bytes]:
    return frozenset(
        b"<<imgconv:exit status=%d%s>>" % (status, nl) for status in range(256) for nl in (b"", b" nl=0", b" nl=1")
    )


_EXIT_MARKERS = _exit_markers()
_EXIT_PREFIXES = frozenset(marker[:i] for marker in _EXIT_MARKERS for i in range(1, len(marker)))
_LONGEST_PREFIX = max(map(len, _EXIT_PREFIXES))


@dataclass(frozen=True)
class Firmware:
    """Console text that is not the workload's (CRLF undone): before the start, power-off noise after the exit."""

    data: bytes


@dataclass(frozen=True)
class Output:
    """Bytes the workload wrote to stdout or stderr, exactly."""

    data: bytes


@dataclass(frozen=True)
class Exit:
    """The workload's exit status, as reported by the init (only ever the last event)."""

    status: int


Event = Firmware | Output | Exit


class ConsoleDecoder:
    """Streamed decoder of the console byte stream: :meth:`feed` chunks as they come, then :meth:`close`.

    Output is emitted as it arrives; what is held back is at most a trailing ``\\r`` (half of a
    CRLF), a trailing part of a possible exit marker, or a complete exit marker with only kernel
    lines after it.
    """

    def __init__(self) -> None:
        self._started = False
        self.system = False  # the system marker started it: the image's init system runs
        self._cr = False  # the last chunk ended in "\r": it may pair with a "\n"
        self._tail = b""  # decoded bytes not yet emitted
        self._closed = False

    @property
    def started(self) -> bool:
        """The start marker has been seen: the workload is running."""
        return self._started

    @property
    def pending_exit(self) -> int | None:
        """The status of an exit marker that ends the stream so far, if one does.

        It becomes final at :meth:`close`; more bytes would make it workload output.
        """
        m = _EXIT_RE.match(self._tail)
        if m is None or _after_marker(self._tail[m.end() :], complete=True) is None:
            return None
        return int(m.group(1))

    def feed(self, chunk: bytes) -> list[Event]:
        if self._closed:
            raise ValueError("feed() after close()")
        data = (b"\r" if self._cr else b"") + chunk
        self._cr = data.endswith(b"\r")
        if self._cr:
            data = data[:-1]
        return self._process(data.replace(b"\r\n", b"\n"))

    def close(self) -> list[Event]:
        """End of the console: flush what was held back and say how the workload ended, if it did."""
        if self._closed:
            return []
        self._closed = True
        text = self._tail + (b"\r" if self._cr else b"")
        self._tail, self._cr = b"", False
        events: list[Event] = []
        m = _EXIT_RE.match(text)
        rest = text[m.end() :] if m else b""
        # A marker whose newline the power-off cut (after its "\r") still counts.
        trailer = b"" if rest == b"\r" else _after_marker(rest, complete=False)
        if m is None or trailer is None:
            self._emit(events, text)
            return events
        if trailer:
            events.append(Firmware(trailer))
        events.append(Exit(int(m.group(1))))
        return events

    # ----------------------------------------------------------------------------------------

    def _process(self, decoded: bytes) -> list[Event]:
        events: list[Event] = []
        text = self._tail + decoded
        if not self._started:
            found = [(at, marker) for marker in (START_MARKER, SYSTEM_MARKER) if (at := text.find(marker)) >= 0]
            if not found:
                hold = min(self._hold(text), self._start_prefix_hold(text))
                self._emit(events, text[:hold])
                self._tail = text[hold:]
                return events
            at, marker = min(found)
            self._emit(events, text[:at])
            self._started = True
            self.system = marker == SYSTEM_MARKER
            text = text[at + len(marker) :]
        hold = self._hold(text)
        self._emit(events, text[:hold])
        self._tail = text[hold:]
        return events

    def _emit(self, events: list[Event], data: bytes) -> None:
        if data:
            events.append(Output(data) if self._started else Firmware(data))

    @staticmethod
    def _hold(text: bytes) -> int:
        """Index from which *text* must wait: the last exit marker if only kernel lines follow it,
        else the longest end of *text* that could still become one."""
        last = None
        for last in _EXIT_RE.finditer(text):  # noqa: B007 - only the last one can be the exit
            pass
        if last is not None and _after_marker(text[last.end() :], complete=False) is not None:
            return last.start()
        for size in range(min(_LONGEST_PREFIX, len(text)), 0, -1):
            if text[-size:] in _EXIT_PREFIXES:
                return len(text) - size
        return len(text)

    @staticmethod
    def _start_prefix_hold(text: bytes) -> int:
        """Index from which firmware text must wait: a trailing part of a start marker."""
        for size in range(min(len(SYSTEM_MARKER) - 1, len(text)), 0, -1):
            if text.endswith(START_MARKER[:size]) or text.endswith(SYSTEM_MARKER[:size]):
                return len(text) - size
        return len(text)


class ConsoleSink:
    """Where the decoded console goes: the workload's output to *stdout* as it comes, the firmware text to *stderr*
    when *verbose*; kept for the end: the exit status, the last console lines and the init's error lines."""

    def __init__(self, stdout: BinaryIO, stderr: TextIO, verbose: bool) -> None:
        self.stdout, self.stderr, self.verbose = stdout, stderr, verbose
        self.decoder = ConsoleDecoder()
        self.status: int | None = None
        self.lines: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.init_errors: list[str] = []
        self._system_tail = b""  # a system-mode guest's last console bytes: did it power off?
        self._text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._partial = ""

    def feed(self, chunk: bytes) -> None:
        self._handle(self.decoder.feed(chunk))

    def close(self) -> None:
        self._handle(self.decoder.close())
        if self._partial:
            self._line(self._partial)

    def _handle(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, Output):
                self.stdout.write(event.data)
                self.stdout.flush()
                if self.decoder.system:
                    self._system_tail = (self._system_tail + event.data)[-512:]
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

    @property
    def powered_off(self) -> bool:
        """A system-mode guest powered off (its init system shut it down): the kernel said so last."""
        return self.decoder.system and POWER_DOWN in self._system_tail[-256:]

    def _line(self, line: str) -> None:
        line = line.rstrip("\r")
        if line.strip():
            self.lines.append(line)
        if line.startswith(INIT_ERROR):
            self.init_errors.append(line.removeprefix(INIT_ERROR))
