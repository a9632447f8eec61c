"""Child processes that die with imgconv: qemu and virtiofsd must not outlive it, even when it is SIGKILLed
(no ``finally`` runs then). Linux's parent-death signal does that: armed between fork and exec, it kills the
child when the thread that started it ends.
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable

PR_SET_PDEATHSIG = 1


def libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def die_with(parent: int) -> Callable[[], None]:
    """A ``preexec_fn`` for Popen: SIGKILL when *parent* (``os.getpid()`` of the caller) ends. Everything is
    resolved before the fork: after it only this thread exists. If the parent went before the signal was armed,
    the child ends at once."""
    prctl = libc().prctl

    def arm() -> None:
        if prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            os.write(2, f"imgconv: cannot tie a child to imgconv (prctl): {os.strerror(ctypes.get_errno())}\n"
                     .encode())
            os._exit(126)
        if os.getppid() != parent:
            os._exit(126)

    return arm
