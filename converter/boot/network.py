"""``imgconv boot``'s network: ``--network`` and ``-p/--publish``, as ``docker run`` has them.

The default network is QEMU's user-mode network (slirp), the counterpart of Docker's default bridge: the guest
reaches out through the host's own sockets (no root, no bridge, no tap), and nothing reaches the guest except
the published ports. The guest is configured statically with the addresses that network always uses (address
10.0.2.15/24, gateway 10.0.2.2), by imgconv's init (``init/init.c``: ``network_up``), which reads them from the
QEMU firmware config file ``opt/imgconv/network`` (``address=A/P`` and ``gateway=G`` lines): no DHCP client.
The interface is named eth0 as in a container.

DNS: the guest's /etc/resolv.conf is the one Docker would give (the host's, with localhost nameservers taken
out; Google's public DNS when none is left; :mod:`converter.boot.resolv`). Slirp forwards the guest's packets to
any address the host reaches, so those nameservers work from the guest as they do from a container; QEMU's own
forwarder (10.0.2.3) is not needed, and using Docker's file keeps /etc/resolv.conf the same as ``docker run``'s.

``--network none`` gives the guest no NIC at all: only loopback, as ``docker run --network none``.

``-p [IP:]HOSTPORT:GUESTPORT[/tcp|/udp]`` is a QEMU ``hostfwd``. The default IP is 127.0.0.1, where Docker's is
0.0.0.0: a dev VM's ports are not offered to the whole network unless asked (``-p 0.0.0.0:8080:80``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from converter.errors import UsageError

NETWORK_FW_CFG = "opt/imgconv/network"  # read by init.c
GUEST_ADDRESS = "10.0.2.15"
GUEST_PREFIX = 24
GATEWAY = "10.0.2.2"
NETWORK_MODES = ("user", "none")
DEFAULT_PUBLISH_IP = "127.0.0.1"

_PUBLISH_RE = re.compile(r"(?:(?P<ip>[^:/]*):)?(?P<host>[^:/]*):(?P<guest>[^:/]*)(?:/(?P<proto>[^:/]*))?")


@dataclass(frozen=True)
class Publish:
    """One ``-p``: the host's *host_ip*:*host_port* forwarded to the guest's *guest_port*."""

    host_ip: str
    host_port: int
    guest_port: int
    protocol: str = "tcp"

    def hostfwd(self) -> str:
        """QEMU's ``-netdev user`` option for it (the guest address left to slirp: 10.0.2.15)."""
        return f"hostfwd={self.protocol}:{self.host_ip}:{self.host_port}-:{self.guest_port}"


@dataclass(frozen=True)
class Network:
    """The guest's network: ``user`` (QEMU user-mode networking, the default) or ``none`` (loopback only)."""

    mode: str = "user"
    publish: tuple[Publish, ...] = ()

    def qemu_args(self) -> list[str]:
        """The NIC's qemu arguments; none for ``none`` (``-nodefaults`` leaves the VM without a NIC)."""
        if self.mode == "none":
            return []
        netdev = ",".join(["user", "id=net0", *(p.hostfwd() for p in self.publish)])
        # romfile=: no iPXE option ROM for the firmware to load (the disk boots). status=off: no link status
        # feature, so the driver reports carrier at once and eth0 is usable (operstate up) as soon as the init
        # brings it up; with it, the kernel's link watch kept eth0 down for about a second after that.
        return ["-netdev", netdev, "-device", "virtio-net-pci,netdev=net0,romfile=,status=off"]

    def guest_config(self) -> bytes | None:
        """The firmware config file ``opt/imgconv/network`` for the guest init; None without a NIC."""
        if self.mode == "none":
            return None
        return f"address={GUEST_ADDRESS}/{GUEST_PREFIX}\ngateway={GATEWAY}\n".encode()


USER_NETWORK = Network()  # the default, as Docker's default bridge
NO_NETWORK = Network("none")


def _port(text: str, spec: str, which: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise UsageError(f"-p {spec!r}: {which} port must be a number from 1 to 65535")
    return int(text)


def parse_publish(spec: str) -> Publish:
    """``[IP:]HOSTPORT:GUESTPORT[/tcp|/udp]`` (IPv4 only; Docker's port ranges are not supported)."""
    match = _PUBLISH_RE.fullmatch(spec)
    if match is None:
        raise UsageError(f"-p takes [IP:]HOSTPORT:GUESTPORT[/tcp|/udp], not {spec!r}")
    ip = match["ip"] if match["ip"] is not None else DEFAULT_PUBLISH_IP
    try:
        ipaddress.IPv4Address(ip)
    except ValueError as exc:
        raise UsageError(f"-p {spec!r}: {ip!r} is not an IPv4 address") from exc
    protocol = match["proto"] if match["proto"] is not None else "tcp"
    if protocol not in ("tcp", "udp"):
        raise UsageError(f"-p {spec!r}: the protocol is tcp or udp, not {protocol!r}")
    return Publish(ip, _port(match["host"], spec, "the host"), _port(match["guest"], spec, "the guest"), protocol)


def parse_network(mode: str, publish: Sequence[str]) -> Network:
    """``--network MODE`` and the ``-p`` specs, checked together (a UsageError names what is wrong)."""
    if mode not in NETWORK_MODES:
        raise UsageError(f"--network takes {' or '.join(NETWORK_MODES)}, not {mode!r}")
    ports = tuple(parse_publish(spec) for spec in publish)
    if ports and mode == "none":
        raise UsageError("-p needs a network: it cannot be used with --network none")
    seen: set[tuple[str, int]] = set()
    for port in ports:
        if (port.protocol, port.host_port) in seen:
            raise UsageError(f"-p: host port {port.host_port}/{port.protocol} is published twice")
        seen.add((port.protocol, port.host_port))
    return Network(mode, ports)
