"""Special tar headers are bounded (issue 9, item 5), through the real CLI: the reproduction, a 261 KB gzip layer
whose GNU long name declares (and holds) 256 MiB, took 1.3 GiB of memory. Now `oci-to-qcow2` refuses it with one
line as soon as the flattener reads its first header, having held little. The unit tests
(tests/unit/test_tar_bounds.py) cover every kind of special header; this one costs an appliance launch.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from tests.builders import END, OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST, Layout, config_json, raw_header
from tests.cli import assert_one_line_error, imgconv

pytestmark = [pytest.mark.appliance]

MiB = 1 << 20


def test_a_256_mib_gnu_long_name_is_refused_in_bounds(tmp_path: Path) -> None:
    packed, plain = io.BytesIO(), hashlib.sha256()
    with gzip.GzipFile(fileobj=packed, mode="wb", compresslevel=9, mtime=0) as gz:
        for piece in [raw_header(b"././@LongLink", tarfile.GNUTYPE_LONGNAME, size=256 * MiB),
                      *([b"a" * MiB] * 256), raw_header(b"x"), END]:
            gz.write(piece)
            plain.update(piece)
    oci = Layout(tmp_path / "layout")
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": oci.blob(config_json([f"sha256:{plain.hexdigest()}"]), OCI_CONFIG),
                "layers": [oci.blob(packed.getvalue(), OCI_LAYER_GZIP)]}
    oci.index(oci.blob(json.dumps(manifest).encode(), OCI_MANIFEST))
    (tmp_path / "out").mkdir()

    ran = imgconv("oci-to-qcow2", "--quiet", "--no-kernel-modules", f"oci:{tmp_path / 'layout'}",
                  str(tmp_path / "out" / "disk.qcow2"), watch_memory=True)
    assert_one_line_error(ran, "layer 0", "GNU long name header of 268435456 bytes", "1 MiB")
    assert list((tmp_path / "out").iterdir()) == []
    assert ran.peak_rss_kib is not None and ran.peak_rss_kib < 400 * 1024, f"{ran.peak_rss_kib} KiB"
