"""The one way tests run the imgconv CLI: the installed console script (`.venv/bin/imgconv`, beside the test's
interpreter), as a user would, in a subprocess with its own environment, working directory, stdin and timeout.

    imgconv(*args, env=, epoch=, cwd=, input=, timeout=) -> Ran     run to completion
    start(*args, env=, epoch=, cwd=) -> Popen                       for tests that signal a running imgconv
    assert_one_line_error(ran, *needles, code=2) -> str             the error contract of a refused run

The environment is the test's own without SOURCE_DATE_EPOCH (a reproducibility setting of whoever runs the tests
must not leak into a conversion), plus `env`, plus SOURCE_DATE_EPOCH=`epoch` when given; `inherit_env=False`
makes `env` the whole environment (what a user dropped to another uid by `prefix`, e.g. setpriv, would have).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _console_script() -> Path:
    beside = Path(sys.executable).with_name("imgconv")
    found = shutil.which("imgconv")
    return beside if beside.exists() or found is None else Path(found)


IMGCONV = _console_script()


@dataclass(frozen=True)
class Ran:
    """A finished run: its argv, exit code, raw output and wall time (and imgconv's peak RSS when watched)."""

    argv: tuple[str, ...]
    code: int
    stdout_bytes: bytes
    stderr_bytes: bytes
    seconds: float = 0.0
    peak_rss_kib: int | None = None

    # Decoded exactly as written (no newline translation), so that a stray carriage return stays visible.
    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode("utf-8", errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode("utf-8", errors="replace")

    @property
    def json(self) -> Any:
        return json.loads(self.stdout)

    def ok(self) -> Ran:
        assert self.code == 0, f"{' '.join(self.argv)} exited {self.code}:\n{self.stderr[-3000:]}"
        return self

    def describe(self) -> str:
        return f"{' '.join(self.argv)} -> {self.code}\nstdout: {self.stdout[-2000:]}\nstderr: {self.stderr[-3000:]}"


def environment(env: Mapping[str, str] | None = None, *, epoch: int | None = None,
                inherit_env: bool = True) -> dict[str, str]:
    """The environment imgconv runs with (see the module's docstring)."""
    full = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"} if inherit_env else {}
    full.update(env or {})
    if epoch is not None:
        full["SOURCE_DATE_EPOCH"] = str(epoch)
    return full


def start(*args: str, env: Mapping[str, str] | None = None, epoch: int | None = None, inherit_env: bool = True,
          cwd: Path | None = None, prefix: Sequence[str] = (), stdin: Any = subprocess.DEVNULL,
          ) -> subprocess.Popen[bytes]:
    """`imgconv ARGS` started with stdout and stderr piped (bytes), for tests that act while it runs."""
    argv = [*prefix, str(IMGCONV), *args]
    return subprocess.Popen(argv, env=environment(env, epoch=epoch, inherit_env=inherit_env), cwd=cwd,
                            stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _watch_peak_rss(proc: subprocess.Popen[bytes], peak: list[int]) -> None:
    """Keep the highest VmHWM (KiB) of *proc* in peak[0] until it exits."""
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak[0] = max(peak[0], int(line.split()[1]))
        except (OSError, ValueError):
            pass
        time.sleep(0.2)


def imgconv(*args: str, env: Mapping[str, str] | None = None, epoch: int | None = None, inherit_env: bool = True,
            cwd: Path | None = None, input: bytes | str | None = None, timeout: float = 900,
            prefix: Sequence[str] = (), watch_memory: bool = False) -> Ran:
    """`imgconv ARGS` run to completion. `input` is its stdin (else /dev/null); `prefix` runs it through another
    program (setpriv); `watch_memory` records the peak RSS of the process `prefix` leaves running. On timeout
    the process is killed and subprocess.TimeoutExpired raised."""
    started = time.monotonic()
    stdin = subprocess.DEVNULL if input is None else subprocess.PIPE
    proc = start(*args, env=env, epoch=epoch, inherit_env=inherit_env, cwd=cwd, prefix=prefix, stdin=stdin)
    peak = [0]
    watcher = threading.Thread(target=_watch_peak_rss, args=(proc, peak), daemon=True) if watch_memory else None
    if watcher is not None:
        watcher.start()
    try:
        out, err = proc.communicate(input.encode() if isinstance(input, str) else input, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    if watcher is not None:
        watcher.join()
    return Ran((*prefix, str(IMGCONV), *args), proc.returncode, out, err, round(time.monotonic() - started, 1),
               peak[0] if watch_memory else None)


def assert_one_line_error(ran: Ran, *needles: str, code: int | None = 2) -> str:
    """The contract of a refused run: exit `code` (None: any failure code, 2 or more), exactly one line on stderr
    starting `imgconv: error: ` and naming every needle, nothing on stdout, no traceback. Returns the line."""
    assert "Traceback" not in ran.stderr and "Traceback" not in ran.stdout, ran.describe()
    if code is None:
        assert ran.code >= 2, ran.describe()
    else:
        assert ran.code == code, ran.describe()
    lines = ran.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("imgconv: error: "), ran.describe()
    assert ran.stdout == "", ran.describe()
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]
