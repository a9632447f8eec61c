"""The one way imgconv runs an external program.

Every subprocess goes through :func:`run` (or :func:`popen` for streams) so that the argv is
echoed under ``--debug``, a missing program becomes "X is required to do Y", and a failure
becomes a :class:`ToolError` carrying the program's own last words.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from converter.errors import MissingToolError, ToolError, one_line

log = logging.getLogger("imgconv.run")

# Debian package that provides each program, for the "install X" hint.
PACKAGE_OF = {
    "skopeo": "skopeo",
    "qemu-img": "qemu-utils",
    "qemu-system-x86_64": "qemu-system-x86",
    "musl-gcc": "musl-tools",
    "gcc": "gcc",
    "docker": "docker.io",
    "umoci": "umoci",
}


def require(program: str, purpose: str) -> str:
    """Return the full path of *program*, or say which package provides it and why it is needed."""
    found = shutil.which(program)
    if found is None:
        package = PACKAGE_OF.get(program, program)
        raise MissingToolError(f"{program} is required to {purpose} (Debian package: {package})")
    return found


def run(
    argv: Sequence[str | Path],
    *,
    purpose: str,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    check: bool = True,
    keep_stdout: bool = True,
) -> subprocess.CompletedProcess[bytes]:
    """Run a program to completion, capturing its output (its standard output thrown away unless
    *keep_stdout*: a tool that echoes each of many commands would fill memory with it).

    *purpose* completes the sentence "X is required to ..." and "... failed while trying to ...".
    """
    args = [str(a) for a in argv]
    args[0] = require(args[0], purpose)
    log.debug("run: %s", shlex.join(args))
    try:
        proc = subprocess.run(
            args, input=input, stdout=subprocess.PIPE if keep_stdout else subprocess.DEVNULL,
            stderr=subprocess.PIPE, env=dict(env) if env is not None else None, timeout=timeout, check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ToolError(f"{Path(args[0]).name} did not finish within {timeout:.0f}s while trying to {purpose}") from exc
    if check and proc.returncode != 0:
        raise ToolError(failure_message(args[0], purpose, proc.returncode, proc.stderr or proc.stdout or b""))
    return proc


def failure_message(program: str, purpose: str, code: int, output: bytes) -> str:
    """One line: which program failed, doing what, and the last thing it said."""
    said = one_line(output.decode("utf-8", "replace"), limit=300)
    name = Path(program).name
    return f"{name} failed (exit {code}) while trying to {purpose}: {said or 'no output'}"
