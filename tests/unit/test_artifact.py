"""The artifact's temporary files: a run killed with SIGKILL leaves one behind, the next run to the same OUTPUT
removes it, and nothing that still belongs to a live process (or another host, or someone else) is touched."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
from pathlib import Path

from converter.artifact import publish, sweep_abandoned, temp_beside, temp_dir_beside


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _host() -> str:
    return socket.gethostname().replace("-", "_").replace("/", "_")


def test_abandoned_temporaries_are_swept_and_live_ones_kept(tmp_path: Path) -> None:
    output = tmp_path / "app.qcow2"
    dead = tmp_path / f".app.qcow2.imgconv-{_host()}-{_dead_pid()}-abc123.qcow2"
    live = tmp_path / f".app.qcow2.imgconv-{_host()}-{os.getpid()}-def456.qcow2"
    other_host = tmp_path / f".app.qcow2.imgconv-elsewhere-{_dead_pid()}-ghi789.qcow2"
    old_form = tmp_path / ".app.qcow2.imgconv-jkl012.qcow2"
    other_output = tmp_path / f".other.qcow2.imgconv-{_host()}-{_dead_pid()}-mno345.qcow2"
    for path in (dead, live, other_host, old_form, other_output):
        path.write_bytes(b"partial")
    assert sweep_abandoned(output) == [dead]
    assert not dead.exists()
    assert all(p.exists() for p in (live, other_host, old_form, other_output))


def test_a_new_run_sweeps_before_it_starts(tmp_path: Path) -> None:
    output = tmp_path / "app.qcow2"
    dead = tmp_path / f".app.qcow2.imgconv-{_host()}-{_dead_pid()}-abc123.qcow2"
    dead.write_bytes(b"partial")
    with temp_beside(output, ".qcow2") as work:
        assert work.exists() and work.name.startswith(f".app.qcow2.imgconv-{_host()}-{os.getpid()}-")
        assert not dead.exists()
        work.write_bytes(b"disk")
        record = publish(work, output, {"source": "oci:x"})
    assert output.read_bytes() == b"disk"
    assert stat.S_IMODE(output.stat().st_mode) == 0o444
    assert json.loads((tmp_path / "app.qcow2.json").read_text())["sha256"] == record["sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.qcow2", "app.qcow2.json"]


def test_a_failed_run_leaves_nothing(tmp_path: Path) -> None:
    output = tmp_path / "app.qcow2"
    try:
        with temp_beside(output, ".qcow2") as work:
            work.write_bytes(b"half a disk")
            raise RuntimeError("conversion failed")
    except RuntimeError:
        pass
    assert list(tmp_path.iterdir()) == []


def test_an_abandoned_spool_directory_is_swept_and_a_live_one_kept(tmp_path: Path) -> None:
    """oci-to-qcow2 spools file contents for debugfs in a directory beside the output (temp_dir_beside)."""
    output = tmp_path / "app.qcow2"
    dead = tmp_path / f".app.qcow2.imgconv-{_host()}-{_dead_pid()}-abc123.files"
    (dead / "image").mkdir(parents=True)
    (dead / "image" / "0").write_bytes(b"contents")
    with temp_dir_beside(output, ".files") as spool:
        assert spool.is_dir() and spool.name.startswith(f".app.qcow2.imgconv-{_host()}-{os.getpid()}-")
        assert stat.S_IMODE(spool.stat().st_mode) == 0o700
        assert not dead.exists()
        (spool / "0").write_bytes(b"contents")
    assert list(tmp_path.iterdir()) == []
