"""`imgconv boot --network` and `-p/--publish`: the parser, the qemu arguments, the guest's settings."""

from __future__ import annotations

import pytest

from converter.boot.network import NO_NETWORK, USER_NETWORK, Network, Publish, parse_network, parse_publish
from converter.boot.qemu import qemu_argv
from converter.errors import EXIT_USAGE, UsageError
from tests.cli import imgconv


@pytest.mark.parametrize(("spec", "expected"), [
    ("8080:80", Publish("127.0.0.1", 8080, 80, "tcp")),
    ("8080:80/tcp", Publish("127.0.0.1", 8080, 80, "tcp")),
    ("5353:53/udp", Publish("127.0.0.1", 5353, 53, "udp")),
    ("0.0.0.0:1:65535", Publish("0.0.0.0", 1, 65535, "tcp")),
    ("192.168.1.20:8443:443/udp", Publish("192.168.1.20", 8443, 443, "udp")),
])  # fmt: skip
def test_publish_specs(spec: str, expected: Publish) -> None:
    assert parse_publish(spec) == expected


@pytest.mark.parametrize("spec", [
    "", "80", ":80", "80:", "0:80", "80:0", "65536:80", "80:65536", "-1:80", "a:80", "80:b", "8080-8090:80",
    "80:80/sctp", "80:80/", "localhost:80:80", "::1:80:80", "[::1]:80:80", "1.2.3:80:80", "1.2.3.4:5:6:7",
    "80:80/tcp/udp", " 80:80", "80:80 ",
])  # fmt: skip
def test_bad_publish_specs_are_usage_errors(spec: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_publish(spec)
    assert repr(spec) in str(info.value) and "\n" not in str(info.value)


def test_network_modes() -> None:
    assert parse_network("user", []) == USER_NETWORK
    assert parse_network("none", []) == NO_NETWORK
    assert parse_network("user", ["80:80", "81:81/udp", "80:80/udp"]).publish == (
        Publish("127.0.0.1", 80, 80), Publish("127.0.0.1", 81, 81, "udp"), Publish("127.0.0.1", 80, 80, "udp"))
    for mode, ports, message in [
        ("bridge", [], "--network takes user or none, not 'bridge'"),
        ("host", [], "--network takes user or none, not 'host'"),
        ("none", ["80:80"], "-p needs a network: it cannot be used with --network none"),
        ("user", ["80:80", "0.0.0.0:80:81"], "-p: host port 80/tcp is published twice"),
    ]:
        with pytest.raises(UsageError, match="^" + message.replace(".", r"\.") + "$"):
            parse_network(mode, ports)


def test_qemu_arguments() -> None:
    net = parse_network("user", ["8080:80", "0.0.0.0:5353:53/udp"])
    assert net.qemu_args() == [
        "-netdev", "user,id=net0,hostfwd=tcp:127.0.0.1:8080-:80,hostfwd=udp:0.0.0.0:5353-:53",
        "-device", "virtio-net-pci,netdev=net0,romfile=,status=off",
    ]  # fmt: skip
    assert NO_NETWORK.qemu_args() == []
    assert USER_NETWORK.guest_config() == b"address=10.0.2.15/24\ngateway=10.0.2.2\n"
    assert NO_NETWORK.guest_config() is None


def test_qemu_argv_has_a_nic_only_when_asked() -> None:
    from pathlib import Path

    common = {"accel": "tcg", "drive": ["-device", "x"], "memory_mib": 256, "cpus": 1, "direct_kernel": None,
              "qmp_socket": None}
    plain = qemu_argv(**common)  # type: ignore[arg-type]
    assert "-netdev" not in plain and "-nodefaults" in plain  # -nodefaults: qemu adds no NIC of its own
    assert qemu_argv(**common, network=NO_NETWORK) == plain  # type: ignore[arg-type]
    user = qemu_argv(**common, network=Network(), network_conf=Path("/t/a,b"))  # type: ignore[arg-type]
    assert user[len(plain):] == ["-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0,romfile=,status=off",
                                 "-fw_cfg", "name=opt/imgconv/network,file=/t/a,,b"]


@pytest.mark.parametrize(("args", "message"), [
    (["-p", "80"], "imgconv: error: -p takes [IP:]HOSTPORT:GUESTPORT[/tcp|/udp], not '80'"),
    (["--publish", "localhost:80:80"], "imgconv: error: -p 'localhost:80:80': 'localhost' is not an IPv4 address"),
    (["--network", "none", "-p", "80:80"], "imgconv: error: -p needs a network: it cannot be used with --network none"),
    (["--network", "host"], "imgconv: error: --network takes user or none, not 'host'"),
])  # fmt: skip
def test_cli_usage_errors(args: list[str], message: str, tmp_path: object) -> None:
    ran = imgconv("boot", *args, "/nonexistent/disk.qcow2", timeout=60)
    assert (ran.code, ran.stderr, ran.stdout) == (EXIT_USAGE, message + "\n", "")


def test_help_says_the_default_address() -> None:
    text = " ".join(imgconv("boot", "--help", env={"COLUMNS": "200"}, timeout=60).ok().stdout.split())
    assert "127.0.0.1, not Docker's 0.0.0.0" in text
