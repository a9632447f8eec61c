"""`--help` explains each command through the real console script: what it does, an example, the options a user
reaches for, and for `boot` the exit codes a script has to tell apart."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.unit.conftest import Result

Run = Callable[..., Result]


def test_top_level_help_lists_the_commands_and_reference_forms(imgconv: Run) -> None:
    result = imgconv("--help")
    assert result.code == 0, result.stderr
    for needle in ("oci-to-qcow2", "vm-to-oci", "boot", "inspect", "oci:DIR", "docker-archive:", "docker-daemon:",
                   "docker://"):
        assert needle in result.stdout, needle


def test_no_arguments_shows_the_help(imgconv: Run) -> None:
    result = imgconv()
    assert "oci-to-qcow2" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("command", "needles"), [
    ("oci-to-qcow2", ["Example:", "--format", "--size", "--kernel", "--compress", "--force", "--json", "0444"]),
    ("vm-to-oci", ["Example:", "--base", "--compression", "--reproducible", "--entrypoint", "--root", "--json"]),
    ("boot", ["--timeout", "--memory", "--verbose", "124", "125", "137", "overlay"]),
    ("inspect", ["--json", "--platform", "verified"]),
])
def test_command_help(imgconv: Run, command: str, needles: list[str]) -> None:
    result = imgconv(command, "--help")
    assert result.code == 0, result.stderr
    for needle in needles:
        assert needle in result.stdout, needle


def test_version(imgconv: Run) -> None:
    from converter import __version__

    result = imgconv("--version")
    assert (result.code, result.stdout.strip()) == (0, f"imgconv {__version__}")
