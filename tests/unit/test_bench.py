"""make bench's pure parts: the disk-size table and its goals, the lvm disk's sizing, and what --json keeps.

The measurements themselves run in `make bench` only (speed goals never live in timed tests)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from bench import run

MiB = 1 << 20


def _size(image: str, qcow2: int) -> run.DiskSize:
    return run.DiskSize(image, content=2 * MiB, kernel=13 * MiB, initramfs=1 * MiB, qcow2=qcow2)


def test_a_small_image_is_held_to_32_mib_and_every_image_to_1_1x() -> None:
    assert _size("busybox", 17 * MiB).goal() == "≤ 32 MiB: met; ≤ 1.10×: met"
    assert _size("busybox", 33 * MiB).goal() == "≤ 32 MiB: missed; ≤ 1.10×: missed"
    assert _size("debian", 18 * MiB).goal() == "≤ 1.10×: missed"  # 18 / 16 = 1.125


def test_the_disk_size_table_shows_each_part_and_the_ratio() -> None:
    table = run.size_table([_size("busybox", 17 * MiB)])
    assert table.splitlines()[0].startswith("| image | content | kernel + initramfs | qcow2 size |")
    assert table.splitlines()[2] == ("| busybox | 2.0 MiB | 14.0 MiB (13.0 + 1.0) | 17.0 MiB | 1.06× | "
                                     "≤ 32 MiB: met; ≤ 1.10×: met |")


def test_the_root_lv_holds_its_content_in_whole_extents() -> None:
    for tar_bytes in (0, 1, 160 * MiB, 900 * MiB + 123):
        mib = run.root_lv_mib(tar_bytes)
        assert mib % 4 == 0
        assert mib * MiB >= tar_bytes * 1.3 + 64 * MiB


def test_content_counts_regular_files_once_per_inode(tmp_path: Path) -> None:
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("a", b"x" * 1000), ("d/b", b"y" * 24)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("c")
        link.type, link.linkname = tarfile.LNKTYPE, "a"
        tar.addfile(link)
        folder = tarfile.TarInfo("d")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
    assert run.regular_bytes(path) == 1024


def _report(**extra: object) -> run.Report:
    return run.Report("2026-12-05 08:00 UTC", "a machine", 1, 0.0, 10.0, [], [], [], **extra)  # type: ignore[arg-type]


def test_json_keeps_disk_sizes_and_foreign_disks_and_reads_older_runs() -> None:
    lvm = run.ForeignImage("lvm", Path("/cache/lvm.qcow2"), 170 * MiB, 150 * MiB, 260 * MiB)
    report = _report(foreign=[lvm], sizes=[_size("busybox", 17 * MiB)])
    again = run.Report.from_json(json.loads(json.dumps(report.to_json())))
    assert again.sizes == report.sizes and again.foreign == report.foreign
    older = report.to_json()
    del older["sizes"], older["foreign"]
    assert run.Report.from_json(older).sizes == []


def test_the_readme_section_has_the_disk_sizes_and_describes_the_lvm_disk() -> None:
    lvm = run.ForeignImage("lvm", Path("/cache/lvm.qcow2"), 170 * MiB, 150 * MiB, 260 * MiB)
    section = _report(foreign=[lvm], sizes=[_size("busybox", 17 * MiB)]).readme_section()
    assert run.SIZE_INTRO in section and "| busybox | 2.0 MiB |" in section
    assert "lvm: a foreign disk built with libguestfs" in section and "170.0 MiB of tar" in section
    assert "Disk sizes" not in _report().readme_section()
