"""`make lint` as tests, so that CI keeps the code ruff-clean and `mypy --strict`-clean (as mkosi does)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def test_ruff_is_clean() -> None:
    ran = subprocess.run([BIN / "ruff", "check", "converter", "tests", "fixtures", "bench"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stdout + ran.stderr


def test_mypy_strict_is_clean() -> None:
    ran = subprocess.run([BIN / "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stdout + ran.stderr
