"""Flattening: the ordered layers of an image become the one tar of its final root filesystem.

Layers are built in memory, flattened, and the output is applied like `tar -x` would (tests/builders/
`extract`, which also refuses output an extractor would trip over); the tests assert the tree a user ends up
with. The second half compares flatten() with an independent reference model on random layer stacks.
"""

from __future__ import annotations

import io
import tarfile
import tracemalloc
from typing import Any

import pytest

from converter.errors import LayerError
from converter.oci.flatten import LayerInput, flatten
from tests.builders import (
    END,
    dev,
    extract,
    fifo,
    flat,
    flatten_bytes,
    hl,
    inputs,
    layer,
    link_groups,
    opq,
    pad,
    raw_header,
    summary,
    sym,
    wh,
)
from tests.builders import d as d_
from tests.builders import f as f_


def f(name: str, data: bytes | str = b"", mode: int = 0o644, **kw: Any) -> Any:
    return f_(name, data, mode, **kw)


def d(name: str, mode: int = 0o755, **kw: Any) -> Any:
    return d_(name, mode, **kw)


def refused(*layers: bytes) -> str:
    """flatten must refuse *layers* with a one-line LayerError; returns the message."""
    with pytest.raises(LayerError) as caught:
        flatten_bytes(*layers)
    message = str(caught.value)
    assert message and "\n" not in message
    return message


BASE = layer(d("etc"), f("etc/passwd", "root\n"), f("etc/group", "root\n"), d("usr"), d("usr/bin"),
             f("usr/bin/sh", "#!sh", 0o755), d("var"), d("var/cache"), f("var/cache/a", "a"),
             d("var/cache/sub"), f("var/cache/sub/b", "b"), f("top", "top"))


# -- whiteouts ---------------------------------------------------------------------------------------------------


def test_whiteout_removes_a_file() -> None:
    tree = flat(BASE, layer(wh("etc/group")))
    assert "etc/group" not in tree and tree["etc/passwd"].content == b"root\n"


def test_whiteout_removes_a_directory_and_everything_beneath() -> None:
    tree = flat(BASE, layer(wh("var/cache")))
    assert sorted(p for p in tree if p.startswith("var")) == ["var"]


def test_whiteout_then_recreate_in_a_newer_layer() -> None:
    tree = flat(BASE, layer(wh("var/cache")), layer(d("var/cache", 0o700), f("var/cache/new", "n")))
    assert sorted(p for p in tree if p.startswith("var/cache")) == ["var/cache", "var/cache/new"]
    assert tree["var/cache"].mode == 0o700


@pytest.mark.parametrize("whiteout_first", [True, False])
def test_whiteout_in_the_same_layer_as_the_recreated_path(whiteout_first: bool) -> None:
    # OCI image-spec: whiteouts apply only to lower layers, so the order inside the layer does not matter.
    # (Docker's UnpackLayer applies entries in tar order, so a whiteout *after* the new path deletes it there.)
    recreate = [d("var/cache", 0o750), f("var/cache/new", "n")]
    entries = [wh("var/cache"), *recreate] if whiteout_first else [*recreate, wh("var/cache")]
    tree = flat(BASE, layer(*entries))
    assert sorted(p for p in tree if p.startswith("var/cache")) == ["var/cache", "var/cache/new"]
    assert tree["var/cache"].mode == 0o750


def test_whiteout_of_something_absent_is_harmless() -> None:
    assert summary(flat(BASE, layer(wh("nothing"), wh("etc/nothing")))) == summary(flat(BASE))


def test_whiteout_of_a_path_beneath_a_file_is_harmless() -> None:
    assert summary(flat(BASE, layer(wh("top/x")))) == summary(flat(BASE))


# -- opaque directories --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("position", [0, 1, 2, 3])
def test_opaque_marker_anywhere_among_the_directory_entries(position: int) -> None:
    entries = [d("var/cache", 0o700), f("var/cache/new", "n"), d("var/cache/sub2"), f("var/cache/sub2/c", "c")]
    entries.insert(position, opq("var/cache"))
    tree = flat(BASE, layer(*entries))
    assert sorted(p for p in tree if p.startswith("var/cache/")) == [
        "var/cache/new", "var/cache/sub2", "var/cache/sub2/c"]
    assert tree["var/cache"].mode == 0o700 and "etc/passwd" in tree


def test_opaque_marker_without_a_directory_entry_keeps_the_lower_directory() -> None:
    tree = flat(BASE, layer(opq("var/cache"), f("var/cache/new", "n")))
    assert sorted(p for p in tree if p.startswith("var/cache")) == ["var/cache", "var/cache/new"]
    assert tree["var/cache"].mode == 0o755 and not tree["var/cache"].implicit


def test_nested_opaque_directories() -> None:
    lower = layer(d("a"), f("a/x"), d("a/b"), f("a/b/y"), d("a/c"), f("a/c/z"))
    middle = layer(d("a"), opq("a"), d("a/b"), f("a/b/n"))
    upper = layer(d("a/b"), opq("a/b"), f("a/b/k"))
    assert sorted(flat(lower, middle, upper)) == ["a", "a/b", "a/b/k"]
    both = layer(opq("a"), opq("a/b"), f("a/b/k"))
    assert sorted(flat(lower, both)) == ["a", "a/b", "a/b/k"]


