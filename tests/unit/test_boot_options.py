"""`imgconv boot`'s docker-run flags: parsing (arguments after DISK, -e, --env-file), the run spec's bytes, and the
init spec's image keys (converter.boot.runspec, converter.boot.initramfs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from converter.boot.initramfs import ImageRun, InitSpec, decode_spec, encode_spec
from converter.boot.runspec import (
    MAX_VALUE,
    RunOverrides,
    build_overrides,
    check_hostname,
    encode_overrides,
    env_entry,
    parse_env_file,
)
from converter.cli import app
from converter.errors import UsageError


def _pairs(data: bytes) -> list[tuple[str, str]]:
    fields = data[:-1].decode().split("\0")
    return list(zip(fields[::2], fields[1::2], strict=True))


def _build(**kw: object) -> RunOverrides:
    args: dict[str, object] = {"cmd": [], "entrypoint": None, "env": [], "env_files": [], "workdir": None,
                               "user": None, "hostname": None, "environ": {}}
    args.update(kw)
    return build_overrides(**args)  # type: ignore[arg-type]


def test_env_entry_follows_the_docker_cli() -> None:
    assert env_entry("A=1", {"A": "host"}) == "A=1"
    assert env_entry("A", {"A": "host"}) == "A=host"
    assert env_entry("A", {}) == "A"  # passed alone: the daemon unsets A, the image's A included
    assert env_entry("A=", {}) == "A="
    with pytest.raises(UsageError, match="invalid environment variable"):
        env_entry("=x", {})


def test_env_file_format() -> None:
    data = b"\xef\xbb\xbf# comment\n\n  A=1 2 \nB\nC\nD==x\n\t# indented comment\n"
    assert parse_env_file(data, "f", {"B": "host"}) == ["A=1 2 ", "B=host", "C", "D==x"]
    with pytest.raises(UsageError, match="line 1: variable 'A B' contains whitespaces"):
        parse_env_file(b"A B=1\n", "f", {})
    with pytest.raises(UsageError, match="not valid UTF-8"):
        parse_env_file(b"A=\xff\n", "f", {})


def test_env_files_come_before_e(tmp_path: Path) -> None:
    env_file = tmp_path / "env"
    env_file.write_bytes(b"A=file\nB=file\n")
    overrides = _build(env=["A=flag"], env_files=[env_file])
    assert overrides.env == ("A=file", "B=file", "A=flag")
    with pytest.raises(UsageError, match="cannot read env file"):
        _build(env_files=[tmp_path / "missing"])


def test_run_spec_bytes_carry_only_what_was_given() -> None:
    assert RunOverrides().empty
    assert _pairs(encode_overrides(RunOverrides())) == [("version", "1")]
    spec = RunOverrides(cmd=("-c", "echo 'a b'; $X"), entrypoint="", env=("A=1", "B"), cwd="/tmp", user="1:2",
                        hostname="h")
    assert _pairs(encode_overrides(spec)) == [
        ("version", "1"), ("entrypoint", ""), ("cwd", "/tmp"), ("user", "1:2"), ("hostname", "h"),
        ("cmd", "-c"), ("cmd", "echo 'a b'; $X"), ("env", "A=1"), ("env", "B"),
    ]


@pytest.mark.parametrize(("kw", "message"), [
    ({"cmd": ["a\0b"]}, "NUL byte"),
    ({"env": ["A=\0"]}, "NUL byte"),
    ({"entrypoint": "x" * (MAX_VALUE + 1)}, "at most"),
    ({"cmd": ["x" * 100_000] * 11}, "at most"),
    ({"workdir": "relative"}, "absolute path"),
    ({"user": ""}, "must not be empty"),
])
def test_absurd_values_are_usage_errors(kw: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        _build(**kw)


def test_hostnames() -> None:
    assert check_hostname("dev.example-1") == "dev.example-1"
    for bad in ("-x", "a..b", "a b", "x" * 65, ""):
        with pytest.raises(UsageError, match="invalid hostname"):
            check_hostname(bad)


def test_init_spec_carries_the_image_parts_compatibly() -> None:
    image = ImageRun(entrypoint=("/ep",), cmd=("a", ""), env=("A=1", "PATH=/x"))
    spec = InitSpec(("/ep", "a", ""), ("PATH=/x", "HOSTNAME=h", "A=1"), "/", "", "h", image)
    data = encode_spec(spec)
    assert decode_spec(data) == spec
    # An older reader keeps the same final argv and env: the image keys come after, under names it skips.
    old = decode_spec(data.split(b"image\0")[0])
    assert (old.argv, old.env, old.image) == (spec.argv, spec.env, None)
    assert decode_spec(encode_spec(InitSpec(("/x",), ()))).image is None


def test_options_stop_at_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Everything after DISK is the command, options included; options before it are boot's."""
    seen: dict[str, object] = {}

    def fake(command: list[str] | None, entrypoint: str | None, env: list[str] | None, env_file: object,
             workdir: str | None, user: str | None, hostname: str | None) -> RunOverrides:
        seen.update(command=command, entrypoint=entrypoint, env=env, workdir=workdir, user=user, hostname=hostname)
        raise typer.Exit(0)

    monkeypatch.setattr("converter.cli._run_overrides", fake)
    result = CliRunner().invoke(app, ["boot", "--entrypoint", "/bin/sh", "-e", "A=1", "-w", "/w", "-u", "u:g",
                                      "--hostname", "h", "app.qcow2", "-c", "echo hi", "-e", "--help"])
    assert result.exit_code == 0, result.output
    assert seen == {"command": ["-c", "echo hi", "-e", "--help"], "entrypoint": "/bin/sh", "env": ["A=1"],
                    "workdir": "/w", "user": "u:g", "hostname": "h"}


@pytest.mark.parametrize(("args", "message"), [
    (["--stop-timeout", "-1", "app.qcow2"], "--stop-timeout must not be negative"),
    (["-e", "A=\x01", "-e", "=x", "app.qcow2"], "invalid environment variable"),
    (["--hostname", "a b", "app.qcow2"], "invalid hostname"),
])
def test_bad_options_are_one_line_usage_errors(args: list[str], message: str) -> None:
    imgconv = Path(sys.executable).parent / "imgconv"
    proc = subprocess.run([imgconv, "boot", *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
