"""System mode's pure parts: which mode --init auto chooses, the console's system marker (what imgconv boot shows,
and when a guest's end is a clean power-off), --ssh-key's checks, and the spec key the guest init reads."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from converter.boot.console import ConsoleDecoder, ConsoleSink, Firmware, Output
from converter.boot.initbin import init_source
from converter.boot.initramfs import InitSpec, decode_spec, encode_spec
from converter.boot.sshkeys import read_ssh_access
from converter.disk.plan import INIT_SYSTEMS, InitMode, init_mode
from converter.errors import UsageError


@pytest.mark.parametrize("argv", [("/lib/systemd/systemd",), ("/sbin/init", "--log-level=info"),
                                  ("/usr/lib/systemd/systemd",), ("/usr/sbin/init",)])
def test_auto_boots_an_init_system(argv: tuple[str, ...]) -> None:
    assert init_mode(InitMode.AUTO, argv) is InitMode.SYSTEM


@pytest.mark.parametrize("argv", [(), ("/bin/sh", "-c", "/sbin/init"), ("init",), ("/sbin/initctl",)])
def test_auto_runs_anything_else_as_a_container(argv: tuple[str, ...]) -> None:
    assert init_mode(InitMode.AUTO, argv) is InitMode.CONTAINER


def test_an_explicit_mode_wins() -> None:
    assert init_mode(InitMode.SYSTEM, ("/bin/sh",)) is InitMode.SYSTEM
    assert init_mode(InitMode.CONTAINER, ("/sbin/init",)) is InitMode.CONTAINER


def test_the_guest_init_knows_the_same_init_systems() -> None:
    source = init_source().decode()
    for path in INIT_SYSTEMS:
        assert f'"{path}"' in source


def test_the_mode_is_a_spec_key_only_for_system_disks() -> None:
    container = InitSpec(("/bin/sh",), ("PATH=/bin",))
    system = InitSpec(("/lib/systemd/systemd",), ("PATH=/bin",), mode="system")
    assert b"mode\0" not in encode_spec(container), "container specs stay as older imgconv wrote them"
    assert decode_spec(encode_spec(system)).mode == "system"
    assert decode_spec(encode_spec(container)).mode == "container"


def test_the_system_marker_starts_the_console_as_output() -> None:
    decoder = ConsoleDecoder()
    events = decoder.feed(b"SeaBIOS\r\n<<imgconv:sys")
    events += decoder.feed(b"tem>>\r\nWelcome to Debian\r\nimgconv login: ")
    assert events == [Firmware(b"SeaBIOS\n"), Output(b"Welcome to Debian\nimgconv login: ")]
    assert decoder.started and decoder.system


def test_a_system_guest_that_powers_off_ended_cleanly() -> None:
    out = io.BytesIO()
    sink = ConsoleSink(out, io.StringIO(), verbose=False)
    sink.feed(b"<<imgconv:system>>\r\nlogin: ")
    assert not sink.powered_off
    sink.feed(b"[   67.02] reboot: Power down\r\n")
    sink.close()
    assert sink.powered_off and sink.status is None
    container = ConsoleSink(io.BytesIO(), io.StringIO(), verbose=False)
    container.feed(b"<<imgconv:start>>\r\nreboot: Power down\r\n")
    assert not container.powered_off, "only a system guest's power-off is its end"


def test_ssh_keys_are_public_keys_in_authorized_keys_form(tmp_path: Path) -> None:
    key = tmp_path / "k.pub"
    key.write_bytes(b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHh0 me@host\n\n# comment\nssh-rsa AAAAB3Nza= other")
    access = read_ssh_access(key, "dev")
    assert access.fw_cfg() == b"dev\nssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHh0 me@host\nssh-rsa AAAAB3Nza= other\n"


@pytest.mark.parametrize(("content", "needle"), [
    (b"-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n", "is a private key"),
    (b"", "holds no public key"),
    (b"hello world\n", "holds no public key"),
])
def test_bad_ssh_keys_are_one_line_errors(tmp_path: Path, content: bytes, needle: str) -> None:
    key = tmp_path / "k"
    key.write_bytes(content)
    with pytest.raises(UsageError, match=needle):
        read_ssh_access(key, "root")


def test_a_bad_ssh_user_or_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read"):
        read_ssh_access(tmp_path / "missing.pub", "root")
    (tmp_path / "k.pub").write_text("ssh-ed25519 AAAA x\n")
    with pytest.raises(UsageError, match="not a user name"):
        read_ssh_access(tmp_path / "k.pub", "bad\nuser")
