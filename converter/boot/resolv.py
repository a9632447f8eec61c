"""Docker's /etc/resolv.conf rules: what ``docker run --network none`` gives a container on this host.

Like ``docker run``, which makes a container's /etc/resolv.conf from the host's when it starts, ``imgconv boot``
passes the guest :func:`host_resolv_conf` as the QEMU firmware config file ``opt/imgconv/resolv.conf`` (the guest
init bind-mounts it on /etc/resolv.conf).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

log = logging.getLogger("imgconv.boot.resolv")

RESOLV_CONF_FW_CFG = "opt/imgconv/resolv.conf"  # read by init.c

# docker's libnetwork (20.10, resolvconf and sandbox_dns_unix.go), its regular expressions kept as
# they are. Go's \s is [\t\n\f\r ] and \w is [0-9A-Za-z_]; both have Python's leftmost-first matching.

_GO_S = rb"[\t\n\f\r ]"
_IPV4_BLOCK = rb"(25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)"
_IPV4 = rb"(" + _IPV4_BLOCK + rb"\.){3}" + _IPV4_BLOCK
_IPV6 = rb"([0-9A-Fa-f]{0,4}:){2,7}([0-9A-Fa-f]{0,4})(%[0-9A-Za-z_]+)?"
_LOCALHOST_NS_RE = re.compile(
    rb"(?m)^nameserver" + _GO_S + rb"+((127\.([0-9]{1,3}\.){2}[0-9]{1,3})|(::1)$)" + _GO_S + rb"*\n*"
)
_IPV6_NS_RE = re.compile(rb"(?m)^nameserver" + _GO_S + rb"+" + _IPV6 + _GO_S + rb"*\n*")
_NS_LINE_RE = re.compile(
    _GO_S + rb"*nameserver" + _GO_S + rb"*((" + _IPV4 + rb")|(" + _IPV6 + rb"))" + _GO_S + rb"*"
)
_DEFAULT_IPV4_DNS = (b"nameserver 8.8.8.8", b"nameserver 8.8.4.4")
_DEFAULT_IPV6_DNS = (b"nameserver 2001:4860:4860::8888", b"nameserver 2001:4860:4860::8844")
HOST_RESOLV_CONF = Path("/etc/resolv.conf")
SYSTEMD_RESOLV_CONF = Path("/run/systemd/resolve/resolv.conf")


def _nameservers(content: bytes) -> list[bytes]:
    """libnetwork's GetNameservers: the addresses of the nameserver lines (comments cut at '#')."""
    lines = (_NS_LINE_RE.fullmatch(line.partition(b"#")[0]) for line in content.split(b"\n"))
    return [m.group(1) for m in lines if m is not None]


def _filter_resolv_dns(content: bytes, *, ipv6: bool) -> bytes:
    """libnetwork's FilterResolvDNS: localhost nameservers out (and IPv6 ones without IPv6); Google's
    public DNS when no nameserver is left."""
    cleaned = _LOCALHOST_NS_RE.sub(b"", content)
    if not ipv6:
        cleaned = _IPV6_NS_RE.sub(b"", cleaned)
    if not _nameservers(cleaned):
        cleaned += b"\n" + b"\n".join(_DEFAULT_IPV4_DNS + (_DEFAULT_IPV6_DNS if ipv6 else ()))
    return cleaned


def docker_resolv_conf(host: bytes | None, systemd: bytes | None = None) -> bytes:
    """The /etc/resolv.conf ``docker run --network none`` gives a container on a host whose
    /etc/resolv.conf holds *host* (None: there is none) and whose systemd-resolved file holds *systemd*.

    libnetwork reads systemd-resolved's file instead when the host's only nameserver is its stub
    (127.0.0.53), filters it when the sandbox is made (IPv6 assumed), and again when the container
    joins the ``none`` network (no IPv6).
    """
    if _nameservers(host or b"") == [b"127.0.0.53"]:
        host = systemd
    return _filter_resolv_dns(_filter_resolv_dns(host or b"", ipv6=True), ipv6=False)


def host_resolv_conf() -> bytes:
    """:func:`docker_resolv_conf` of this host."""

    def read(path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.debug("cannot read %s: %s", path, exc)
            return None

    return docker_resolv_conf(read(HOST_RESOLV_CONF), read(SYSTEMD_RESOLV_CONF))
