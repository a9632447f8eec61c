"""vm-to-oci --base, without an appliance: a disk's tar stream against a base image's signatures."""

from __future__ import annotations

import gzip
import io
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from converter.disk.export import DiffState, Filter, write_deferred_links, write_layer
from converter.oci.layout import LayoutWriter
from converter.oci.tree import Signature, hash_stream, signature
from converter.oci.writer import LayerWriter


def _file(name: str, data: bytes, mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, 1700000000
    return info, data


def _link(name: str, target: str) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.mtime = tarfile.LNKTYPE, target, 0o644, 1700000000
    return info, b""


def _stream(entries: list[tuple[tarfile.TarInfo, bytes]]) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    buf.seek(0)
    return buf


def _sig(info: tarfile.TarInfo, data: bytes) -> Signature:
    return signature(info, hash_stream(io.BytesIO(data), len(data)))


def _layer(tmp_path: Path, entries: list[tuple[tarfile.TarInfo, bytes]], base: dict[str, Signature],
           disk: dict[str, bytes]) -> list[tarfile.TarInfo]:
    layout = LayoutWriter(tmp_path / "layout")
    diff = DiffState(base=base)

    @contextmanager
    def fetch(path: str, _sig: Signature) -> Iterator[IO[bytes]]:
        yield io.BytesIO(disk[path])

    with LayerWriter(layout, "gzip") as layer:
        write_layer(_stream(entries), layer, Filter(), diff, lambda _n: None)
        write_deferred_links(layer, diff, fetch)
    assert layer.result is not None
    blob = layout.store.blob_path(layer.result.descriptor.digest).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tar:
        members = tar.getmembers()
        for member in members:
            if member.isreg():
                f = tar.extractfile(member)
                assert f is not None and f.read() == disk[member.name], member.name
    return members


def test_unchanged_disk_gives_an_empty_layer(tmp_path: Path) -> None:
    target = _file("etc/group", b"root:x:0:\n")
    base = {"etc/group": _sig(*target)}
    assert _layer(tmp_path, [target], base, {"etc/group": target[1]}) == []


def test_a_new_link_to_an_unchanged_file_brings_the_file_along(tmp_path: Path) -> None:
    """Docker's overlay2 applies a layer on its own: a link into a lower layer fails to load there."""
    target = _file("etc/group", b"root:x:0:\n")
    other = _file("etc/other", b"unchanged\n")
    base = {"etc/group": _sig(*target), "etc/other": _sig(*other)}
    entries = [target, other, _link("etc/group-link", "etc/group"), _link("etc/group-link2", "etc/group")]
    members = _layer(tmp_path, entries, base, {"etc/group": target[1]})
    assert [(m.name, m.type, m.linkname) for m in members] == [
        ("etc/group", tarfile.REGTYPE, ""),
        ("etc/group-link", tarfile.LNKTYPE, "etc/group"),
        ("etc/group-link2", tarfile.LNKTYPE, "etc/group"),
    ]


def test_a_link_to_a_changed_file_stays_a_link(tmp_path: Path) -> None:
    old = _file("etc/group", b"root:x:0:\n")
    new = _file("etc/group", b"root:x:0:\nstaff:x:50:\n")
    base = {"etc/group": _sig(*old)}
    members = _layer(tmp_path, [new, _link("etc/group-link", "etc/group")], base, {"etc/group": new[1]})
    assert [(m.name, m.type, m.linkname) for m in members] == [
        ("etc/group", tarfile.REGTYPE, ""), ("etc/group-link", tarfile.LNKTYPE, "etc/group")]


def test_unchanged_links_are_not_written(tmp_path: Path) -> None:
    target = _file("a", b"same\n")
    base = {"a": _sig(*target), "b": _sig(*target)}
    assert _layer(tmp_path, [target, _link("b", "a")], base, {}) == []
