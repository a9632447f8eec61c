"""The one SOURCE_DATE_EPOCH reader and the one atomic write (converter/epoch.py, converter/artifact.py)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from converter.artifact import atomic_write, now_utc
from converter.epoch import source_date_epoch, timestamp
from converter.errors import UsageError


@pytest.mark.parametrize(("value", "expected"), [("", None), ("  ", None), ("0", 0), (" 1700000000\n", 1700000000)])
def test_source_date_epoch_reads_seconds(monkeypatch: pytest.MonkeyPatch, value: str, expected: int | None) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", value)
    assert source_date_epoch() == expected


def test_source_date_epoch_default_applies_only_when_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    assert source_date_epoch(default=0) == 0
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "5")
    assert source_date_epoch(default=0) == 5


@pytest.mark.parametrize("value", ["-1", "1.5", "1e9", "abc", "\u0661\u0662", "9" * 5000, "253402300800"])
def test_malformed_source_date_epoch_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """Both readers refuse it (oci-to-qcow2's sidecar time used to fall back to "now" silently)."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", value)
    with pytest.raises(UsageError, match="SOURCE_DATE_EPOCH") as caught:
        source_date_epoch()
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 200
    with pytest.raises(UsageError):
        now_utc()


def test_timestamp_and_now_utc(monkeypatch: pytest.MonkeyPatch) -> None:
    assert timestamp(0) == "1970-01-01T00:00:00Z"
    assert timestamp(253402300799) == "9999-12-31T23:59:59Z"
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1704067200")
    assert now_utc() == "2024-01-01T00:00:00Z"


def test_atomic_write_replaces_whole_with_mode_and_leaves_nothing_beside(tmp_path: Path) -> None:
    target = tmp_path / "index.json"
    target.write_bytes(b"old")
    atomic_write(target, b"new contents", mode=0o444)
    assert target.read_bytes() == b"new contents"
    assert stat.S_IMODE(target.stat().st_mode) == 0o444
    atomic_write(target, b"again")  # a read-only file is replaced (rename), not written into
    assert target.read_bytes() == b"again"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json"]


def test_atomic_write_failure_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "d"
    target.mkdir()
    (target / "x").write_text("in the way")
    with pytest.raises(OSError):
        atomic_write(target, b"data")  # rename over a non-empty directory fails
    assert (target / "x").read_text() == "in the way"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_atomic_write_relative_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    atomic_write(Path("plain"), b"x")
    assert (tmp_path / "plain").read_bytes() == b"x"
    assert os.listdir(tmp_path) == ["plain"]
