"""Fixtures for the foundation's unit tests: OCI layouts to break, and the real console script to run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.unit.layerkit import Layout


@pytest.fixture
def oci(tmp_path: Path) -> Layout:
    """An empty OCI image layout in a private directory (blobs written as you go; index.json on request)."""
    return Layout(tmp_path / "layout")


@dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str


def _console_script() -> str:
    beside = Path(sys.executable).with_name("imgconv")
    found = str(beside) if beside.exists() else shutil.which("imgconv")
    if found is None:
        pytest.fail("the imgconv console script is not installed: run `make setup`")
    return found


@pytest.fixture
def imgconv(tmp_path: Path) -> Callable[..., Result]:
    """Run the installed `imgconv` (as a user would), in a scratch directory, without a terminal."""
    script = _console_script()

    def run(*args: str) -> Result:
        env = {**os.environ, "COLUMNS": "200", "TERM": "dumb"}
        proc = subprocess.run([script, *args], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
                              stdin=subprocess.DEVNULL)
        return Result(proc.returncode, proc.stdout, proc.stderr)

    return run
