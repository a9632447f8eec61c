"""vm-to-oci --base, without an appliance: a disk's tar stream against a base image's signatures."""

from __future__ import annotations

import functools
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
from tests.builders import Spec, d, f, hl, sym
from tests.builders import layer as tar_layer

# Entries as a disk's tar-out has them: no owner names, one mtime.
_DISK = {"mtime": 1700000000, "uname": "", "gname": ""}
_file = functools.partial(f, **_DISK)
_link = functools.partial(hl, **_DISK)
_dir = functools.partial(d, **_DISK)
_symlink = functools.partial(sym, **_DISK)


def _sig(info: tarfile.TarInfo, data: bytes | None) -> Signature:
    assert data is not None
    return signature(info, hash_stream(io.BytesIO(data), len(data)))


def _layer(tmp_path: Path, entries: list[Spec], base: dict[str, Signature],
           disk: dict[str, bytes]) -> list[tarfile.TarInfo]:
    layout = LayoutWriter(tmp_path / "layout")
    diff = DiffState(base=base)

    @contextmanager
    def fetch(path: str, _sig: Signature) -> Iterator[IO[bytes]]:
        yield io.BytesIO(disk[path])

    with LayerWriter(layout, "gzip") as layer:
        write_layer(io.BytesIO(tar_layer(*entries)), layer, Filter(), diff, lambda _n: None)
        write_deferred_links(layer, diff, fetch)
    assert layer.result is not None
    blob = layout.store.blob_path(layer.result.descriptor.digest).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tar:
        members = tar.getmembers()
        for member in members:
            if member.isreg():
                extracted = tar.extractfile(member)
                assert extracted is not None and extracted.read() == disk[member.name], member.name
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


def test_no_whiteout_beneath_a_directory_the_layer_replaces(tmp_path: Path) -> None:
    """/lib became a symlink and /srv/d a file: their own entries replace the base's directories whole; a whiteout
    beneath them would be applied through the symlink (Docker) or refused. A plain deletion still gets one."""
    lib, lib_x, srv, srv_d, srv_d_c, gone = (_dir("lib"), _file("lib/x", b"x\n"), _dir("srv"), _dir("srv/d"),
                                             _file("srv/d/c", b"c\n"), _file("srv/gone", b"g\n"))
    base = {p: _sig(*e) if e[0].isreg() else signature(e[0])
            for p, e in (("lib", lib), ("lib/x", lib_x), ("srv", srv), ("srv/d", srv_d), ("srv/d/c", srv_d_c),
                         ("srv/gone", gone))}
    now_lib, now_d = _symlink("lib", "usr/lib"), _file("srv/d", b"now a file\n")
    members = _layer(tmp_path, [now_lib, srv, now_d], base, {"srv/d": now_d[1], "srv/.wh.gone": b""})
    assert sorted(m.name for m in members) == ["lib", "srv/.wh.gone", "srv/d"]


def test_disk_files_named_like_whiteouts_are_refused(tmp_path: Path) -> None:
    import pytest

    from converter.errors import DiskError

    for name in ("srv/.wh.secret", "srv/opaque/.wh..wh..opq"):
        with pytest.raises(DiskError, match="reserve for deletions"):
            _layer(tmp_path, [_file(name, b"x")], {}, {})


def test_gnu_tar_xattr_names_are_decoded() -> None:
    from converter.oci.tarutil import gnu_xattrs_decoded, gnu_xattrs_encoded

    names = ["user.plain", "user.per%cent", "user.literal%25", "user.%3D"]
    pax = {f"SCHILY.xattr.{n}": "v" for n in names} | {"path": "a%25b"}
    encoded = gnu_xattrs_encoded(pax)
    assert encoded["SCHILY.xattr.user.per%25cent"] == "v" and encoded["SCHILY.xattr.user.literal%2525"] == "v"
    assert encoded["path"] == "a%25b"  # only xattr names
    assert gnu_xattrs_decoded(encoded) == pax
    # a name GNU tar escaped "=" in cannot be a PAX keyword anywhere else: left out
    assert gnu_xattrs_decoded({"SCHILY.xattr.user.a%3Db": "v"}) == {}
