"""The sector extents extlinux's patch records (converter/boot/syslinux.py _extents, after syslinux's
generate_extents): runs of consecutive sectors, none reaching 64 KiB, in a fixed number of slots."""

from __future__ import annotations

import struct

import pytest

from converter.boot.syslinux import EXTENT, _extents
from converter.errors import ToolError


def _records(packed: bytes) -> list[tuple[int, int]]:
    return [r for r in struct.iter_unpack("<QH", packed) if r != (0, 0)]


def test_consecutive_sectors_are_one_extent_and_unused_slots_are_zero() -> None:
    packed = _extents(list(range(1000, 1113)), 192)
    assert len(packed) == 192 * EXTENT.size
    assert _records(packed) == [(1000, 113)]


def test_a_gap_starts_another_extent() -> None:
    assert _records(_extents([10, 11, 12, 50, 51, 7], 8)) == [(10, 3), (50, 2), (7, 1)]


def test_an_extent_stays_under_64_kib() -> None:
    # 128 sectors would be 64 KiB: extlinux's loader moves less than that at once
    assert _records(_extents(list(range(0, 200)), 16)) == [(0, 127), (127, 73)]


def test_more_pieces_than_slots_is_an_error() -> None:
    with pytest.raises(ToolError, match="pieces"):
        _extents(list(range(0, 20, 2)), 4)