def test_opaque_root_hides_every_lower_layer() -> None:
    tree = flat(BASE, layer(opq(""), f("only", "1")))
    assert sorted(tree) == ["only"]


def test_opaque_only_hides_lower_layers_not_newer_ones() -> None:
    tree = flat(BASE, layer(opq("var/cache")), layer(f("var/cache/later", "l")))
    assert sorted(p for p in tree if p.startswith("var/cache/")) == ["var/cache/later"]


# -- type changes --------------------------------------------------------------------------------------------------


def test_file_becomes_directory() -> None:
    tree = flat(BASE, layer(d("top", 0o711), f("top/inside", "i")))
    assert tree["top"].kind == "dir" and tree["top"].mode == 0o711 and tree["top/inside"].content == b"i"


def test_directory_becomes_file() -> None:
    tree = flat(BASE, layer(f("var/cache", "now a file")))
    assert tree["var/cache"].content == b"now a file"
    assert not [p for p in tree if p.startswith("var/cache/")]


def test_symlink_becomes_directory() -> None:
    tree = flat(layer(sym("lib", "usr/lib"), d("usr"), d("usr/lib"), f("usr/lib/x")), layer(d("lib"), f("lib/y")))
    assert tree["lib"].kind == "dir" and sorted(p for p in tree if p.startswith("lib/")) == ["lib/y"]
    assert "usr/lib/x" in tree and "usr/lib/y" not in tree


def test_directory_becomes_symlink() -> None:
    tree = flat(BASE, layer(sym("var/cache", "/tmp")))
    assert summary(tree)["var/cache"] == ("->", "/tmp")
    assert not [p for p in tree if p.startswith("var/cache/")]


@pytest.mark.parametrize("middle", [f("var/cache", "f"), sym("var/cache", "/x"), dev("var/cache"), fifo("var/cache")],
                         ids=["file", "symlink", "device", "fifo"])
def test_directory_replaced_then_recreated_loses_its_old_children(middle: Any) -> None:
    # The middle layer's non-directory removed var/cache and everything in it; the new directory starts empty.
    tree = flat(BASE, layer(middle), layer(d("var/cache", 0o700), f("var/cache/fresh")))
    assert sorted(p for p in tree if p.startswith("var/cache")) == ["var/cache", "var/cache/fresh"]


def test_writing_beneath_an_older_file_is_refused() -> None:
    # Docker fails such a pull (ENOTDIR): the newer layer assumes a directory that is not there.
    message = refused(BASE, layer(f("var/cache", "f")), layer(f("var/cache/fresh")))
    assert "layer 2" in message and "'var/cache'" in message and "layer 1" in message
    assert "'top'" in refused(BASE, layer(d("top/sub")))


# -- hard links ----------------------------------------------------------------------------------------------------


def test_hardlink_in_the_same_layer() -> None:
    tree = flat(layer(f("a", "A"), hl("b", "a"), hl("c", "b")))
    assert link_groups(tree) == {frozenset("abc")}
    assert tree["c"].content == b"A"


def test_hardlink_back_to_a_path_the_layer_replaced_shares_the_inode_of_its_link() -> None:
    """a file, b -> a, a replaced by a FIFO, a -> b: tar ends with a and b one inode, the file (found by the
    reference-model property test). `a` itself no longer holds the file, so the link goes through `b`."""
    tree = flat(layer(f("a", "A"), hl("b", "a"), fifo("a"), hl("a", "b")))
    assert (tree["a"].kind, tree["a"].content, tree["b"].content) == ("file", b"A", b"A")
    assert link_groups(tree) == {frozenset("ab")}


def test_a_repeated_hardlink_to_a_symlink_stays_a_symlink_in_the_summary() -> None:
    """The second `a -> b/a` changes nothing in the output; FlatTree must still know `a` is the symlink."""
    _, tree = flatten_bytes(layer(f("b/a", "")), layer(sym("b/a", "/etc"), hl("a", "b/a"), hl("a", "b/a")))
    assert tree.symlinks == {"b/a": "/etc", "a": "/etc"}


def test_hardlinks_through_replaced_links_stay_linear() -> None:
    """Looking for a path that still holds an inode skips links replaced since, once each: 20 000 dead links
    before the live one, then 20 000 links to it, is not 400 million checks."""
    import time

    n = 20_000
    specs = [f("x", "X"), *(hl(f"l{i}", "x") for i in range(n)), f("x", "new"),
             *(f(f"l{i}", "dead") for i in range(n - 1)), *(hl(f"m{i}", f"l{n - 1}") for i in range(n))]
    started = time.monotonic()
    tree = flat(layer(*specs))
    assert time.monotonic() - started < 30
    assert tree["m0"].content == b"X" and tree[f"m{n - 1}"].inode == tree[f"l{n - 1}"].inode


