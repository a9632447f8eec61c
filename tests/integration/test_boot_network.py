"""`imgconv boot`'s network (issue 10 item 4): a NIC on QEMU's user network by default, only loopback with
`--network none` (judged by `docker run --network none` of the same image), `-p` to a server in the guest.

One image, converted once: a FROM-scratch busybox whose Entrypoint lists the interfaces and, when there is an
eth0, prints its facts, fetches a page from the host through the gateway (outbound; the host's server listens
on 127.0.0.1 only, which QEMU's user network reaches as 10.0.2.2), then serves /www with busybox httpd on 8080.
Without eth0 it exits 0 after the list, in a container as in the VM. Everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from converter.boot.resolv import host_resolv_conf
from converter.errors import EXIT_INTERRUPTED
from fixtures.busybox import PATH, base_layer
from fixtures.image import ImageSpec, write_docker_archive, write_oci_layout
from tests.cli import imgconv, start
from tests.world import DockerWorld

pytestmark = [pytest.mark.appliance, pytest.mark.boot, pytest.mark.docker]

REPO_TAG = "imgconv-test/network:1"
PAGE = b"hello from the guest\n"
HOST_PAGE = b"hello from the host\n"
STOP_TIMEOUT = 10  # imgconv boot's default --stop-timeout, as docker's


def _script(host_port: int) -> str:
    return f"""ls /sys/class/net
if [ -e /sys/class/net/eth0 ]; then
  echo "operstate=$(cat /sys/class/net/eth0/operstate)"
  busybox ip -4 addr show dev eth0 | grep inet
  busybox ip route
  busybox wget -q -O - http://10.0.2.2:{host_port}/ || echo outbound failed
  cat /etc/resolv.conf
  mkdir -p /www && echo {PAGE.decode().strip()} > /www/index.html
  echo serving
  exec busybox httpd -f -p 8080 -h /www
fi
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _HostPage(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(HOST_PAGE)))
        self.end_headers()
        self.wfile.write(HOST_PAGE)

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass(frozen=True)
class NetImage:
    disk: Path
    repo_tag: str


@pytest.fixture(scope="session")
def host_server() -> Iterator[int]:
    """An HTTP server on 127.0.0.1 only: what the guest reaches outbound."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HostPage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def net_image(tmp_path_factory: pytest.TempPathFactory, docker_world: DockerWorld, host_server: int) -> NetImage:
    root = tmp_path_factory.mktemp("network")
    spec = ImageSpec(layers=[base_layer()],
                     config={"Env": [f"PATH={PATH}"], "Entrypoint": ["/bin/sh", "-c", _script(host_server)]})
    write_oci_layout(spec, root / "oci", "1")
    write_docker_archive(spec, root / "image.tar", REPO_TAG)
    docker_world.load(root / "image.tar")
    disk = root / "network.qcow2"
    imgconv("oci-to-qcow2", "--quiet", f"oci:{root / 'oci'}:1", str(disk), timeout=600).ok()
    return NetImage(disk, REPO_TAG)


def test_network_none_is_only_loopback_as_docker(net_image: NetImage, docker_world: DockerWorld) -> None:
    docker = docker_world.run(net_image.repo_tag)  # `docker run --network none`
    assert (docker.stdout, docker.exit_code) == (b"lo\n", 0)
    ran = imgconv("boot", "--network", "none", "--timeout", "240", str(net_image.disk), timeout=300)
    assert (ran.stdout_bytes, ran.code) == (docker.stdout, docker.exit_code), ran.describe()


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in task.read_text().split():
            found |= {int(child), *_children(int(child))}
    return found


def _read_until(proc: subprocess.Popen[bytes], needle: bytes, seconds: float) -> bytes:
    """imgconv's stdout up to *needle* (a thread reads, so a silent guest cannot hang the test)."""
    assert proc.stdout is not None
    stream = proc.stdout
    got = bytearray()
    seen = threading.Event()

    def read() -> None:
        while needle not in got and (chunk := os.read(stream.fileno(), 4096)):
            got.extend(chunk)
        seen.set()

    threading.Thread(target=read, daemon=True).start()
    seen.wait(seconds)
    return bytes(got)


def _get(url: str, seconds: float = 60) -> bytes:
    """GET *url*, again while httpd is not listening yet ("serving" is printed right before it starts): QEMU
    accepts on the host's side at once and resets the connection when the guest refuses it."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=30) as reply:
                return bytes(reply.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_nic_by_default_publish_and_sigint(net_image: NetImage, host_server: int) -> None:
    port = _free_port()
    proc = start("boot", "-p", f"127.0.0.1:{port}:8080", str(net_image.disk))
    try:
        out = _read_until(proc, b"serving\n", 240)
        qemus = {pid for pid in _children(proc.pid)
                 if b"qemu-system" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]}
        text = out.decode(errors="replace")
        assert out.startswith(b"eth0\nlo\noperstate=up\n"), text
        assert "inet 10.0.2.15/24 " in text and "scope global eth0" in text, text
        assert "default via 10.0.2.2 dev eth0" in text and "10.0.2.0/24 dev eth0" in text, text
        assert HOST_PAGE in out, f"the guest could not reach the host through 10.0.2.2: {text}"
        assert host_resolv_conf() + b"serving\n" in out, "the guest's /etc/resolv.conf is Docker's"
        assert qemus, "qemu runs as imgconv's child"

        assert _get(f"http://127.0.0.1:{port}/index.html") == PAGE

        proc.send_signal(signal.SIGINT)
        asked = time.monotonic()
        proc.communicate(timeout=STOP_TIMEOUT + 60)
        # httpd, PID 1 of its namespace without a TERM handler, ignores SIGTERM: the VM is quit after the timeout.
        assert time.monotonic() - asked < STOP_TIMEOUT + 20
        assert proc.returncode == EXIT_INTERRUPTED
        assert not [pid for pid in qemus if Path(f"/proc/{pid}").exists()], "qemu outlived imgconv"
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    finally:  # a failed assertion must not leave a VM behind: qemu runs in a session of its own
        if proc.poll() is None:
            for pid in _children(proc.pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.communicate()
