"""The workload's stdin, stdout and stderr between ``imgconv boot`` and the guest, byte-exact and kept apart.

The serial console cannot do this: it carries one stream, so stdout and stderr merge, and its line discipline
rewrites bytes (``\\n`` becomes ``\\r\\n``). So the guest gets a virtio-serial port, ``imgconv.stream``, whose host
end is a unix socket qemu connects to (ours: nobody else can take it), and the guest init (``init/stream.h``)
relays the workload's stdio over it in frames, Docker's attach format (stdcopy): an 8-byte header (the stream's
type, three zero bytes, the payload's length as big-endian 32 bits) and the payload.

- guest to host: 1 stdout, 2 stderr, 3 exit (one byte, the status), 4 hello (the protocol version);
- host to guest: 0 stdin, 5 end of stdin, 6 window size (rows, columns: big-endian 16 bits), 7 ack of the exit.

The ack tells the init that everything it wrote has reached us, so it may power off: a frame still inside qemu
when the VM stops would be lost. The exit status is then also printed on the console as before, where
:mod:`converter.boot.console` reads it. The port is named to the guest in the firmware config file
``opt/imgconv/stream``; a guest init older than this ignores both and writes its output on the console, which
still works, except for ``-i`` and ``-t`` (:attr:`StreamLink.hello` tells the two apart).

Sending happens on one thread (:class:`_Sender`), control frames first: the stdin reader may be blocked behind a
guest that does not read its stdin, and the ack or a window size must not wait for that.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import signal
import socket
import struct
import sys
import termios
import threading
import tty
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType
from typing import BinaryIO

log = logging.getLogger("imgconv.boot.streams")

STREAM_FW_CFG = "opt/imgconv/stream"  # read by init/stream.h
PORT_NAME = "imgconv.stream"
STREAM_VERSION = 1
FRAME_MAX = 65536
STDIN, STDOUT, STDERR, EXIT, HELLO, STDIN_EOF, WINSIZE, ACK = range(8)
_HEADER = struct.Struct(">B3xI")
_STDIN_IN_FLIGHT = 4  # stdin frames queued before the reader waits: a guest that does not read holds it back


def frame(kind: int, payload: bytes = b"") -> bytes:
    """One frame (module docstring)."""
    if len(payload) > FRAME_MAX:
        raise ValueError(f"a frame carries at most {FRAME_MAX} bytes, not {len(payload)}")
    return _HEADER.pack(kind, len(payload)) + payload


class FrameReader:
    """Frames out of a byte stream that arrives in pieces. A malformed header ends the reading: the peer does not
    speak this protocol, and nothing after it can be trusted to be framed."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.broken = False

    def feed(self, data: bytes) -> Iterator[tuple[int, bytes]]:
        if self.broken:
            return
        self._buf += data
        while len(self._buf) >= _HEADER.size:
            kind, length = _HEADER.unpack_from(self._buf)
            if self._buf[1:4] != b"\0\0\0" or length > FRAME_MAX or kind > ACK:
                self.broken = True
                self._buf.clear()
                return
            if len(self._buf) < _HEADER.size + length:
                return
            payload = bytes(self._buf[_HEADER.size : _HEADER.size + length])
            del self._buf[: _HEADER.size + length]
            yield kind, payload

    @property
    def pending(self) -> int:
        return len(self._buf)


