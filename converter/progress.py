"""One monitor interface for long work: tqdm for people, JSON lines for scripts, silence for --quiet.

Library code reports through a :class:`Monitor` and never prints; the CLI picks the monitor.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TextIO


class Bar(Protocol):
    def update(self, n: int) -> None: ...


class Monitor(Protocol):
    def step(self, step_id: str, title: str) -> Any:
        """Context manager around a step: *step_id* is stable (scripts and `make bench` read it), *title* is for
        people. Reports the start and how long the step took."""

    def bar(self, desc: str, total: int | None, unit: str = "B") -> Any:
        """Context manager yielding a :class:`Bar` for work of known or unknown size."""

    def note(self, message: str) -> None:
        """A fact worth telling (which kernel was used, say)."""


class _NullBar:
    def update(self, n: int) -> None:
        pass


class NullMonitor:
    """--quiet: nothing at all."""

    @contextmanager
    def step(self, step_id: str, title: str) -> Iterator[None]:
        yield

    @contextmanager
    def bar(self, desc: str, total: int | None, unit: str = "B") -> Iterator[Bar]:
        yield _NullBar()

    def note(self, message: str) -> None:
        pass


class TextMonitor:
    """For people at a terminal: step names, timings and tqdm bars on stderr; notes always.

    Off a terminal (logs, pipes, scripts) steps and bars are silent, so stderr carries only
    what matters there: notes and, on failure, the one-line error.
    """

    def __init__(self, stream: TextIO | None = None, interactive: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.bars = self.interactive
        self._lock = threading.Lock()

    @contextmanager
    def step(self, step_id: str, title: str) -> Iterator[None]:
        if not self.interactive:
            yield
            return
        start = time.monotonic()
        self._say(f"imgconv: {title}...")
        yield
        elapsed = time.monotonic() - start
        if elapsed >= 1.0:
            self._say(f"imgconv: {title}: done in {elapsed:.1f}s")

    @contextmanager
    def bar(self, desc: str, total: int | None, unit: str = "B") -> Iterator[Bar]:
        if not self.bars:
            yield _NullBar()
            return
        from tqdm import tqdm  # type: ignore[import-untyped]

        with tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", unit_divisor=1024,
                  file=self.stream, leave=False, dynamic_ncols=True) as bar:
            yield bar

    def note(self, message: str) -> None:
        self._say(f"imgconv: {message}")

    def _say(self, line: str) -> None:
        """One write per line under a lock (steps may run in two threads: see JsonMonitor.emit)."""
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()


class _JsonBar:
    def __init__(self, monitor: JsonMonitor, desc: str, total: int | None) -> None:
        self.monitor, self.desc, self.total, self.done = monitor, desc, total, 0
        self._last = 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= 1.0:
            self._last = now
            self.monitor.emit({"event": "progress", "task": self.desc, "done": self.done, "total": self.total})


class JsonMonitor:
    """For scripts (--json): one JSON object per line on stderr, results stay alone on stdout."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self._lock = threading.Lock()

    def emit(self, event: dict[str, Any]) -> None:
        # One write per line under a lock: a step may run while the appliance starts in another thread, and
        # print() writes the newline apart (two events on one line are not JSON).
        with self._lock:
            self.stream.write(json.dumps(event) + "\n")
            self.stream.flush()

    @contextmanager
    def step(self, step_id: str, title: str) -> Iterator[None]:
        start = time.monotonic()
        self.emit({"event": "step", "id": step_id, "step": title})
        yield
        self.emit({"event": "step-done", "id": step_id, "step": title,
                   "seconds": round(time.monotonic() - start, 3)})

    @contextmanager
    def bar(self, desc: str, total: int | None, unit: str = "B") -> Iterator[Bar]:
        bar = _JsonBar(self, desc, total)
        yield bar
        self.emit({"event": "progress", "task": desc, "done": bar.done, "total": total})

    def note(self, message: str) -> None:
        self.emit({"event": "note", "message": message})
