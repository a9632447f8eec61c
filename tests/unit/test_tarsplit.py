"""tar-split records (converter/oci/tarsplit.py): crafted layers are recorded while flattened, then reassembled
from the flattened files byte for byte, and a changed file is noticed."""

from __future__ import annotations

import contextlib
import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from converter.oci.flatten import flatten
from converter.oci.image import LayerInput
from converter.oci.tarsplit import DiskFiles, Recorder, TarSplitError, record_lines, restore, wanted_hashes


class _Discard:
    def add(self, info: tarfile.TarInfo, data: object = None) -> None:
        pass


def _tar(entries: list[tuple[tarfile.TarInfo, bytes | None]], fmt: int = tarfile.PAX_FORMAT,
         trailing: int = 0) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for info, data in entries:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue() + bytes(512 * trailing)


def _file(name: str, data: bytes, **attrs: object) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.mode, info.mtime = 0o644, 1700000000
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, data


def _entry(name: str, kind: bytes, **attrs: object) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.mode = kind, 0o755
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, None


def _convert(layers: list[bytes], tmp_path: Path, change: dict[str, bytes] | None = None) -> list[Path] | str:
    """Flatten with a recorder (as oci-to-qcow2), then read the flattened files back (as vm-to-oci, with
    *change* applied to them) and restore the layers."""
    recorder = Recorder(tmp_path / "rec")
    flat = io.BytesIO()
    inputs = [LayerInput(f"layer {i}", lambda b=b: contextlib.nullcontext(io.BytesIO(b)))  # type: ignore[misc]
              for i, b in enumerate(layers)]
    with tarfile.open(fileobj=flat, mode="w", format=tarfile.PAX_FORMAT) as out:
        flatten(inputs, out, tap=recorder)
    diff_ids = ["sha256:" + hashlib.sha256(b).hexdigest() for b in layers]
    records = [path for _, path in recorder.write_records(diff_ids)]
    files = DiskFiles(_Discard(), tmp_path / "spool", wanted_hashes(records, 1 << 30))
    flat.seek(0)
    with tarfile.open(fileobj=flat, mode="r") as tar:
        for member in tar:
            data = tar.extractfile(member) if member.isreg() else None
            if change and member.name in change:
                member.size = len(change[member.name])
                data = io.BytesIO(change[member.name])  # type: ignore[assignment]
            files.add(member, data)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    return restore(records, diff_ids, files, out_dir, 1 << 30)


def _same(layers: list[bytes], tmp_path: Path) -> None:
    restored = _convert(layers, tmp_path)
    assert isinstance(restored, list), restored
    assert [p.read_bytes() for p in restored] == layers


def test_pax_gnu_links_and_trailing_zeros(tmp_path: Path) -> None:
    long = "usr/" + "d" * 150 + "/" + "f" * 120
    lower = _tar([_entry("usr", tarfile.DIRTYPE), _entry("usr/" + "d" * 150, tarfile.DIRTYPE),
                  _file(long, b"long name\n"), _file("usr/x", b"x" * 1000, pax_headers={"SCHILY.xattr.user.a": "1"}),
                  _entry("usr/link", tarfile.LNKTYPE, linkname="usr/x"),
                  _entry("usr/sym", tarfile.SYMTYPE, linkname="x"), _file("usr/empty", b"")], trailing=7)
    gnu = _tar([_entry("etc", tarfile.DIRTYPE), _file("etc/" + "g" * 200, b"gnu long name" * 100),
                _file("etc/padded", b"y" * 511)], fmt=tarfile.GNU_FORMAT, trailing=1)
    _same([lower, gnu], tmp_path)


def test_whiteouts_and_overwrites_keep_shadowed_contents(tmp_path: Path) -> None:
    lower = _tar([_entry("a", tarfile.DIRTYPE), _file("a/gone", b"deleted later" * 50),
                  _file("a/over", b"old" * 300), _file("a/keep", b"kept")])
    upper = _tar([_entry("a", tarfile.DIRTYPE), _file("a/.wh.gone", b""), _file("a/over", b"new")])
    _same([lower, upper], tmp_path)
    records = sorted((tmp_path / "rec").glob("*.tar-split.gz"))
    text = b"".join(str(doc).encode() for r in records for doc in record_lines(r, 1 << 30))
    assert b"'f': 'a/keep'" in text and b"'f': 'a/gone'" not in text and b"'f': 'a/over'" in text


def test_ustar_and_v7_like_layers(tmp_path: Path) -> None:
    _same([_tar([_file("bin", b"\0" * 4096, mode=0o4755, uid=7, gid=8)], fmt=tarfile.USTAR_FORMAT, trailing=30)],
          tmp_path)


def test_a_changed_file_is_noticed(tmp_path: Path) -> None:
    layer = _tar([_file("etc", b"one\n"), _file("data", b"two\n")])
    why = _convert([layer], tmp_path, change={"data": b"TWO\n"})
    assert why == "/data changed"