def test_hardlink_whose_target_a_newer_layer_shadowed_keeps_the_old_content() -> None:
    tree = flat(layer(f("a", "old"), hl("b", "a"), hl("c", "b")), layer(f("a", "new")))
    assert (tree["a"].content, tree["b"].content, tree["c"].content) == (b"new", b"old", b"old")
    assert link_groups(tree) == {frozenset("bc")}


def test_hardlink_whose_target_a_newer_layer_whited_out() -> None:
    tree = flat(layer(f("a", "old"), hl("b", "a")), layer(wh("a")))
    assert "a" not in tree and tree["b"].content == b"old"


def test_hardlink_to_a_file_of_an_older_layer() -> None:
    tree = flat(layer(d("bin"), f("bin/busybox", "BB", 0o755)), layer(hl("bin/sh", "bin/busybox")))
    assert tree["bin/sh"].content == b"BB" and link_groups(tree) == {frozenset({"bin/sh", "bin/busybox"})}


def test_hardlink_to_an_older_file_that_a_newer_layer_replaced() -> None:
    tree = flat(layer(f("a", "A")), layer(hl("b", "a")), layer(f("a", "C")))
    assert (tree["a"].content, tree["b"].content) == (b"C", b"A")
    assert not link_groups(tree)


def test_hardlink_to_an_older_file_that_a_newer_layer_made_a_directory() -> None:
    tree = flat(layer(f("a", "A")), layer(hl("b", "a")), layer(d("a"), f("a/x")))
    assert tree["b"].content == b"A" and tree["a"].kind == "dir"


def test_hardlink_to_a_link_of_an_older_layer() -> None:
    # perl and perl5.36 are one inode written as file + link; a newer layer links to the link's name.
    tree = flat(layer(f("perl", "P"), hl("perl5", "perl")), layer(hl("x", "perl5")))
    assert link_groups(tree) == {frozenset({"perl", "perl5", "x"})}


def test_hardlink_to_a_shadowed_link_of_an_older_layer() -> None:
    tree = flat(layer(f("perl", "P"), hl("perl5", "perl")), layer(hl("x", "perl5")), layer(f("perl5", "new")))
    assert (tree["x"].content, tree["perl"].content, tree["perl5"].content) == (b"P", b"P", b"new")
    assert link_groups(tree) == {frozenset({"perl", "x"})}


def test_hardlink_sees_the_last_duplicate_of_its_target() -> None:
    tree = flat(layer(f("a", "1"), f("a", "2")), layer(hl("b", "a")))
    assert (tree["a"].content, tree["b"].content) == (b"2", b"2")
    shadowed = flat(layer(f("a", "1"), f("a", "2")), layer(hl("b", "a")), layer(f("a", "3")))
    assert (shadowed["a"].content, shadowed["b"].content) == (b"3", b"2")


def test_hardlink_sees_its_target_as_it_was_at_the_link() -> None:
    # Like `tar -x`: the link shares the inode its target had when the link entry was met.
    tree = flat(layer(f("a", "1"), hl("b", "a"), f("a", "2")))
    assert (tree["a"].content, tree["b"].content) == (b"2", b"1")
    shadowed = flat(layer(f("a", "1"), hl("b", "a"), f("a", "2")), layer(f("a", "3")))
    assert (shadowed["a"].content, shadowed["b"].content) == (b"3", b"1")


def test_hardlink_before_its_target_in_the_same_layer_links_to_the_lower_file() -> None:
    # What Docker does: the link is made when met, to whatever the path then holds (the lower layer's file).
    tree = flat(layer(f("a", "lower")), layer(hl("b", "a"), f("a", "upper")))
    assert (tree["a"].content, tree["b"].content) == (b"upper", b"lower")


def test_hardlink_redefined_later_in_its_layer() -> None:
    tree = flat(layer(f("a", "A")), layer(hl("b", "a"), f("b", "own")), layer(f("a", "C")))
    assert (tree["a"].content, tree["b"].content) == (b"C", b"own")


def test_hardlink_with_absolute_target_names_a_member() -> None:
    tree = flat(layer(f("a", "A"), hl("b", "/a")))
    assert link_groups(tree) == {frozenset("ab")}


@pytest.mark.parametrize(("layers", "names"), [
    ([layer(hl("b", "missing"))], "'missing'"),
    ([layer(f("a")), layer(wh("a")), layer(hl("b", "a"))], "'a'"),
    ([layer(d("a"), f("a/x")), layer(opq("a")), layer(hl("b", "a/x"))], "'a/x'"),
    ([layer(d("dir"), hl("b", "dir"))], "'dir'"),
    ([layer(d("dir")), layer(hl("b", "dir"))], "'dir'"),
    ([layer(hl("b", "b"))], "'b'"),
    ([layer(f("a"), hl("b", "../a"))], "'../a'"),
    ([layer(f("a"), wh("c"), hl("b", ".wh.c"))], "'.wh.c'"),
], ids=["missing", "whited-out", "under-opaque", "dir-same-layer", "dir-older-layer", "itself", "dotdot", "whiteout"])
def test_hardlink_without_a_usable_target_is_refused(layers: list[bytes], names: str) -> None:
    assert names in refused(*layers)


