"""What the fuzz tests share: their hypothesis profiles and the bounds every example runs under.

Profiles (choose with the HYPOTHESIS_PROFILE environment variable; `ci` when unset):

    ci     a few dozen examples per property: what `make test` runs (well under a minute for all of them)
    fuzz   thousands per property: `make fuzz`

They are applied per test (``@PROFILE``), so loading them changes nothing for the other hypothesis tests.

`bounded(fn, input_size)` runs *fn* with its memory traced and a watchdog on the clock, and returns what it returned
or raised: the peak may not pass MEMORY_PER_INPUT_BYTE times the input plus MEMORY_CONSTANT, nor the run
TIME_LIMIT seconds (a loop becomes a failure, not a hung test run). `one_line_error(exc)` is the only failure a
reader of untrusted input may report: an ImgconvError whose message is one line.
"""

from __future__ import annotations

import io
import os
import signal
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

from converter.errors import ImgconvError

_SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
# make test runs the same examples every time (derandomize, no example database): a red CI must mean a change broke
# something, not that this run drew an input nobody has looked at yet. Finding new inputs is `make fuzz`'s job.
settings.register_profile("ci", max_examples=60, deadline=timedelta(seconds=5), suppress_health_check=_SLOW,
                          print_blob=True, derandomize=True, database=None)
settings.register_profile("fuzz", max_examples=4000, deadline=timedelta(seconds=10), suppress_health_check=_SLOW,
                          print_blob=True, derandomize=False,  # (tests/conftest.py derandomizes the default)
                          database=DirectoryBasedExampleDatabase(".hypothesis/examples"))
PROFILE_NAME = os.environ.get("HYPOTHESIS_PROFILE", "ci")
PROFILE = settings.get_profile(PROFILE_NAME)


def examples(share: float = 1.0) -> settings:
    """The profile, with *share* of its examples (for the slower properties)."""
    return settings(PROFILE, max_examples=max(10, int(PROFILE.max_examples * share)))


MEMORY_PER_INPUT_BYTE = 16
MEMORY_CONSTANT = 16 << 20
TIME_LIMIT = 20.0


class Unbounded(AssertionError):
    """A run went past a bound (memory, time, output size)."""


class OutputTooLarge(Unbounded):
    """The output outgrew its cap: recorded as the run's outcome (`bounded`), for the test to judge."""


class CappedSink(io.BytesIO):
    """An output kept in memory that refuses to grow past *cap* bytes: an output not bounded by the input fails the
    test (raised inside the code under test, so no ImgconvError handler can swallow it: it is an AssertionError)."""

    def __init__(self, cap: int) -> None:
        super().__init__()
        self.cap = cap

    def write(self, data: Any) -> int:
        if self.tell() + len(data) > self.cap:
            raise OutputTooLarge(f"the output passed {self.cap} bytes")
        return super().write(data)


@contextmanager
def watchdog(seconds: float) -> Iterator[None]:
    """Raise Unbounded in the main thread after *seconds*; an outer alarm (pytest-timeout's, or another watchdog's)
    that would ring sooner is left to ring, a later one is put back after."""
    def expired(signum: int, frame: Any) -> None:
        raise Unbounded(f"still running after {seconds} s")

    pending = signal.getitimer(signal.ITIMER_REAL)[0]
    if 0 < pending <= seconds:
        yield
        return
    started = time.monotonic()
    previous = signal.signal(signal.SIGALRM, expired)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(0.001, outer - (time.monotonic() - started)))


@dataclass
class Outcome:
    value: Any
    error: Exception | None
    peak: int
    seconds: float


def bounded(fn: Callable[[], Any], input_size: int, *, per_byte: int = MEMORY_PER_INPUT_BYTE) -> Outcome:
    """Run *fn* traced and watched; Unbounded (an AssertionError: the test fails) if it passes a bound: more than
    *per_byte* times *input_size* plus MEMORY_CONSTANT held at once, or more than TIME_LIMIT seconds."""
    limit = per_byte * input_size + MEMORY_CONSTANT
    value: Any = None
    error: Exception | None = None
    tracemalloc.start()
    started = time.monotonic()
    try:
        with watchdog(TIME_LIMIT):
            try:
                value = fn()
            except OutputTooLarge as exc:
                error = exc
            except Unbounded:
                raise
            except Exception as exc:  # judged by the caller: only a one-line ImgconvError is acceptable
                error = exc
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    seconds = time.monotonic() - started
    if peak > limit:
        raise Unbounded(f"{peak} bytes held for {input_size} bytes of input (limit {limit})")
    return Outcome(value, error, peak, seconds)


def one_line_error(exc: BaseException | None) -> str:
    """The message of *exc*, asserting it is what imgconv may report about untrusted input."""
    assert exc is not None
    assert isinstance(exc, ImgconvError), f"{type(exc).__name__} escaped: {exc!r}"
    message = str(exc)
    assert message and "\n" not in message and "\r" not in message, repr(message)
    return message