def test_a_tampered_record_is_refused_or_not_trusted(tmp_path: Path) -> None:
    import gzip
    layer = _tar([_file("data", b"two\n")])
    recorder = Recorder(tmp_path / "rec")
    inputs = [LayerInput("layer 0", lambda: contextlib.nullcontext(io.BytesIO(layer)))]
    with tarfile.open(fileobj=io.BytesIO(), mode="w") as out:
        flatten(inputs, out, tap=recorder)
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    record = recorder.write_records([diff_id])[0][1]
    record.write_bytes(gzip.compress(b'{"diff_id": "%s", "size": 1}\n' % diff_id.encode() + b"x" * (2 << 20)))
    files = DiskFiles(_Discard(), tmp_path / "spool", {})
    with pytest.raises(TarSplitError):
        restore([record], [diff_id], files, tmp_path, 1 << 30)


def test_large_files_across_reads(tmp_path: Path) -> None:
    """Files larger than the reader's buffers, a shadowed one among them (kept raw), and an empty one."""
    import random
    rng = random.Random(5)
    big = bytes(rng.getrandbits(8) for _ in range(3 << 20))
    lower = _tar([_file("old", big[:1500000]), _file("big", big), _file("empty", b""), _file("after", b"a" * 700)])
    upper = _tar([_file("old", b"replaced")])
    _same([lower, upper], tmp_path)


def test_a_path_twice_in_one_layer_gives_up_identity_for_that_layer(tmp_path: Path) -> None:
    """The first entry's content is not on the disk and was not kept: the layer is said not to be recorded."""
    layer = _tar([_file("twice", b"first"), _file("twice", b"second")])
    why = _convert([layer], tmp_path)
    assert isinstance(why, str) and "was not recorded" in why and "'twice' twice" in why


def test_hard_links_to_a_shadowed_file_and_an_opaque_directory(tmp_path: Path) -> None:
    lower = _tar([_entry("d", tarfile.DIRTYPE), _file("d/a", b"a" * 5000), _file("d/b", b"b"),
                  _entry("d/a-link", tarfile.LNKTYPE, linkname="d/a"), _file("top", b"t" * 700),
                  _entry("top-link", tarfile.LNKTYPE, linkname="top")])
    upper = _tar([_entry("d", tarfile.DIRTYPE), _file("d/.wh..wh..opq", b""), _file("d/c", b"c"),
                  _file("top", b"replaced")])
    _same([lower, upper], tmp_path)


def test_record_raw_bytes_are_bounded(tmp_path: Path) -> None:
    layer = _tar([_file("data", b"x")], trailing=100)
    recorder = Recorder(tmp_path / "rec")
    inputs = [LayerInput("layer 0", lambda: contextlib.nullcontext(io.BytesIO(layer)))]
    with tarfile.open(fileobj=io.BytesIO(), mode="w") as out:
        flatten(inputs, out, tap=recorder)
    record = recorder.write_records(["sha256:" + hashlib.sha256(layer).hexdigest()])[0][1]
    with pytest.raises(TarSplitError, match="raw bytes"):
        list(record_lines(record, 4096))


def test_a_pax_sparse_file_is_kept_raw(tmp_path: Path) -> None:
    """A PAX 1.0 sparse file's stored form (its map, then its data runs) is not the file the disk holds: it is kept
    in the record as it is, and the layer still comes back byte for byte."""
    stored = b"1\n0\n5\n".ljust(512, b"\0") + b"hello"
    info = tarfile.TarInfo("GNUSparseFile.0/sparse")
    info.mode, info.mtime = 0o644, 1700000000
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "sparse",
                        "GNU.sparse.realsize": "10000"}
    layer = _tar([(info, stored), _file("plain", b"p" * 600)])
    _same([layer], tmp_path)
    lines = [doc for record in (tmp_path / "rec").glob("*.tar-split.gz") for doc in record_lines(record, 1 << 30)]
    assert [doc["f"] for doc in lines if "f" in doc] == ["plain"]


def test_the_raw_budget_is_shared_by_all_layers(tmp_path: Path) -> None:
    """Each record alone fits the budget, together they do not: the second is refused."""
    layers = [_tar([_file(f"f{i}", b"x")], trailing=6) for i in range(2)]
    recorder = Recorder(tmp_path / "rec")
    inputs = [LayerInput(f"layer {i}", lambda b=b: contextlib.nullcontext(io.BytesIO(b)))  # type: ignore[misc]
              for i, b in enumerate(layers)]
    with tarfile.open(fileobj=io.BytesIO(), mode="w") as out:
        flatten(inputs, out, tap=recorder)
    diff_ids = ["sha256:" + hashlib.sha256(b).hexdigest() for b in layers]
    records = [path for _, path in recorder.write_records(diff_ids)]
    one = sum(len(str(doc.get("r", ""))) * 3 // 4 for doc in record_lines(records[0], 1 << 30))
    files = DiskFiles(_Discard(), tmp_path / "spool", wanted_hashes(records, 1 << 30))
    for name in ("f0", "f1"):
        info = tarfile.TarInfo(name)
        info.size = 1
        files.add(info, io.BytesIO(b"x"))
    with pytest.raises(TarSplitError, match="raw bytes"):
        restore(records, diff_ids, files, tmp_path, one + 100)
    assert isinstance(restore(records, diff_ids, files, tmp_path, 2 * one), list)
