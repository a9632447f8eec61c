"""tests/treecmp.py: reading tars into trees and listing differences."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from collections.abc import Iterable
from pathlib import Path

import pytest

from fixtures.image import Entry as Member
from fixtures.image import char, d, f, fifo, hardlink, layer_tar, symlink
from tests.treecmp import Entry, diff_trees, docker_runtime_paths, hardlink_groups, normalize, tree_from_tar


def tar_of(members: Iterable[Member]) -> bytes:
    return layer_tar(members, keep_order=True)


SAMPLE = [
    d("."),
    d("etc"),
    f("etc/passwd", "root:x:0:0::/root:/bin/sh\n"),
    f("usr/bin/su", b"\x7fELF", 0o4755),
    d("tmp", 0o1777),
    symlink("etc/motd", "issue"),
    f("data/one", "same bytes\n", 0o640, 1000, 1000),
    hardlink("data/two", "data/one"),
    char("dev/null", 1, 3),
    fifo("run/fifo", 0o600),
    f("x/attr", "with xattr\n", xattrs={"user.k": "v é"}),
]


def test_normalize() -> None:
    assert normalize("./a//b/") == "a/b"
    assert normalize("/etc/passwd") == "etc/passwd"
    assert normalize("././usr/./bin") == "usr/bin"
    assert normalize("./") == ""
    assert normalize("/") == ""
    assert normalize(".") == ""


def test_entries_carry_every_field() -> None:
    tree = tree_from_tar(io.BytesIO(tar_of(SAMPLE)))
    assert "" not in tree and "." not in tree
    assert tree["etc"] == Entry("dir", 0o755, 0, 0)
    passwd = b"root:x:0:0::/root:/bin/sh\n"
    assert tree["etc/passwd"] == Entry("file", 0o644, 0, 0, len(passwd), hashlib.sha256(passwd).hexdigest())
    assert tree["usr/bin/su"].mode == 0o4755
    assert tree["tmp"].mode == 0o1777
    assert tree["etc/motd"].type == "symlink" and tree["etc/motd"].linkname == "issue"
    assert tree["data/one"].uid == 1000 and tree["data/one"].gid == 1000 and tree["data/one"].mode == 0o640
    assert (tree["dev/null"].type, tree["dev/null"].devmajor, tree["dev/null"].devminor) == ("char", 1, 3)
    assert tree["run/fifo"] == Entry("fifo", 0o600, 0, 0)
    assert tree["x/attr"].xattrs == (("user.k", "v é".encode()),)


def test_hardlink_reads_as_its_target_and_remembers_it() -> None:
    tree = tree_from_tar(io.BytesIO(tar_of(SAMPLE)))
    one, two = tree["data/one"], tree["data/two"]
    assert two.type == "file" and two.sha256 == one.sha256 and two.size == one.size
    assert two.hardlink == "data/one" and one.hardlink is None
    assert hardlink_groups(tree) == {"data/one": ("data/one", "data/two"), "data/two": ("data/one", "data/two")}


def test_root_is_kept_on_request() -> None:
    assert tree_from_tar(io.BytesIO(tar_of(SAMPLE)), keep_root=True)[""].type == "dir"


def test_reads_paths_gzip_and_unseekable_streams(tmp_path: Path) -> None:
    raw = tar_of(SAMPLE)
    expected = tree_from_tar(io.BytesIO(raw))
    path = tmp_path / "t.tar.gz"
    path.write_bytes(gzip.compress(raw))
    assert tree_from_tar(path) == expected
    assert tree_from_tar(str(path)) == expected

    class Unseekable(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self._data = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
            chunk = self._data.read(min(len(buffer), 777))
            buffer[: len(chunk)] = chunk
            return len(chunk)

    assert tree_from_tar(io.BufferedReader(Unseekable(raw))) == expected


def test_leading_slash_and_dot_slash_name_the_same_path() -> None:
    info = tarfile.TarInfo("/abs/file")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
        info2 = tarfile.TarInfo("./abs/dir/")
        info2.type = tarfile.DIRTYPE
        tar.addfile(info2)
    assert set(tree_from_tar(io.BytesIO(buf.getvalue()))) == {"abs/file", "abs/dir"}


def test_later_entry_replaces_earlier() -> None:
    tree = tree_from_tar(io.BytesIO(tar_of([f("a", "old"), symlink("a", "b")])))
    assert tree["a"].type == "symlink"


def test_hardlink_to_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match="hardlink"):
        tree_from_tar(io.BytesIO(tar_of([hardlink("b", "missing")])))


def test_identical_trees_have_no_difference() -> None:
    tree = tree_from_tar(io.BytesIO(tar_of(SAMPLE)))
    reordered = [*reversed([m for m in SAMPLE if m.type != "hardlink"]), hardlink("data/two", "data/one")]
    shuffled = tree_from_tar(io.BytesIO(tar_of(reordered)))
    assert diff_trees(tree, shuffled) == []


def test_each_field_difference_is_one_readable_line() -> None:
    a = tree_from_tar(io.BytesIO(tar_of(SAMPLE)))
    changed = [
        d("."), d("etc", 0o700),
        f("etc/passwd", "root:x:0:0::/root:/bin/bash\n"),
        f("usr/bin/su", b"\x7fELF", 0o755),
        d("tmp", 0o1777, uid=1),
        symlink("etc/motd", "issue.net"),
        f("data/one", "same bytes\n", 0o640, 1000, 1001),
        hardlink("data/two", "data/one"),
        char("dev/null", 1, 5),
        f("run/fifo", ""),
        f("x/attr", "with xattr\n"),
        f("new", ""),
    ]
    b = tree_from_tar(io.BytesIO(tar_of(changed)))
    lines = diff_trees(a, b)
    assert "etc: mode a=0755 b=0700" in lines
    assert any(line.startswith("etc/passwd: size a=26 b=28") for line in lines)
    assert any(line.startswith("etc/passwd: sha256 a=") for line in lines)
    assert "usr/bin/su: mode a=4755 b=0755" in lines
    assert "tmp: uid a=0 b=1" in lines
    assert "etc/motd: linkname a='issue' b='issue.net'" in lines
    assert "data/one: gid a=1000 b=1001" in lines
    assert "dev/null: devminor a=3 b=5" in lines
    assert "run/fifo: type a='fifo' b='file'" in lines
    assert any(line.startswith("x/attr: xattrs a=") for line in lines)
    assert "only in b: new" in lines
    assert lines.index("etc: mode a=0755 b=0700") < lines.index("tmp: uid a=0 b=1")  # sorted by path
    assert all("\n" not in line for line in lines)
    assert "only in a: new" in diff_trees(b, a)


def test_hardlinks_compare_by_content_unless_asked() -> None:
    linked = tree_from_tar(io.BytesIO(tar_of([f("a", "same"), hardlink("b", "a")])))
    copies = tree_from_tar(io.BytesIO(tar_of([f("a", "same"), f("b", "same")])))
    swapped = tree_from_tar(io.BytesIO(tar_of([f("b", "same"), hardlink("a", "b")])))
    assert diff_trees(linked, copies) == []
    assert diff_trees(linked, swapped, hardlinks=True) == []
    assert diff_trees(linked, copies, hardlinks=True) == [
        "a: hardlinked with a=('a', 'b') b=()",
        "b: hardlinked with a=('a', 'b') b=()",
    ]


def test_ignore_patterns_cover_subtrees_and_globs() -> None:
    a = tree_from_tar(io.BytesIO(tar_of([f("keep", "1")])))
    b = tree_from_tar(io.BytesIO(tar_of([f("keep", "1"), d("dev"), f("dev/console", ""), d("proc"),
                                         f(".dockerenv", ""), d("var"), d("var/log"),
                                         f("var/log/x.log", "")])))
    assert diff_trees(a, b, ignore=docker_runtime_paths | {"var/log/*.log"}) == ["only in b: var",
                                                                                 "only in b: var/log"]
    assert diff_trees(a, b, ignore=["/dev/", "./proc", ".dockerenv", "var"]) == []


def test_ignore_fields() -> None:
    a = tree_from_tar(io.BytesIO(tar_of([f("f", "x", uid=1, xattrs={"user.a": "1"})])))
    b = tree_from_tar(io.BytesIO(tar_of([f("f", "x", uid=2)])))
    assert diff_trees(a, b, ignore_fields=("uid", "xattrs")) == []
    with pytest.raises(ValueError, match="unknown fields"):
        diff_trees(a, b, ignore_fields=("mtime",))


def test_runtime_paths_are_normalized() -> None:
    assert all(normalize(path) == path for path in docker_runtime_paths)
