"""Verified reading of blobs: size and sha256 are checked as the bytes stream past.

A blob is never trusted before it has been read to its end: :class:`VerifiedReader` raises
:class:`BlobError` the moment it sees too many bytes, and at end of stream when the count or
the digest is wrong. Consumers that stop early (a tar reader at its end-of-archive marker)
must call :func:`drain` so that the check still happens.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import BinaryIO

from converter.errors import BlobError

CHUNK = 1 << 20

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def sniff_compression(head: bytes) -> str:
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "none"


class VerifiedReader(io.RawIOBase):
    """Reads *raw* and checks it is exactly *size* bytes (when known) hashing to *digest*."""

    def __init__(self, raw: BinaryIO, digest: str | None, size: int | None, what: str) -> None:
        super().__init__()
        self._raw = raw
        self._digest = digest
        self._size = size
        self._what = what
        self._hash = hashlib.sha256()
        self._count = 0
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._done:
            return 0
        view = memoryview(buffer)
        if self._size is not None:
            # Never ask for more than the declared size (+1 to detect an oversized blob).
            view = view[: max(1, min(len(view), self._size - self._count + 1))]
        try:
            data = self._raw.read(len(view))
        except OSError as exc:
            raise BlobError(f"{self._what}: read failed after {self._count} bytes: {exc}") from exc
        n = len(data)
        if n == 0:
            self._finish()
            return 0
        self._count += n
        if self._size is not None and self._count > self._size:
            raise BlobError(f"{self._what} is larger than its declared size of {self._size} bytes")
        self._hash.update(data)
        view[:n] = data
        return n

    def _finish(self) -> None:
        self._done = True
        if self._size is not None and self._count != self._size:
            raise BlobError(f"{self._what} is truncated: {self._count} of {self._size} bytes")
        if self._digest is not None:
            actual = "sha256:" + self._hash.hexdigest()
            if actual != self._digest:
                raise BlobError(f"{self._what} has digest {actual}, expected {self._digest}")

    @property
    def verified(self) -> bool:
        return self._done

    @property
    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()

    @property
    def count(self) -> int:
        return self._count


def drain(stream: BinaryIO | io.RawIOBase) -> None:
    """Read *stream* to its end (so that verification at EOF happens)."""
    while stream.read(CHUNK):
        pass


def read_verified(raw: BinaryIO, digest: str, size: int, what: str, limit: int = 64 << 20) -> bytes:
    """Read a small blob (manifest, config) whole, verified. Huge declared sizes are refused."""
    if size > limit:
        raise BlobError(f"{what} declares {size} bytes, more than the {limit} allowed for JSON documents")
    reader = VerifiedReader(raw, digest, size, what)
    data = io.BufferedReader(reader, CHUNK).read()
    return data


class _Decompressed(io.RawIOBase):
    """Decompresses a verified blob stream, turning codec failures into BlobError."""

    def __init__(self, blob: BinaryIO, compression: str, what: str) -> None:
        super().__init__()
        self._what = what
        self._inner: BinaryIO
        if compression == "gzip":
            self._inner = gzip.GzipFile(fileobj=blob, mode="rb")  # type: ignore[assignment]
        elif compression == "zstd":
            import zstandard

            self._inner = zstandard.ZstdDecompressor().stream_reader(blob, read_across_frames=True)
        else:
            self._inner = blob

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        try:
            data = self._inner.read(len(buffer))
        except BlobError:
            raise
        except (OSError, EOFError, zlib.error, ValueError) as exc:
            raise BlobError(f"{self._what}: corrupt compressed data: {exc}") from exc
        except Exception as exc:  # zstandard.ZstdError has no useful base class
            if type(exc).__name__ == "ZstdError":
                raise BlobError(f"{self._what}: corrupt zstd data: {exc}") from exc
            raise
        n = len(data)
        memoryview(buffer)[:n] = data
        return n


@contextmanager
def open_layer_stream(
    opener: Callable[[], BinaryIO],
    *,
    digest: str | None,
    size: int | None,
    compression: str,
    diff_id: str | None,
    what: str,
) -> Iterator[BinaryIO]:
    """Yield the uncompressed tar stream of a layer, verified on both sides of decompression.

    The compressed bytes are checked against *digest*/*size*, the uncompressed bytes against
    *diff_id*. On a normal exit the rest of the stream is drained so both checks always run.
    """
    raw = opener()
    try:
        blob = VerifiedReader(raw, digest, size, what)
        buffered_blob = io.BufferedReader(blob, CHUNK)
        plain = _Decompressed(buffered_blob, compression, what)
        tar_stream = VerifiedReader(
            io.BufferedReader(plain, CHUNK), diff_id, None, f"{what} (uncompressed, diff_id)"
        )
        stream = io.BufferedReader(tar_stream, CHUNK)
        yield stream
        drain(stream)
        drain(buffered_blob)  # trailing bytes after the compressed stream still count
    finally:
        raw.close()
