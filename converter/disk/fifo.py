"""Streaming to and from the appliance through a named pipe.

libguestfs' `tar_in` and `tar_out` take a file *name* on the host. A FIFO lets imgconv stream
through them without staging anything: one thread works our end of the pipe while the calling
thread (inside the libguestfs call, GIL released) works the other.

When both ends fail, the report names the cause, not its echo: a broken pipe on our side (the
appliance stopped reading) or a truncated stream (the appliance stopped writing) is a
consequence, so the appliance's own error is raised; any other error of ours came first.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Literal

from converter.errors import ToolError


class StreamBroken(ToolError):
    """Our end of the pipe ended early because the appliance's end did."""


class _Worker(threading.Thread):
    def __init__(self, fifo: Path, mode: Literal["rb", "wb"], work: Callable[[BinaryIO], None]) -> None:
        super().__init__(name=f"imgconv-fifo-{mode}", daemon=True)
        self.fifo, self.mode, self.work = fifo, mode, work
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with open(self.fifo, self.mode, buffering=1 << 20) as stream:
                self.work(stream)
        except BaseException as exc:  # handed to the calling thread
            self.error = exc

    def unblock(self) -> None:
        """The appliance's end is gone: let a blocked open() return instead of hanging forever."""
        if self.is_alive():
            flags = os.O_RDONLY if self.mode == "wb" else os.O_WRONLY
            with contextlib.suppress(OSError):
                os.close(os.open(self.fifo, flags | os.O_NONBLOCK))
        self.join(timeout=10)


def through_fifo(fifo: Path, ours: Literal["read", "write"], work: Callable[[BinaryIO], None],
                 appliance: Callable[[str], object]) -> None:
    """Create *fifo*, run *work* on our end (reading or writing) and *appliance(path)* on the other."""
    os.mkfifo(fifo)
    worker = _Worker(fifo, "wb" if ours == "write" else "rb", work)
    worker.start()
    try:
        appliance(str(fifo))
    except ToolError as exc:
        worker.unblock()
        if worker.error is not None and not isinstance(worker.error, BrokenPipeError | StreamBroken):
            raise worker.error from exc
        raise
    worker.join()
    if worker.error is not None:
        raise worker.error
