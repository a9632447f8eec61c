"""Verified reading of blobs: a blob is trusted only once read to its end with the right size and digest, on
both sides of decompression, whatever the consumer does with the stream."""

from __future__ import annotations

import gzip
import io
import tarfile
from collections.abc import Callable
from typing import BinaryIO

import pytest
import zstandard

from converter.errors import BlobError
from converter.oci.blobs import VerifiedReader, drain, open_layer_stream, read_verified, sniff_compression
from tests.builders import f, layer, sha256

TAR = layer(f("etc/hostname", "box\n"), f("bin/app", b"\x7fELF" + bytes(range(256)) * 64, 0o755))


class Endless(io.RawIOBase):
    """A stream that never ends (a hostile registry, /dev/zero): counts what was asked of it."""

    def __init__(self) -> None:
        self.served = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        n = len(buffer)
        buffer[:n] = b"\0" * n
        self.served += n
        return n


class Tracked(io.BytesIO):
    closed_by_reader = False

    def close(self) -> None:
        Tracked.closed_by_reader = True
        super().close()


def blob_error(run: Callable[[], object]) -> str:
    with pytest.raises(BlobError) as caught:
        run()
    message = str(caught.value)
    assert message and "\n" not in message
    return message


def read_layer(blob: bytes, *, compression: str, digest: str | None = None, size: int | None = None,
               diff_id: str | None = None, consume: int | None = -1) -> bytes:
    """Open *blob* as a layer; the consumer reads *consume* bytes (-1: all, None: nothing) and stops."""
    with open_layer_stream(lambda: io.BytesIO(blob), digest=sha256(blob) if digest is None else digest,
                           size=len(blob) if size is None else size, compression=compression,
                           diff_id=sha256(TAR) if diff_id is None else diff_id, what="layer 3 (sha256:x)") as s:
        return b"" if consume is None else s.read(consume)


# -- VerifiedReader ----------------------------------------------------------------------------------------------


def test_exact_blob_reads_through() -> None:
    reader = VerifiedReader(io.BytesIO(TAR), sha256(TAR), len(TAR), "blob")
    assert io.BufferedReader(reader).read() == TAR
    assert reader.verified and reader.count == len(TAR) and reader.digest == sha256(TAR)
    assert reader.read(10) == b""  # reading on after the end stays quiet


def test_wrong_digest() -> None:
    message = blob_error(lambda: io.BufferedReader(VerifiedReader(io.BytesIO(TAR), sha256(b"x"), len(TAR),
                                                                  "blob sha256:x")).read())
    assert sha256(TAR) in message and sha256(b"x") in message and message.startswith("blob sha256:x")


def test_truncated() -> None:
    message = blob_error(lambda: io.BufferedReader(VerifiedReader(io.BytesIO(TAR[:-7]), sha256(TAR), len(TAR),
                                                                  "blob")).read())
    assert f"{len(TAR) - 7} of {len(TAR)} bytes" in message and "truncated" in message


def test_oversized_is_caught_at_the_first_extra_byte_even_if_endless() -> None:
    source = Endless()
    message = blob_error(lambda: drain(VerifiedReader(source, None, 1000, "blob")))  # type: ignore[arg-type]
    assert "larger than its declared size of 1000 bytes" in message
    assert source.served <= 1001


def test_zero_size_blob() -> None:
    assert io.BufferedReader(VerifiedReader(io.BytesIO(b""), sha256(b""), 0, "blob")).read() == b""
    assert "larger" in blob_error(lambda: drain(VerifiedReader(io.BytesIO(b"x"), sha256(b""), 0, "blob")))


