"""Fixtures for the foundation's unit tests: OCI layouts to break, and the real console script to run."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.builders import Layout
from tests.cli import IMGCONV, Ran
from tests.cli import imgconv as run_imgconv


@pytest.fixture
def oci(tmp_path: Path) -> Layout:
    """An empty OCI image layout in a private directory (blobs written as you go; index.json on request)."""
    return Layout(tmp_path / "layout")


@pytest.fixture
def imgconv(tmp_path: Path) -> Callable[..., Ran]:
    """Run the installed `imgconv` (as a user would, tests/cli.py), in a scratch directory, without a terminal."""
    if not IMGCONV.exists():
        pytest.fail("the imgconv console script is not installed: run `make setup`")
    return functools.partial(run_imgconv, cwd=tmp_path, env={"COLUMNS": "200", "TERM": "dumb"}, timeout=120)
