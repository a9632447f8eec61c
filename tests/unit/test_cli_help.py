"""`--help` explains each command through the real console script: what it does, an example, the options a user
reaches for, and for `boot` the exit codes a script has to tell apart. Every help and version request exits 0;
a command line that does not parse exits 2 with one `imgconv: error:` line and no traceback."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.cli import Ran, assert_one_line_error

Run = Callable[..., Ran]

COMMANDS = ["oci-to-qcow2", "vm-to-oci", "boot", "inspect"]


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_top_level_help_lists_the_commands_and_reference_forms(imgconv: Run, flag: str) -> None:
    result = imgconv(flag)
    assert result.code == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for needle in ("oci-to-qcow2", "vm-to-oci", "boot", "inspect", "oci:DIR", "docker-archive:", "docker-daemon:",
                   "docker://"):
        assert needle in result.stdout, needle


def test_no_arguments_shows_the_help(imgconv: Run) -> None:
    # No command is a usage error (exit 2, as click has it), answered with the help rather than one line.
    result = imgconv()
    assert result.code == 2, result.describe()
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


@pytest.mark.parametrize("command", COMMANDS)
def test_short_help_flag_is_the_same_help(imgconv: Run, command: str) -> None:
    short, long = imgconv(command, "-h"), imgconv(command, "--help")
    assert (short.code, long.code) == (0, 0), short.describe() + long.describe()
    assert short.stdout == long.stdout


def test_version(imgconv: Run) -> None:
    from converter import __version__

    result = imgconv("--version")
    assert (result.code, result.stdout.strip()) == (0, f"imgconv {__version__}")


BAD_COMMAND_LINES = [
    pytest.param(["--bogus"], "--bogus", id="top-level-option"),
    pytest.param(["no-such-command"], "no-such-command", id="command"),
    *(pytest.param([command, "--bogus"], "--bogus", id=f"{command}-option") for command in COMMANDS),
    pytest.param(["oci-to-qcow2"], "SOURCE", id="missing-arguments"),
    pytest.param(["boot", "--timeout", "abc", "disk.qcow2"], "--timeout", id="option-value"),
]


@pytest.mark.parametrize(("argv", "needle"), BAD_COMMAND_LINES)
def test_a_command_line_that_does_not_parse_is_a_one_line_error(imgconv: Run, argv: list[str], needle: str) -> None:
    assert_one_line_error(imgconv(*argv), needle, code=2)


def test_debug_shows_the_traceback_and_still_ends_with_the_one_line_error(imgconv: Run) -> None:
    plain = imgconv("inspect", "oci:/nonexistent/layout")
    assert_one_line_error(plain, "/nonexistent/layout", code=2)
    debug = imgconv("--debug", "inspect", "oci:/nonexistent/layout")
    assert debug.code == 2, debug.describe()
    assert "Traceback (most recent call last)" in debug.stderr, debug.describe()
    assert debug.stderr.splitlines()[-1] == plain.stderr.rstrip("\n"), debug.describe()