class _Sender(threading.Thread):
    """Writes frames to the port's socket in order, control frames (ack, window size) before stdin."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(name="imgconv-stream-sender", daemon=True)
        self._sock = sock
        self._queue: queue.PriorityQueue[tuple[int, int, bytes | None]] = queue.PriorityQueue()
        self._order = itertools.count()
        self.stdin_slots = threading.Semaphore(_STDIN_IN_FLIGHT)

    def put(self, data: bytes | None, *, control: bool) -> None:
        self._queue.put((0 if control else 1, next(self._order), data))

    def stop(self) -> None:
        self._queue.put((-1, next(self._order), None))

    def run(self) -> None:
        while True:
            priority, _, data = self._queue.get()
            if data is None:
                return
            try:
                self._sock.sendall(data)
            except OSError as exc:  # qemu is gone: so is the guest
                log.debug("stream port: %s", exc)
                return
            finally:
                if priority == 1:
                    self.stdin_slots.release()


@dataclass(frozen=True)
class Stdio:
    """Where the workload's streams go on the host, and what it gets: ``-i`` forwards *stdin* (a file
    descriptor), ``-t`` gives it a terminal."""

    stdout: BinaryIO
    stderr: BinaryIO
    stdin: int | None = None
    tty: bool = False


class StreamLink:
    """The host end of the stream port: qemu connects to *listener*; :meth:`accept` takes the connection when the
    listener is readable, :meth:`data` handles what comes (output to :attr:`stdio`, an ack for the exit)."""

    def __init__(self, listener: socket.socket, stdio: Stdio) -> None:
        self._listener = listener
        self.stdio = stdio
        self._reader = FrameReader()
        self._sender: _Sender | None = None
        self.conn: socket.socket | None = None
        self.hello = False
        self.exit_status: int | None = None
        self._winch = threading.Event()

    def fileno(self) -> int:
        return self._listener.fileno()

    def accept(self) -> socket.socket:
        conn, _ = self._listener.accept()
        self.conn = conn
        self._sender = _Sender(conn)
        self._sender.start()
        if self.stdio.stdin is not None:
            threading.Thread(target=self._forward_stdin, name="imgconv-stdin", daemon=True).start()
        return conn

    def data(self, chunk: bytes) -> None:
        for kind, payload in self._reader.feed(chunk):
            if kind in (STDOUT, STDERR):
                out = self.stdio.stdout if kind == STDOUT else self.stdio.stderr
                out.write(payload)
                out.flush()
            elif kind == HELLO:
                self.hello = True
            elif kind == EXIT and len(payload) == 1:
                self.exit_status = payload[0]
                self._control(frame(ACK))
        if self._reader.broken:
            log.debug("the guest's stream port sent a malformed frame; ignoring the rest")

    def tick(self) -> None:
        """The supervisor's clock: send the terminal's new size if it changed."""
        if self._winch.is_set():
            self._winch.clear()
            self._control(frame(WINSIZE, window_size()))

    def window_changed(self) -> None:
        self._winch.set()

    def close(self) -> None:
        if self._sender is not None:
            self._sender.stop()
        if self.conn is not None:
            self.conn.close()

    def _control(self, data: bytes) -> None:
        if self._sender is not None:
            self._sender.put(data, control=True)

    def _forward_stdin(self) -> None:
        """The host's stdin, as it comes, then its end (a daemon thread: a read of a terminal cannot be
        interrupted, and the process may end while it waits)."""
        assert self.stdio.stdin is not None and self._sender is not None
        while True:
            try:
                data = os.read(self.stdio.stdin, FRAME_MAX)
            except OSError as exc:
                log.debug("stdin: %s", exc)
                data = b""
            self._sender.stdin_slots.acquire()
            self._sender.put(frame(STDIN, data) if data else frame(STDIN_EOF), control=False)
            if not data:
                return


def window_size() -> bytes:
    """The host terminal's size as the window-size payload; 0x0 when stdout is no terminal (as Docker leaves it)."""
    try:
        columns, rows = os.get_terminal_size(sys.stdout.fileno())
    except (OSError, ValueError):
        columns = rows = 0
    return struct.pack(">HH", min(rows, 65535), min(columns, 65535))


@contextlib.contextmanager
def host_terminal(link: StreamLink | None, interactive: bool) -> Iterator[None]:
    """With ``-t``: the host terminal's size follows into the guest (SIGWINCH), and with ``-i`` the terminal is in
    raw mode, so that every key (Ctrl-C included) reaches the guest's terminal, which acts on it; restored after."""
    if link is None or not link.stdio.tty:
        yield
        return
    previous = signal.getsignal(signal.SIGWINCH)

    def winch(_sig: int, _frame: FrameType | None) -> None:
        link.window_changed()

    signal.signal(signal.SIGWINCH, winch)
    saved = None
    stdin = link.stdio.stdin
    if interactive and stdin is not None and os.isatty(stdin):
        saved = termios.tcgetattr(stdin)
        tty.setraw(stdin)
    try:
        yield
    finally:
        if saved is not None and stdin is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        signal.signal(signal.SIGWINCH, previous)
