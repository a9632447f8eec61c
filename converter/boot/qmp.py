"""A minimal QMP client: how ``imgconv boot`` asks qemu to press ctrl-alt-delete or to quit.

qemu connects to a unix socket of ours (``-chardev socket,path=...``, so no other process can take the
connection first); :class:`QmpLink` accepts it only when there is something to say, since most boots end by
themselves and never need it.
"""

from __future__ import annotations

import json
import logging
import socket
from typing import Any

from converter.errors import ToolError

log = logging.getLogger("imgconv.boot.qmp")

QMP_TIMEOUT = 5.0
CTRL_ALT_DELETE = {"keys": [{"type": "qcode", "data": key} for key in ("ctrl", "alt", "delete")]}


class Qmp:
    """One QMP connection: JSON lines over a unix socket, asynchronous events skipped."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = b""

    @classmethod
    def accept(cls, listener: socket.socket, timeout: float = QMP_TIMEOUT) -> Qmp:
        listener.settimeout(timeout)
        conn, _ = listener.accept()
        conn.settimeout(timeout)
        qmp = cls(conn)
        greeting = qmp._read()
        if "QMP" not in greeting:
            raise ToolError(f"qemu's QMP socket did not greet as expected: {greeting}")
        qmp.execute("qmp_capabilities")
        return qmp

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("qemu closed its QMP socket")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        message = json.loads(line)
        if not isinstance(message, dict):
            raise ToolError(f"unexpected QMP message: {line!r}")
        return message

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise ToolError(f"qemu refused {command}: {reply['error'].get('desc', reply['error'])}")
            # an asynchronous event ({"event": ...}): not ours to handle

    def close(self) -> None:
        self._sock.close()


class QmpLink:
    """The QMP connection qemu makes to *listener*, accepted on first use; commands are best effort."""

    def __init__(self, listener: socket.socket) -> None:
        self._listener = listener
        self._qmp: Qmp | None = None

    def send(self, command: str, arguments: dict[str, Any] | None = None) -> None:
        """Run *command*; a failure is only logged, since qemu may be gone already (which is what we wanted)."""
        try:
            if self._qmp is None:
                self._qmp = Qmp.accept(self._listener)
            self._qmp.execute(command, arguments)
        except (OSError, ToolError, ValueError) as exc:
            log.debug("QMP %s: %s", command, exc)

    def close(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
