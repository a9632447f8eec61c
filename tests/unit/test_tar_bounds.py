"""Special tar headers are bounded (issue 9, item 5): a layer cannot make the reader hold more than about a MiB
for one entry's headers, nor a name longer than PATH_MAX, whatever sizes its headers declare.

CPython's tarfile reads a GNU long name (``././@LongLink``) or a PAX record whole into memory, and follows a
chain of such headers by recursion: a 256 MiB long name in a 261 KB gzip layer took 1.3 GiB, and a few thousand
chained PAX headers end in a RecursionError. Go's archive/tar refuses special headers over 1 MiB; so does imgconv.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import tarfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from converter.errors import LayerError
from converter.oci.flatten import LayerInput, flatten
from converter.oci.reference import parse_reference
from converter.oci.tarread import MAX_SPECIAL_HEADER
from converter.oci.tarutil import PATH_MAX, open_output
from converter.oci.transport import open_image
from tests.builders import (
    END,
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    Layout,
    config_json,
    f,
    flat,
    hl,
    layer,
    pad,
    raw_header,
    sym,
)

MiB = 1 << 20


class _Lazy(io.RawIOBase):
    """A tar stream made of pieces; ``(n, chunk)`` is *chunk* repeated n times, never held in memory whole."""

    def __init__(self, *pieces: bytes | tuple[int, bytes]) -> None:
        super().__init__()
        self.chunks = self._chunks(pieces)
        self.left = b""

    @staticmethod
    def _chunks(pieces: tuple[bytes | tuple[int, bytes], ...]) -> Iterator[bytes]:
        for piece in pieces:
            if isinstance(piece, bytes):
                yield piece
                continue
            times, chunk = piece
            per = max(1, (64 << 10) // len(chunk))
            while times > 0:
                yield chunk * min(per, times)
                times -= per

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self.left:
            self.left = next(self.chunks, b"")
        n = min(len(self.left), len(buffer))
        buffer[:n] = self.left[:n]
        self.left = self.left[n:]
        return n


def _run(stream: BinaryIO) -> None:
    @contextmanager
    def opener() -> Iterator[BinaryIO]:
        yield stream

    with open_output(io.BytesIO()) as out:
        flatten([LayerInput("layer 0", opener)], out)


def _refused_in_bounds(make: Callable[[], BinaryIO], *needles: str, trace: bool = True) -> str:
    """Flattening *make()* fails with a one-line LayerError naming the layer, soon, and (traced: tracemalloc
    slows allocation-heavy parsing tenfold, so it runs apart from the timed run) holding little memory."""
    started = time.monotonic()
    with pytest.raises(LayerError) as caught:
        _run(make())
    assert time.monotonic() - started < 10
    message = str(caught.value)
    assert "\n" not in message and message.startswith("layer 0: "), message
    for needle in needles:
        assert needle in message, message
    if trace:
        tracemalloc.start()
        try:
            with pytest.raises(LayerError):
                _run(make())
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 24 * MiB, f"{peak / MiB:.0f} MiB held while refusing"
    return message


HUGE = 256 * MiB


def test_a_256_mib_gnu_long_name_is_refused_unread() -> None:
    header = raw_header(b"././@LongLink", tarfile.GNUTYPE_LONGNAME, size=HUGE)
    _refused_in_bounds(lambda: _Lazy(header, (HUGE, b"a"), raw_header(b"x"), END), "GNU long name", "1 MiB")


def test_a_256_mib_gnu_long_link_is_refused_unread() -> None:
    header = raw_header(b"././@LongLink", tarfile.GNUTYPE_LONGLINK, size=HUGE)
    _refused_in_bounds(lambda: _Lazy(header, (HUGE, b"a"), raw_header(b"x", tarfile.SYMTYPE), END), "GNU long link")


def test_a_256_mib_pax_record_is_refused_unread() -> None:
    record_len = HUGE
    prefix = f"{record_len} comment=".encode()
    body_len = record_len - len(prefix) - 1
    header = raw_header(b"PaxHeader/x", tarfile.XHDTYPE, size=record_len)
    _refused_in_bounds(lambda: _Lazy(header, prefix, (body_len, b"z"), b"\n", raw_header(b"x"), END), "PAX", "1 MiB")


def test_a_256_mib_global_pax_header_is_refused_unread() -> None:
    header = raw_header(b"pax_global_header", tarfile.XGLTYPE, size=HUGE)
    _refused_in_bounds(lambda: _Lazy(header, (HUGE, b"9"), END), "PAX")


def test_a_special_header_just_over_the_cap_is_refused() -> None:
    """The bound is the declared size, not what happens to fit in memory: 1 MiB + 1 is refused."""
    name = b"n" * (MAX_SPECIAL_HEADER + 1)
    data = raw_header(b"././@LongLink", tarfile.GNUTYPE_LONGNAME, size=len(name)) + pad(name) + raw_header(b"x") + END
    _refused_in_bounds(lambda: io.BytesIO(data), "GNU long name")


def test_a_negative_special_header_size_is_refused() -> None:
    header = bytearray(raw_header(b"././@LongLink", tarfile.GNUTYPE_LONGNAME))
    header[124:136] = b"\xff" * 12  # base-256: -1
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header):06o}".encode() + b"\0 "
    _refused_in_bounds(lambda: io.BytesIO(bytes(header) + raw_header(b"x") + END), "GNU long name")


def test_a_chain_of_thousands_of_pax_headers_is_refused() -> None:
    """Each one small, together they made tarfile recurse until RecursionError (a traceback)."""
    one = pad(b"12 comment=\n")
    chain = (raw_header(b"PaxHeader/x", tarfile.XHDTYPE, size=12) + one) * 5000
    _refused_in_bounds(lambda: io.BytesIO(chain + raw_header(b"x") + END), "headers")


def _pax_record(key: str, value: bytes) -> bytes:
    """One PAX record, its length field counting itself."""
    body = f" {key}=".encode() + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode() + body


def test_many_megabytes_of_global_pax_records_cost_no_memory() -> None:
    """Global headers added up across entries when tarfile kept them all (bounded then by refusing their total).
    They are now checked and dropped, as Docker drops them: memory holds one at a time."""
    pieces = []
    for i in range(8):
        record = _pax_record(f"x{i}", b"v" * (512 * 1024))
        pieces.append(raw_header(b"pax_global_header", tarfile.XGLTYPE, size=len(record)) + pad(record))
        pieces.append(raw_header(f"f{i}".encode()))
    data = b"".join(pieces) + END
    tracemalloc.start()
    try:
        tree = flat(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sorted(tree) == [f"f{i}" for i in range(8)]
    assert peak < 24 * MiB, f"{peak / MiB:.0f} MiB held"


def test_old_gnu_sparse_extension_blocks_are_bounded() -> None:
    """An old GNU sparse header can be followed by any number of extension blocks, each read and kept by tarfile.
    The type is now refused at its header, as Docker refuses it ("unhandled tar header type")."""
    header = bytearray(raw_header(b"sparse", tarfile.GNUTYPE_SPARSE, size=0))
    header[482] = 1  # isextended
    header[483:495] = b"00000001000\0"  # realsize
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header):06o}".encode() + b"\0 "
    ext = bytearray(512)
    for i in range(21):
        ext[i * 24:i * 24 + 12] = b"00000000001\0"
        ext[i * 24 + 12:i * 24 + 24] = b"00000000001\0"
    ext[504] = 1
    _refused_in_bounds(lambda: _Lazy(bytes(header), (200_000, bytes(ext))), "type 'S'")  # 100 MiB of them


def test_a_gnu_sparse_1_0_map_is_bounded() -> None:
    """PAX GNU sparse 1.0 keeps its map in the data blocks, as long as its first number says."""
    record = b"".join(_pax_record(k, v) for k, v in [("GNU.sparse.major", b"1"), ("GNU.sparse.minor", b"0"),
                                                     ("GNU.sparse.name", b"s"), ("GNU.sparse.realsize", b"10")])
    header = raw_header(b"PaxHeader/s", tarfile.XHDTYPE, size=len(record)) + pad(record)
    member = raw_header(b"s", size=HUGE)
    _refused_in_bounds(lambda: _Lazy(header, member, b"99999999\n", (HUGE // 2, b"1\n")), "headers", trace=False)


# -- names ---------------------------------------------------------------------------------------------------


def _deep(length: int) -> str:
    """A relative path of exactly *length* bytes."""
    parts, total = [], 0
    while total < length:
        part = "d" * min(200, length - total - (1 if parts else 0))
        if not part:
            parts[-1] += "d"
            break
        parts.append(part)
        total += len(part) + (1 if len(parts) > 1 else 0)
    path = "/".join(parts)
    assert len(path) == length, len(path)
    return path


def test_a_path_of_path_max_is_kept_and_one_byte_more_is_refused() -> None:
    ok = _deep(PATH_MAX)
    assert ok in flat(layer(f(ok, "x")))
    long = _deep(PATH_MAX + 1)
    with pytest.raises(LayerError, match=r"^layer 0: .*longer than 4096 bytes") as caught:
        flat(layer(f(long, "x")))
    assert len(str(caught.value)) < 300


@pytest.mark.parametrize("make", [lambda t: sym("link", t), lambda t: hl("link", t)], ids=["symlink", "hard link"])
def test_a_link_target_longer_than_path_max_is_refused(make: Callable[[str], Any]) -> None:
    target = _deep(PATH_MAX + 1)
    with pytest.raises(LayerError, match="longer than 4096 bytes"):
        flat(layer(f(target, "x"), make(target)))


def test_names_are_measured_in_bytes() -> None:
    name = "\u00e9" * (PATH_MAX // 2 + 1)  # 2 bytes each in UTF-8
    with pytest.raises(LayerError, match="longer than 4096 bytes"):
        flat(layer(f(name, "x")))


def test_ordinary_long_names_still_flatten() -> None:
    gnu = "g/" + "x" * 250
    pax = "p/" + "/".join(["y" * 255] * 12)  # 3000 bytes, each component at NAME_MAX
    tree = flat(layer(f(gnu, "1"), sym("s", "t" * 300), format=tarfile.GNU_FORMAT), layer(f(pax, "2")))
    assert gnu in tree and pax in tree and tree["s"].linkname == "t" * 300


# -- through the image: a gzip layer of an OCI layout ---------------------------------------------------------


def test_a_compressed_long_name_layer_is_refused_in_bounds(tmp_path: Path) -> None:
    """The 261 KB reproduction: 256 MiB of long name, gzip-compressed, read through the verified image path."""
    raw, plain = io.BytesIO(), hashlib.sha256()
    with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as gz:
        for piece in [raw_header(b"././@LongLink", tarfile.GNUTYPE_LONGNAME, size=HUGE),
                      *([b"a" * MiB] * (HUGE // MiB)), raw_header(b"x"), END]:
            gz.write(piece)
            plain.update(piece)
    assert len(raw.getvalue()) < 400_000
    oci = Layout(tmp_path / "oci")
    config = oci.blob(config_json([f"sha256:{plain.hexdigest()}"]), OCI_CONFIG)
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config,
                "layers": [oci.blob(raw.getvalue(), OCI_LAYER_GZIP)]}
    oci.index(oci.blob(json.dumps(manifest).encode(), OCI_MANIFEST))

    with open_image(parse_reference(f"oci:{oci.root}")) as image:
        layers = [LayerInput(item.what, functools.partial(image.open_layer, item)) for item in image.layers]
        tracemalloc.start()
        try:
            with pytest.raises(LayerError, match=r"^layer 0 \(sha256:\w+\): .*GNU long name"), \
                    open_output(io.BytesIO()) as out:
                flatten(layers, out)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 24 * MiB, f"{peak / MiB:.0f} MiB held while refusing"
