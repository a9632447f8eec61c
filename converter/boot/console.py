"""Turn the guest's serial console back into the workload's output and exit status.

The guest init (``init/init.c``) writes, on the console:

- ``<<imgconv:start>>\\n`` right before it starts the workload. Everything before it (SeaBIOS,
  bootloader, kernel, init errors) is *firmware* text.
- the workload's stdout and stderr bytes, unchanged;
- at the end, ``<<imgconv:exit status=N nl=1>>\\n`` preceded by one extra ``\\n`` if the workload's
  last byte was not a newline (so that the marker starts a line), else
  ``<<imgconv:exit status=N nl=0>>\\n``. A failure of the init before the workload starts prints an
  ``imgconv-init: error: ...`` line and the exit marker with status 125, without a start marker.

The serial tty turns every ``\\n`` into ``\\r\\n`` (ONLCR) and is left that way, so that a console
watched by a person looks right; :class:`ConsoleDecoder` undoes it by turning every ``\\r\\n`` into
``\\n``, which inverts ONLCR exactly. A workload can print a line that looks like an exit marker:
only a marker that nothing follows counts, so a marker is held back until more bytes come (then it
was output) or the console closes (then it is the exit). The init silences the kernel before it
prints the real marker, so that nothing follows it; should a kernel still print its power-off
lines (``[    2.1] reboot: Power down``) after the marker, they are firmware, not output.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

START_MARKER = b"<<imgconv:start>>\n"
_EXIT_HEAD_RE = re.compile(rb"(\n?)<<imgconv:exit status=(0|[1-9][0-9]{0,2}) nl=([01])>>")
_EXIT_LINE_RE = re.compile(rb"^<<imgconv:exit status=(?:0|[1-9][0-9]{0,2}) nl=[01]>>\n", re.MULTILINE)
# What a kernel may print while powering off, with or without printk timestamps.
_KERNEL_LINES_RE = re.compile(rb"(?:(?:\[[ 0-9.]*\] |reboot: )[^\n]*\n)*")
_KERNEL_PARTIAL_RE = re.compile(rb"\[[ 0-9.]*(?:\](?: [^\n]*)?)?|reboot: [^\n]*|r(?:e(?:b(?:o(?:o(?:t:?)?)?)?)?)?")
_MAX_TRAILER = 4096


def _kernel_trailer(text: bytes, *, complete: bool) -> bool:
    """*text* is only kernel lines (the last one possibly cut, unless *complete*)."""
    if len(text) > _MAX_TRAILER:
        return False
    rest = text[_KERNEL_LINES_RE.match(text).end() :]  # type: ignore[union-attr]  # matches empty
    return not rest or (not complete and _KERNEL_PARTIAL_RE.fullmatch(rest) is not None)


def _exit_lines() -> frozenset[bytes]:
    return frozenset(b"<<imgconv:exit status=%d nl=%d>>\n" % (s, nl) for s in range(256) for nl in (0, 1))


_EXIT_LINES = _exit_lines()
_EXIT_PREFIXES = frozenset(line[:i] for line in _EXIT_LINES for i in range(len(line)))


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
    CRLF), the last newline, and a partial line that could still become a marker.
    """

    def __init__(self) -> None:
        self._started = False
        self._cr = False  # the last chunk ended in "\r": it may pair with a "\n"
        self._tail = b""  # decoded bytes not yet emitted
        self._bol = True  # what was emitted so far ends at a line start (or nothing was, in this section)
        self._closed = False

    @property
    def started(self) -> bool:
        """The start marker has been seen: the workload is running."""
        return self._started

    @property
    def pending_exit(self) -> int | None:
        """The status of an exit marker that ends the stream so far, if it does.

        It becomes final at :meth:`close`; more bytes would make it workload output.
        """
        m = _EXIT_HEAD_RE.match(self._tail)
        if m is None or (not m.group(1) and not self._bol):
            return None
        rest = self._tail[m.end() :]
        if not rest.startswith(b"\n") or not _kernel_trailer(rest[1:], complete=True):
            return None
        return int(m.group(2))

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
        m = _EXIT_HEAD_RE.match(text)
        rest = text[m.end() :] if m else b""
        trailer = rest[1:] if rest.startswith(b"\n") else b""
        # A marker whose newline the power-off cut still counts.
        ended = rest in (b"", b"\r") or (rest.startswith(b"\n") and _kernel_trailer(trailer, complete=False))
        if m is None or not ended or not (m.group(1) or self._bol):
            if text:
                events.append(Output(text) if self._started else Firmware(text))
            return events
        newline, status, nl = m.group(1), int(m.group(2)), m.group(3) == b"1"
        if newline and not (nl and self._started):
            events.append(Output(newline) if self._started else Firmware(newline))
        if trailer:
            events.append(Firmware(trailer))
        events.append(Exit(status))
        return events

    # ----------------------------------------------------------------------------------------

    def _process(self, decoded: bytes) -> list[Event]:
        events: list[Event] = []
        text = self._tail + decoded
        if not self._started:
            at = text.find(START_MARKER)
            if at < 0:
                hold = self._firmware_hold(text)
                self._emit(events, text[:hold])
                self._tail = text[hold:]
                return events
            self._emit(events, text[:at])
            self._started, self._bol = True, True
            text = text[at + len(START_MARKER) :]
        hold = self._output_hold(text)
        self._emit(events, text[:hold])
        self._tail = text[hold:]
        return events

    def _emit(self, events: list[Event], data: bytes) -> None:
        if data:
            events.append(Output(data) if self._started else Firmware(data))
            self._bol = data.endswith(b"\n")

    def _last_line_start(self, text: bytes) -> int | None:
        """Where the last line of *text* (complete or not) starts, if that is a line start."""
        end = len(text) - 1 if text.endswith(b"\n") else len(text)
        nl = text.rfind(b"\n", 0, end)
        if nl >= 0:
            return nl + 1
        return 0 if self._bol else None

    @staticmethod
    def _could_be_exit(line: bytes) -> bool:
        return line in _EXIT_LINES or line in _EXIT_PREFIXES

    def _marker_with_trailer(self, text: bytes) -> int | None:
        """Start (with its newline) of a complete exit marker followed only by kernel lines, if any."""
        last = None
        for last in _EXIT_LINE_RE.finditer(text):  # noqa: B007 - only the last one can be the exit
            pass
        if last is None or (last.start() == 0 and not self._bol):
            return None
        if not _kernel_trailer(text[last.end() :], complete=False):
            return None
        return last.start() - 1 if last.start() > 0 else 0

    def _output_hold(self, text: bytes) -> int:
        """Index from which workload text must wait: a possible marker, with the newline before it."""
        start = self._last_line_start(text)
        if start is not None and self._could_be_exit(text[start:]):
            hold = start - 1 if start > 0 else 0
        else:
            # The final newline may be the one the init adds before the marker (nl=1).
            hold = len(text) - 1 if text.endswith(b"\n") else len(text)
        marker = self._marker_with_trailer(text)
        return hold if marker is None else min(hold, marker)

    def _firmware_hold(self, text: bytes) -> int:
        """Index from which firmware text must wait: a partial start marker, or an exit marker."""
        hold = len(text)
        for k in range(min(len(START_MARKER) - 1, len(text)), 0, -1):
            if text.endswith(START_MARKER[:k]):
                hold = len(text) - k
                break
        start = self._last_line_start(text)
        if start is not None and self._could_be_exit(text[start:]):
            hold = min(hold, start - 1 if start > 0 else 0)
        marker = self._marker_with_trailer(text)
        return hold if marker is None else min(hold, marker)