# -- metadata ------------------------------------------------------------------------------------------------------


def test_devices_fifos_and_special_modes() -> None:
    tree = flat(layer(d("dev"), dev("dev/null", tarfile.CHRTYPE, 1, 3), dev("dev/sda", tarfile.BLKTYPE, 8, 0, 0o660),
                      fifo("run.fifo"), f("su", "x", 0o4755), f("wall", "x", 0o2755), d("tmp", 0o1777),
                      f("odd", "x", 0o7000)))
    assert (tree["dev/null"].kind, tree["dev/null"].device, tree["dev/null"].mode) == ("char", (1, 3), 0o666)
    assert (tree["dev/sda"].kind, tree["dev/sda"].device, tree["dev/sda"].mode) == ("block", (8, 0), 0o660)
    assert tree["run.fifo"].kind == "fifo"
    assert (tree["su"].mode, tree["wall"].mode, tree["tmp"].mode, tree["odd"].mode) == (0o4755, 0o2755, 0o1777, 0o7000)


def test_big_owner_ids() -> None:
    big = 2**21 + 5
    tree = flat(layer(f("a", uid=big, gid=2**31 - 1), d("b", uid=65534, gid=big)))
    assert (tree["a"].uid, tree["a"].gid, tree["b"].uid, tree["b"].gid) == (big, 2**31 - 1, 65534, big)


def test_owner_names_are_dropped_everywhere() -> None:
    out, _ = flatten_bytes(layer(f("a", uid=1000, uname="alice", gname="staff"), d("b", uname="bob"),
                                 sym("c", "a", uname="carol"), hl("e", "a", uname="eve")),
                           layer(f("f", uname="frank"), hl("g", "a", uname="gina")))
    _, headers = extract(out)
    assert headers and all(h.uname == "" and h.gname == "" for h in headers)


def test_xattrs_schily_and_libarchive_binary_values() -> None:
    capability = b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    import base64

    pax = {
        "SCHILY.xattr.security.capability": capability.decode("utf-8", "surrogateescape"),
        "SCHILY.xattr.user.text": "héllo",
        "LIBARCHIVE.xattr.user.from%20libarchive": base64.b64encode(b"\xff\x00\nbin").decode().rstrip("="),
        "SCHILY.fflags": "nodump",
        "comment": "dropped",
    }
    tree = flat(layer(f("ping", "x", 0o755, pax=pax)))
    xattrs = {k: v.encode("utf-8", "surrogateescape") for k, v in tree["ping"].xattrs.items()}
    assert xattrs == {
        "SCHILY.xattr.security.capability": capability,
        "SCHILY.xattr.user.text": "héllo".encode(),
        "SCHILY.xattr.user.from libarchive": b"\xff\x00\nbin",
    }
    header = tree["ping"].info
    assert header is not None and "SCHILY.fflags" not in header.pax_headers and "comment" not in header.pax_headers


def test_libarchive_xattr_names_a_pax_keyword_cannot_hold_are_dropped_not_mangled() -> None:
    import base64

    value = base64.b64encode(b"v").decode()
    tree = flat(layer(f("x", pax={"LIBARCHIVE.xattr.user.a%3Db": value, "LIBARCHIVE.xattr.user.ok": value})))
    assert tree["x"].xattrs == {"SCHILY.xattr.user.ok": "v"}


def test_negative_owners_are_refused() -> None:
    info, data = f("x", "1")
    info.uid = -5
    assert "'x'" in refused(layer((info, data), format=tarfile.GNU_FORMAT))


def test_progress_counts_each_layer_once_even_when_one_is_read_twice() -> None:
    layers = [layer(f("a", "old" * 1000), hl("b", "a")), layer(f("a", "new"))]  # b needs layer 0 read again
    seen: list[int] = []
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        flatten(inputs(layers), tar, seen.append)
    assert sum(seen) == sum(len(item) for item in layers)
    assert flat(*layers)["b"].content == b"old" * 1000


def test_long_names_and_link_targets() -> None:
    deep = "/".join(["d" * 60] * 6)
    target = "t" * 300
    tree = flat(layer(f(deep + "/file", "x"), sym("s", target), hl("h" * 200, deep + "/file")))
    assert tree[deep + "/file"].content == b"x"
    assert tree["s"].linkname == target
    assert link_groups(tree) == {frozenset({deep + "/file", "h" * 200})}


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_non_utf8_names_survive_byte_for_byte(fmt: int) -> None:
    name = b"caf\xe9-\xff".decode("utf-8", "surrogateescape")
    out, _ = flatten_bytes(layer(f(name, "x"), sym("link\udce9", name), format=fmt))
    tree, _ = extract(out)
    assert tree[name].content == b"x" and tree["link\udce9"].linkname == name
    assert b"caf\xe9-\xff" in out


