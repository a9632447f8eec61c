"""The parts of converter/disk/inspect.py that need no appliance: what an untrusted disk may claim."""

from __future__ import annotations

import pytest

from converter.disk.inspect import exclude_patterns, origin_record
from converter.errors import DiskError, ImageError


def test_origin_record_is_checked() -> None:
    assert origin_record(b'{"injected": [".imgconv", "lib/modules/6.1"]}')["injected"] == [".imgconv",
                                                                                          "lib/modules/6.1"]
    assert origin_record(b"{}") == {}


@pytest.mark.parametrize("raw", [b"{not json", b"[]", b'"text"', b"\xff\xfe", b"[" * 100000])
def test_malformed_origin_record_is_an_image_error(raw: bytes) -> None:
    with pytest.raises(ImageError, match=r"origin record \(/\.imgconv/origin\.json\)"):
        origin_record(raw)


@pytest.mark.parametrize("raw", [b'{"injected": "etc"}', b'{"injected": [1, 2]}', b'{"injected": null}'])
def test_invalid_injected_list_is_a_disk_error(raw: bytes) -> None:
    with pytest.raises(DiskError, match="invalid"):
        origin_record(raw)


def test_exclude_patterns_escape_glob_characters() -> None:
    assert exclude_patterns(["/tmp", "srv/a*b", "x/[y]?", "back\\slash"]) == [
        "./tmp", "./srv/a\\*b", "./x/\\[y\\]\\?", "./back\\\\slash"]
