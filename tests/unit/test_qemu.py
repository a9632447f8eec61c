"""`imgconv boot`'s pure parts: the resolv.conf docker would give, and how it reaches the guest."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from converter.boot.initbin import init_source
from converter.boot.qemu import qemu_argv
from converter.boot.resolv import RESOLV_CONF_FW_CFG, docker_resolv_conf

# (host's /etc/resolv.conf, what `docker run --network none` of dockerd 20.10.24 put in the container), recorded
# with a private dockerd in a mount namespace whose /etc/resolv.conf held the first.
DOCKER_OBSERVED = [
    ("nameserver 10.255.255.53\n", "nameserver 10.255.255.53\n"),
    ("nameserver 127.0.0.1\n", "\nnameserver 8.8.8.8\nnameserver 8.8.4.4\n"),
    ("", "\nnameserver 8.8.8.8\nnameserver 8.8.4.4\n"),
    (
        "# comment\nsearch example.com\nnameserver 2001:db8::1\nnameserver 10.0.0.1\noptions ndots:2\n",
        "# comment\nsearch example.com\nnameserver 10.0.0.1\noptions ndots:2\n",
    ),
    # the localhost pattern eats the blank lines after it; search is kept, defaults appended after it
    ("nameserver ::1\nnameserver 127.0.1.1\n  \n\nsearch x\n", "search x\n\nnameserver 8.8.8.8\nnameserver 8.8.4.4\n"),
    # a nameserver after a comment still counts; 127.0.0.11abc loses its address and keeps "abc"
    (
        "nameserver 10.0.0.1 # trailing\nnameserver fe80::1%eth0\nnameserver 127.0.0.11abc\n",
        "nameserver 10.0.0.1 # trailing\nabc\n",
    ),
    ("domain lan\nnameserver\t192.168.1.1\r\n", "domain lan\nnameserver\t192.168.1.1\r\n"),
]


@pytest.mark.parametrize(("host", "container"), DOCKER_OBSERVED)
def test_resolv_conf_is_what_docker_made_of_the_hosts(host: str, container: str) -> None:
    assert docker_resolv_conf(host.encode()) == container.encode()


def test_systemd_resolved_stub_is_replaced_by_its_real_file() -> None:
    stub = b"nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch .\n"
    real = b"nameserver 192.168.1.1\nnameserver 127.0.0.1\nsearch lan\n"
    assert docker_resolv_conf(stub, real) == b"nameserver 192.168.1.1\nsearch lan\n"  # as dockerd did
    assert docker_resolv_conf(stub, None) == b"\nnameserver 8.8.8.8\nnameserver 8.8.4.4\n"
    # only when the stub is the one nameserver
    assert docker_resolv_conf(b"nameserver 127.0.0.53\nnameserver 10.0.0.1\n", real) == b"nameserver 10.0.0.1\n"


def test_no_host_file_is_the_guests_own_default() -> None:
    """A plain qemu boot passes nothing: the init writes what docker makes on a host without a resolv.conf."""
    source = init_source().decode()
    literal = re.search(r'DOCKER_DEFAULT_RESOLV_CONF\[\] = "((?:[^"\\]|\\.)*)";', source)
    assert literal is not None
    assert docker_resolv_conf(None) == literal.group(1).encode().decode("unicode_escape").encode()
    assert f'#define FW_CFG_RESOLV_CONF "{RESOLV_CONF_FW_CFG}"' in source


def test_resolv_conf_goes_to_the_guest_as_a_firmware_file(tmp_path: Path) -> None:
    path = tmp_path / "a,b" / "resolv.conf"
    argv = qemu_argv(accel="tcg", drive=["-device", "x"], memory_mib=256, cpus=1, direct_kernel=None, qmp_socket=None,
                     resolv_conf=path)
    at = argv.index("-fw_cfg")
    assert argv[at + 1] == f"name=opt/imgconv/resolv.conf,file={tmp_path}/a,,b/resolv.conf"
    assert "-fw_cfg" not in qemu_argv(accel="tcg", drive=["-device", "x"], memory_mib=256, cpus=1, direct_kernel=None,
                                      qmp_socket=None)