def test_sub_second_mtimes_are_kept_exactly() -> None:
    tree = flat(layer(f("a", pax={"mtime": "1700000000.123456789"}), d("b", mtime=1_700_000_000.5),
                      f("c", mtime=1_600_000_000)))
    a, b, c = (tree[p].info for p in "abc")
    assert a is not None and b is not None and c is not None
    assert a.pax_headers.get("mtime") == "1700000000.123456789"
    assert b.mtime == 1_700_000_000.5 and c.mtime == 1_600_000_000


def test_duplicate_entries_in_one_layer_last_wins() -> None:
    tree = flat(layer(f("a", "1", 0o600), d("d", 0o700), f("a", "2", 0o640), d("d", 0o750), sym("s", "x"),
                      sym("s", "y")))
    assert (tree["a"].content, tree["a"].mode, tree["d"].mode, tree["s"].linkname) == (b"2", 0o640, 0o750, "y")


def test_duplicate_entries_with_different_types_in_one_layer_are_refused() -> None:
    # Docker replaces in tar order; a layer that says both is malformed, and imgconv says so.
    assert "'a'" in refused(layer(f("a"), d("a")))
    assert "'a'" in refused(layer(d("a"), sym("a", "x")))


def test_the_root_entry_and_name_spellings() -> None:
    tree = flat(layer(d("./", 0o700), d("."), f("./etc//passwd", "1"), d("./a/./b/"), f("a/b//c", "c")),
                layer(d("/"), f("etc/passwd", "2")))
    assert sorted(tree) == ["a", "a/b", "a/b/c", "etc", "etc/passwd"]
    assert tree["etc/passwd"].content == b"2" and tree["etc"].implicit


def test_output_never_holds_whiteouts_or_opaque_markers() -> None:
    out, _ = flatten_bytes(BASE, layer(wh("etc/group"), opq("var"), wh("nope"), f(".wh..wh.plnk/x"),
                                       f("etc/.wh..wh..opq")), layer(wh("top")))
    _, headers = extract(out)
    assert not [h.name for h in headers if ".wh." in h.name]


# -- refused layers ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", [
    f("/etc/passwd"),
    f("//etc/passwd"),
    f("../etc/passwd"),
    f("a/../../etc/passwd"),
    f("a/.."),
    d(".."),
    sym("../escape", "x"),
    hl("a/../../b", "x"),
    f(".wh...", "x"),
    f("a/.wh..", "x"),
    f("a/.wh.b/c", "x"),
    d("a/.wh..wh.plnk/c"),
], ids=lambda e: e[0].name)
def test_names_escaping_the_root_are_refused(entry: Any) -> None:
    message = refused(layer(f("x"), entry))
    assert "layer 0" in message
    assert "absolute" in message or "'..'" in message or "escape" in message or "beneath a whiteout" in message


def test_nul_in_a_name_is_refused() -> None:
    info, _ = f("a", "x")
    info.pax_headers = {"path": "etc/pass\x00wd"}
    assert "NUL" in refused(layer((info, b"x")))


def test_path_beneath_a_symlink_of_the_same_layer_is_refused() -> None:
    assert "'etc'" in refused(layer(sym("etc", "/host/etc"), f("etc/passwd")))
    assert "'etc'" in refused(layer(sym("etc", "/host/etc"), d("etc/ssh"), f("etc/ssh/key")))
    assert "'etc'" in refused(layer(sym("etc", "/host/etc"), wh("etc/passwd")))


def test_path_beneath_a_hidden_symlink_of_the_same_layer_is_refused() -> None:
    # Whether a newer layer hides the symlink does not change what the layer itself tried to do.
    assert "'x'" in refused(layer(sym("x", "/etc"), f("x/passwd")), layer(d("x")))


def test_path_beneath_a_file_of_the_same_layer_is_refused() -> None:
    assert "'a'" in refused(layer(f("a"), f("a/b")))
    assert "'a'" in refused(layer(f("a/b"), f("a")))


@pytest.mark.parametrize("upper", [
    layer(f("etc/passwd")),
    layer(d("etc/ssh"), f("etc/ssh/key")),
    layer(f("etc/ssh/key")),
    layer(hl("etc/passwd", "x")),
], ids=["file", "dir", "deep", "hardlink"])
def test_newer_layer_writing_through_an_older_symlink_is_refused(upper: bytes) -> None:
    message = refused(layer(f("x"), sym("etc", "/host/etc")), upper)
    assert "'etc'" in message and "symlink" in message


def test_whiteouts_beneath_an_older_symlink_delete_nothing() -> None:
    # Docker's RemoveAll would follow the symlink and delete its target's entry; imgconv never follows one.
    tree = flat(layer(d("host"), f("host/passwd"), sym("etc", "host")), layer(wh("etc/passwd"), opq("etc")))
    assert tree["etc"].linkname == "host" and "host/passwd" in tree


def test_writing_through_an_older_symlink_is_refused_even_if_an_even_newer_layer_replaces_it() -> None:
    assert "'x'" in refused(layer(sym("x", "/etc")), layer(f("x/passwd")), layer(d("x")))
    assert "'x'" in refused(layer(sym("x", "/etc")), layer(f("x/passwd")), layer(wh("x")))


