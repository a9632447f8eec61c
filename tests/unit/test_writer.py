"""LayerWriter: SOURCE_DATE_EPOCH clamps every entry's time, including the exact PAX mtime GNU tar writes."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest

from converter.oci.layout import LayoutWriter
from converter.oci.tarutil import clean_header
from converter.oci.writer import LayerWriter, clamp_mtime

EPOCH = 1700000000


def _member(mtime: float, exact: str | None) -> tarfile.TarInfo:
    info = tarfile.TarInfo("f")
    info.mtime = mtime
    if exact is not None:
        info.pax_headers = {"mtime": exact}
    return info


@pytest.mark.parametrize(("mtime", "exact", "expected"), [
    (1795606538.688, "1795606538.687999855", (EPOCH, None)),  # GNU tar --posix: newer, clamped
    (1600000000.5, "1600000000.499999999", (1600000000.5, "1600000000.499999999")),  # older: kept exactly
    (float(EPOCH), f"{EPOCH}.000000001", (EPOCH, None)),  # a nanosecond newer than the float shows
    (1795606538, None, (EPOCH, None)),
    (1.0, "garbage", (EPOCH, None)),
])
def test_clamp_mtime(mtime: float, exact: str | None, expected: tuple[float, str | None]) -> None:
    info = _member(mtime, exact)
    clamp_mtime(info, EPOCH)
    assert (info.mtime, info.pax_headers.get("mtime")) == expected


def test_written_layer_has_no_entry_newer_than_the_epoch(tmp_path: Path) -> None:
    source = _member(1795606538.688, "1795606538.687999855")
    layout = LayoutWriter(tmp_path / "layout")
    with LayerWriter(layout, "gzip", clamp_mtime=EPOCH) as layer:
        layer.add(clean_header(source, "f"), io.BytesIO(b""))
    assert layer.result is not None
    blob = layout.store.blob_path(layer.result.descriptor.digest).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tar:
        (member,) = tar.getmembers()
    assert member.mtime == EPOCH and "mtime" not in member.pax_headers