def test_read_failure_is_a_blob_error() -> None:
    class Failing(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
            raise OSError(5, "Input/output error")

    assert "Input/output error" in blob_error(lambda: drain(VerifiedReader(Failing(), None, 10, "blob")))  # type: ignore[arg-type]


def test_read_verified_refuses_huge_documents_before_reading() -> None:
    source = Endless()
    message = blob_error(lambda: read_verified(source, sha256(b""), 1 << 40, "manifest sha256:x"))  # type: ignore[arg-type]
    assert "manifest sha256:x" in message and source.served == 0
    assert read_verified(io.BytesIO(b"{}"), sha256(b"{}"), 2, "config") == b"{}"


def test_sniff_compression() -> None:
    assert sniff_compression(gzip.compress(b"x")[:4]) == "gzip"
    assert sniff_compression(zstandard.ZstdCompressor().compress(b"x")[:4]) == "zstd"
    assert sniff_compression(TAR[:4]) == "none"
    assert sniff_compression(b"") == "none"


# -- layers ------------------------------------------------------------------------------------------------------

GZ = gzip.compress(TAR, mtime=0)
ZST = zstandard.ZstdCompressor().compress(TAR)


@pytest.mark.parametrize(("blob", "compression"), [(TAR, "none"), (GZ, "gzip"), (ZST, "zstd")])
def test_layer_reads_back_verified(blob: bytes, compression: str) -> None:
    assert read_layer(blob, compression=compression) == TAR


def test_concatenated_gzip_members_and_zstd_frames_are_one_stream() -> None:
    half = len(TAR) // 2
    gz = gzip.compress(TAR[:half], mtime=0) + gzip.compress(TAR[half:], mtime=0)
    zst = zstandard.ZstdCompressor().compress(TAR[:half]) + zstandard.ZstdCompressor().compress(TAR[half:])
    assert read_layer(gz, compression="gzip") == TAR
    assert read_layer(zst, compression="zstd") == TAR


@pytest.mark.parametrize(("blob", "compression"), [(TAR, "none"), (GZ, "gzip"), (ZST, "zstd")])
@pytest.mark.parametrize("consume", [None, 0, 100, -1], ids=["untouched", "zero", "partial", "all"])
def test_wrong_blob_digest_is_caught_however_little_is_read(blob: bytes, compression: str,
                                                             consume: int | None) -> None:
    message = blob_error(lambda: read_layer(blob, compression=compression, digest=sha256(b"other"), consume=consume))
    assert message.startswith("layer 3 (sha256:x) has digest") and sha256(b"other") in message


@pytest.mark.parametrize(("blob", "compression"), [(TAR, "none"), (GZ, "gzip"), (ZST, "zstd")])
@pytest.mark.parametrize("consume", [None, 100, -1], ids=["untouched", "partial", "all"])
def test_diff_id_mismatch(blob: bytes, compression: str, consume: int | None) -> None:
    message = blob_error(lambda: read_layer(blob, compression=compression, diff_id=sha256(b"other"), consume=consume))
    assert "diff_id" in message and sha256(TAR) in message and sha256(b"other") in message


@pytest.mark.parametrize(("blob", "compression"), [(TAR, "none"), (GZ, "gzip"), (ZST, "zstd")])
def test_truncated_blob(blob: bytes, compression: str) -> None:
    cut = blob[: len(blob) // 2]
    message = blob_error(lambda: read_layer(cut, compression=compression, digest=sha256(blob), size=len(blob),
                                            consume=None))
    assert "truncated" in message and f"of {len(blob)} bytes" in message


@pytest.mark.parametrize(("blob", "compression"), [(TAR, "none"), (GZ, "gzip"), (ZST, "zstd")])
def test_oversized_blob(blob: bytes, compression: str) -> None:
    longer = blob + b"\0" * 4096
    message = blob_error(lambda: read_layer(longer, compression=compression, digest=sha256(blob), size=len(blob)))
    assert "larger than its declared size" in message


@pytest.mark.parametrize(("blob", "compression"), [(GZ, "gzip"), (ZST, "zstd")])
@pytest.mark.parametrize("consume", [None, -1], ids=["untouched", "all"])
def test_trailing_garbage_after_the_compressed_stream(blob: bytes, compression: str, consume: int | None) -> None:
    # Digest and size cover the garbage (a registry serves it as part of the blob); the decompressor must object.
    message = blob_error(lambda: read_layer(blob + b"GARBAGE!" * 8, compression=compression, consume=consume))
    assert "corrupt" in message and "layer 3" in message


def test_gzip_zero_padding_is_tolerated_like_gzip1() -> None:
    # gzip(1) ignores trailing zero bytes ("decompression OK, trailing zero bytes ignored"), and so do we.
    assert read_layer(GZ + b"\0" * 512, compression="gzip") == TAR


def corrupt_middle(blob: bytes) -> bytes:
    middle = len(blob) // 2
    return blob[:middle] + bytes(b ^ 0x5A for b in blob[middle:middle + 16]) + blob[middle + 16:]


@pytest.mark.parametrize(("blob", "compression"), [
    (corrupt_middle(GZ), "gzip"),
    (GZ[:-8] + b"\0\0\0\0" + GZ[-4:], "gzip"),  # CRC32 wrong, data intact
    (GZ[:-4] + b"\0\0\0\0", "gzip"),  # ISIZE wrong
    (GZ[: len(GZ) // 2], "gzip"),  # a gzip stream that stops (blob digest and size match the cut)
    (corrupt_middle(ZST), "zstd"),
    (ZST[: len(ZST) // 2], "zstd"),
    (b"\x1f\x8b" + b"\xff" * 64, "gzip"),
    (b"\x28\xb5\x2f\xfd" + b"\xff" * 64, "zstd"),
    (TAR, "gzip"),  # declared gzip, is plain tar
    (GZ, "zstd"),
])
@pytest.mark.parametrize("consume", [None, -1], ids=["untouched", "all"])
def test_corrupt_compressed_data(blob: bytes, compression: str, consume: int | None) -> None:
    message = blob_error(lambda: read_layer(blob, compression=compression, consume=consume))
    assert "layer 3" in message
    assert "corrupt" in message or "diff_id" in message


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_zero_length_layer_is_an_empty_layer(compression: str) -> None:
    assert read_layer(b"", compression=compression, diff_id=sha256(b"")) == b""


def test_a_consumer_error_is_not_masked_and_the_blob_is_closed() -> None:
    Tracked.closed_by_reader = False

    def opener() -> BinaryIO:
        return Tracked(GZ)

    with pytest.raises(KeyError), open_layer_stream(opener, digest=sha256(b"wrong"), size=len(GZ),
                                                    compression="gzip", diff_id=None, what="layer"):
        raise KeyError("the consumer's own failure")
    assert Tracked.closed_by_reader


def test_a_tar_reader_that_stops_at_the_end_marker_still_gets_the_check() -> None:
    # tarfile stops at the end-of-archive blocks; what follows (here: a wrong diff_id's worth of padding) must
    # still be read and checked when the block ends.
    padded = TAR + b"\0" * 10240
    gz = gzip.compress(padded, mtime=0)
    with pytest.raises(BlobError, match="diff_id"), open_layer_stream(
            lambda: io.BytesIO(gz), digest=sha256(gz), size=len(gz), compression="gzip", diff_id=sha256(TAR),
            what="layer") as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        assert [m.name for m in tar] == ["etc/hostname", "bin/app"]