def test_replacing_an_older_symlink_before_writing_beneath_it_is_fine() -> None:
    for upper in (layer(f("x/a"), d("x")), layer(wh("x"), f("x/a")), layer(d("x"), f("x/a"))):
        tree = flat(layer(sym("x", "/etc")), upper)
        assert tree["x"].kind == "dir" and tree["x/a"].kind == "file"
    tree = flat(layer(sym("x", "/etc")), layer(wh("x")), layer(f("x/a")))
    assert tree["x"].implicit and "x/a" in tree


@pytest.mark.parametrize("data", [
    b"this is not a tar archive" * 40,
    pad(raw_header(b"a", size=4096)) + b"short",
    raw_header(b"a")[:300],
], ids=["garbage", "truncated-data", "truncated-header"])
def test_malformed_tar_is_a_layer_error(data: bytes) -> None:
    assert "layer 0" in refused(data)


def test_zero_length_and_end_marker_only_layers_are_empty() -> None:
    assert summary(flat(b"", BASE, b"", END)) == summary(flat(BASE))


# Malformed PAX headers: tests/unit/test_pax_headers.py asserts each outcome.


def test_huge_device_numbers_are_a_layer_error() -> None:
    info, _ = dev("dev/x", tarfile.CHRTYPE, 8**8, 1)
    assert "dev/x" in refused(layer(d("dev"), (info, None), format=tarfile.GNU_FORMAT))


# -- streaming -----------------------------------------------------------------------------------------------------


class ZeroLayer(io.RawIOBase):
    """A tar of one *size*-byte file, produced on the fly (the test must not hold it in memory either)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        info = tarfile.TarInfo("big.bin")
        info.size = size
        self.parts = [info.tobuf(tarfile.PAX_FORMAT)]
        self.zeros = size + (-size % 512) + 1024
        self.head = b"".join(self.parts)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self.head:
            n = min(len(buffer), len(self.head))
            buffer[:n] = self.head[:n]
            self.head = self.head[n:]
            return n
        n = min(len(buffer), self.zeros)
        buffer[:n] = bytes(n)
        self.zeros -= n
        return n


class Sink(io.RawIOBase):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.count += len(data)
        return len(data)


def test_flattening_a_200mb_layer_keeps_memory_bounded() -> None:
    size = 200 << 20
    from contextlib import contextmanager

    @contextmanager
    def open_() -> Any:
        yield io.BufferedReader(ZeroLayer(size), 1 << 20)

    sink = Sink()
    tracemalloc.start()
    try:
        out = tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT)
        tree = flatten([LayerInput("layer 0", open_)], out)
        out.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert tree.content_bytes == size and sink.count > size
    assert peak < 16 << 20, f"peak traced memory {peak >> 20} MiB for a {size >> 20} MiB layer"


def test_layers_are_read_once_each_without_shadowed_hardlinks() -> None:
    opened: list[int] = []
    layers = [BASE, layer(f("etc/passwd", "new"), hl("etc/pw2", "etc/passwd")), layer(wh("top"))]
    originals = inputs(layers)

    def counting(i: int, item: LayerInput) -> LayerInput:
        def open_() -> Any:
            opened.append(i)
            return item.open()

        return LayerInput(item.what, open_)

    out = io.BytesIO()
    tar = tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT)
    flatten([counting(i, item) for i, item in enumerate(originals)], tar)
    assert sorted(opened) == [0, 1, 2]


# -- the reference model -------------------------------------------------------------------------------------------
#
# An independent statement of what the flattened tree must be: the layers applied oldest first onto a dict, the way
# Docker's UnpackLayer (moby pkg/archive/diff.go) applies them to a directory. Where imgconv deliberately differs,
# the model follows imgconv and says why:
#
# 1. Whiteouts and opaque markers apply to the lower layers only, wherever they sit in their layer (OCI image-spec,
#    layer.md). Docker applies entries in tar order, so there a `.wh.X` *after* X in the same layer deletes X.
# 2. Markers create nothing: Docker MkdirAll's the parent of every entry, markers included, so `d/.wh.x` over a
#    tree without d leaves an empty d behind there.
# 3. A layer that contradicts itself is refused: the same path as a directory and as a non-directory, or anything
#    beneath a non-directory (a symlink, a file) of the same layer. Docker replaces in tar order.
# 4. Writing beneath an older layer's symlink is refused (Docker and containerd follow it, within the root); a
#    whiteout or opaque marker beneath one deletes nothing (there is nothing beneath a symlink in the tree).
#    Writing beneath an older layer's file, device or fifo is refused too (Docker fails with ENOTDIR).
# 5. Within a layer, a directory entry replaces an older non-directory before the layer's other entries are applied
#    (a layer is a changeset: `x/a` then `x/` over an older symlink x is a directory x holding a).
# 6. A hard link to a path its layer has not written (yet) names the lower layers' file, as the lower layers left
#    it (the layer's own whiteouts do not apply to its own links).
# 7. The root entry's metadata is dropped (Docker applies it to the extraction directory).
#
# Only hard links need inodes: a hard link shares its target's node; replacing a path never changes the node other
# links hold.


class Refused(Exception):
    """The model's verdict that flatten must raise LayerError."""


class MNode:
    __slots__ = ("content", "kind", "mode", "target")

    def __init__(self, kind: str, mode: int | None = None, content: bytes = b"", target: str = "") -> None:
        self.kind, self.mode, self.content, self.target = kind, mode, content, target


Op = tuple[str, str, Any]  # (kind, path, detail): file/dir/symlink/fifo/link/whiteout/opaque


def _parents(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _remove(tree: dict[str, MNode], path: str, keep_self: bool = False) -> None:
    for p in [p for p in tree if (p == path and not keep_self) or p.startswith(path + "/") or path == ""]:
        del tree[p]


def _check_layer(ops: list[Op]) -> None:
    kinds: dict[str, str] = {}
    ancestors: set[str] = set()
    for kind, path, _ in ops:
        if kind == "opaque":
            name = f"{path}/.wh..wh..opq" if path else ".wh..wh..opq"
        elif kind == "whiteout":
            head, _, base = path.rpartition("/")
            name = f"{head}/.wh.{base}" if head else f".wh.{base}"
        else:
            name = path
        if any(kinds.get(p) == "nondir" for p in _parents(name)):
            raise Refused(f"{path} beneath a non-directory of its own layer")
        ancestors.update(_parents(name))
        if kind in ("whiteout", "opaque"):
            continue
        k = "dir" if kind == "dir" else "nondir"
        if kinds.get(path, k) != k or (k == "nondir" and path in ancestors):
            raise Refused(f"{path} is a directory and a non-directory in one layer")
        kinds[path] = k


def model(layers: list[list[Op]]) -> dict[str, MNode]:
    tree: dict[str, MNode] = {}
    for ops in layers:
        _check_layer(ops)
        lower = dict(tree)
        for kind, path, _ in ops:
            if kind == "whiteout":
                _remove(tree, path)
            elif kind == "opaque":
                _remove(tree, path, keep_self=True)
        for kind, path, _ in ops:
            if kind == "dir" and path in tree and tree[path].kind != "dir":
                _remove(tree, path)
        written: set[str] = set()
        for kind, path, detail in ops:
            if kind in ("whiteout", "opaque"):
                continue
            for parent in _parents(path):
                node = tree.get(parent)
                if node is None:
                    tree[parent] = MNode("dir")
                elif node.kind != "dir":
                    raise Refused(f"{path} is written beneath the older {node.kind} {parent}")
            if kind == "link":
                source = tree.get(detail) if detail in written else lower.get(detail)
                if source is None or source.kind == "dir" or detail == path:
                    raise Refused(f"hard link {path} to {detail}: no such file")
                _remove(tree, path)
                tree[path] = source
            elif kind == "dir":
                if path in tree:
                    tree[path].mode = detail
                else:
                    tree[path] = MNode("dir", detail)
            else:
                _remove(tree, path)
                tree[path] = MNode(kind, *detail)
            written.add(path)
    return tree


def to_layer(ops: list[Op]) -> bytes:
    specs = []
    for kind, path, detail in ops:
        if kind == "file":
            specs.append(f(path, detail[1], detail[0]))
        elif kind == "dir":
            specs.append(d(path, detail))
        elif kind == "symlink":
            specs.append(sym(path, detail[2]))
        elif kind == "fifo":
            specs.append(fifo(path, detail[0]))
        elif kind == "link":
            specs.append(hl(path, detail))
        elif kind == "whiteout":
            specs.append(wh(path))
        else:
            specs.append(opq(path))
    return layer(*specs)


def describe(tree: dict[str, MNode]) -> tuple[dict[str, tuple[Any, ...]], set[frozenset[str]]]:
    """Comparable form of a model tree: per path (kind, mode, content, target) and the hard link groups."""
    shape: dict[str, tuple[Any, ...]] = {}
    groups: dict[int, set[str]] = {}
    for path, node in tree.items():
        if node.kind == "dir":
            shape[path] = ("dir", 0o755 if node.mode is None else node.mode)  # created like `mkdir -p`
        else:
            shape[path] = (node.kind, node.mode if node.kind != "symlink" else None, node.content, node.target)
            groups.setdefault(id(node), set()).add(path)
    return shape, {frozenset(g) for g in groups.values() if len(g) > 1}


def describe_output(tree: dict[str, Any]) -> tuple[dict[str, tuple[Any, ...]], set[frozenset[str]]]:
    shape: dict[str, tuple[Any, ...]] = {}
    for path, node in tree.items():
        if node.kind == "dir":
            shape[path] = ("dir", 0o755 if node.mode is None else node.mode)  # what `tar -x` creates
        else:
            shape[path] = (node.kind, node.mode if node.kind != "symlink" else None, node.content or b"",
                           node.linkname)
    return shape, link_groups(tree)


def test_the_model_agrees_with_the_examples_above() -> None:
    # The model is only worth something if it is right: a few hand-checked stacks.
    ops_a: list[Op] = [("file", "a", (0o644, b"old", "")), ("link", "b", "a")]
    tree = model([ops_a, [("file", "a", (0o644, b"new", ""))]])
    assert tree["b"].content == b"old" and tree["a"].content == b"new"
    with pytest.raises(Refused):
        model([[("symlink", "x", (0o777, b"", "/etc"))], [("file", "x/a", (0o644, b"", ""))]])
    tree = model([[("dir", "x", 0o755), ("file", "x/y", (0o644, b"", ""))], [("file", "x", (0o600, b"f", ""))],
                  [("dir", "x", 0o700)]])
    assert sorted(tree) == ["x"]
    tree = model([[("file", "p", (0o644, b"P", "")), ("link", "q", "p")], [("opaque", "", None)]])
    assert tree == {}


# -- the property --------------------------------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_PATHS = ["a", "b", "a/a", "a/b", "b/a", "a/a/a", "a/a/b", "a/b/a"]


@st.composite
def _op(draw: st.DrawFn, files: list[str]) -> Op:
    path = draw(st.sampled_from(_PATHS))
    kind = draw(st.sampled_from(["file", "file", "dir", "dir", "symlink", "fifo", "link", "link", "whiteout",
                                 "opaque"]))
    if kind == "file":
        files.append(path)
        return ("file", path, (draw(st.sampled_from([0o644, 0o4755])), draw(st.binary(max_size=3)), ""))
    if kind == "dir":
        return ("dir", path, draw(st.sampled_from([0o755, 0o700])))
    if kind == "symlink":
        return ("symlink", path, (0o777, b"", draw(st.sampled_from(["/etc", "a", "../b"]))))
    if kind == "fifo":
        return ("fifo", path, (0o600, b"", ""))
    if kind == "link":
        others = [p for p in files if p != path]
        pool = others if others and draw(st.integers(0, 9)) > 0 else _PATHS
        return ("link", path, draw(st.sampled_from(pool)))
    if kind == "whiteout":
        return ("whiteout", path, None)
    return ("opaque", draw(st.sampled_from(["", *_PATHS])), None)


@st.composite
def layer_stacks(draw: st.DrawFn) -> list[list[Op]]:
    """1-4 layers of 0-6 entries over a few paths. Layers that contradict themselves are kept rare (they are
    refused whole, which says little about the rest), not excluded."""
    files: list[str] = []
    layers: list[list[Op]] = []
    for _ in range(draw(st.integers(1, 4))):
        ops: list[Op] = []
        for _ in range(draw(st.integers(0, 6))):
            op = draw(_op(files))
            try:
                _check_layer([*ops, op])
            except Refused:
                if draw(st.integers(0, 19)) > 0:
                    continue
            ops.append(op)
        layers.append(ops)
    return layers


def assert_extractable(out: bytes) -> None:
    """What `tar -x` needs: every hard link names an earlier, different, non-directory entry."""
    written: dict[str, bool] = {}
    with tarfile.open(fileobj=io.BytesIO(out)) as tar:
        for member in tar:
            name = member.name.rstrip("/")
            if member.islnk():
                assert member.linkname != name, f"{name} is a hard link to itself"
                assert written.get(member.linkname) is False, f"{name} links to {member.linkname}, not written before"
            written[name] = member.isdir()


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layer_stacks())
def test_flatten_agrees_with_the_reference_model(stack: list[list[Op]]) -> None:
    try:
        expected = model(stack)
    except Refused as why:
        with pytest.raises(LayerError):
            flatten_bytes(*(to_layer(ops) for ops in stack))
        assert why
        return
    out, summary_ = flatten_bytes(*(to_layer(ops) for ops in stack))
    assert_extractable(out)
    tree, _ = extract(out)
    assert describe_output(tree) == describe(expected)
    # flatten's own account of the tree (what later steps place files by) matches what it wrote.
    assert summary_.kinds == {p: "dir" if n.kind == "dir" else "nondir" for p, n in tree.items()}
    assert summary_.symlinks == {p: n.linkname for p, n in tree.items() if n.kind == "symlink"}
    assert set(summary_.dirs) == {p for p, n in tree.items() if n.kind == "dir" and not n.implicit}


_FUZZ_BASES = [
    layer(d("etc"), f("etc/a", "x" * 700, pax={"SCHILY.xattr.user.x": "v", "mtime": "1.5"}), sym("l", "etc"),
          hl("h", "etc/a"), dev("null"), fifo("p"), wh("gone"), opq("etc"), f("long/" + "n" * 150, "y")),
    layer(f("g" * 120, "z"), hl("x" * 110, "g" * 120), format=tarfile.GNU_FORMAT),
]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(_FUZZ_BASES), st.lists(st.tuples(st.integers(0, 6000), st.integers(0, 255)), max_size=6),
       st.integers(0, 7000))
def test_a_corrupted_layer_is_refused_or_flattens_to_an_extractable_tree(base: bytes, flips: list[tuple[int, int]],
                                                                         cut: int) -> None:
    data = bytearray(base)
    for position, value in flips:
        if position < len(data):
            data[position] = value
    try:
        out, _ = flatten_bytes(BASE, bytes(data[:cut]))
    except LayerError as exc:
        assert "\n" not in str(exc)
        return
    extract(out)
