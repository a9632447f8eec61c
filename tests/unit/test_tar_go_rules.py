"""Where readers of tar disagree, layers are read as Go's archive/tar reads them (Docker and containerd parse layers
with it), and what Docker refuses is refused: the choices converter/oci/tarread.py makes where POSIX, GNU tar,
Python's tarfile and Go differ, each pinned here (the fuzz tests check the rest against a model).
"""

from __future__ import annotations

import io
import tarfile

import pytest

from converter.errors import LayerError
from converter.oci.flatten import SPARSE_SLACK
from converter.oci.tarread import TarReader, go_int, go_time, numeric
from tests.builders import flat
from tests.builders.flattening import flatten_bytes
from tests.builders.rawtar import (
    END,
    GNU_MAGIC,
    Encoding,
    Member,
    encode,
    header,
    octal,
    pad,
    pax_records,
    special,
)

MTIME = 1_600_000_000


def _file(name: bytes, data: bytes = b"xyz", **kw: object) -> bytes:
    return encode(Member(name, data=data, **kw), Encoding())  # type: ignore[arg-type]


def _refused(*layers: bytes) -> str:
    with pytest.raises(LayerError) as caught:
        flatten_bytes(*layers)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("layer "), message
    return message


# -- numbers, as strconv.ParseInt and parsePAXTime read them -------------------------------------------------------


@pytest.mark.parametrize(("text", "value"), [("7", 7), ("+7", 7), ("-7", -7), ("007", 7), (" 7", None),
                                             ("7 ", None), ("7_0", None), ("0x7", None), ("\u0667", None),
                                             ("", None), ("+", None), ("9223372036854775807", 2**63 - 1),
                                             ("9223372036854775808", None), ("-9223372036854775808", -(2**63))])
def test_pax_numbers_are_go_s_parseint(text: str, value: int | None) -> None:
    assert go_int(text.encode()) == value


@pytest.mark.parametrize(("text", "ok"), [("5", True), ("5.", True), ("-1.25", True), ("+5.5", True),
                                          (".5", False), ("1e9", False), ("inf", False), ("nan", False),
                                          ("5.x", False), ("5.-1", False), ("1_0", False)])
def test_pax_times_are_go_s_parsepaxtime(text: str, ok: bool) -> None:
    assert (go_time(text.encode()) is not None) == ok


@pytest.mark.parametrize(("raw", "value"), [(b"0000644\0", 0o644), (b"   644 \0", 0o644), (b"\0" * 8, 0),
                                            (b"644\0junk", 0o644), (b"64 4\0", None), (b"9\0", None),
                                            (b"\x80" + (5).to_bytes(7, "big"), 5), (b"\xff" * 8, -1),
                                            (b"\x80" + b"\xff" * 11, None)])
def test_header_numbers_are_go_s_parsenumeric(raw: bytes, value: int | None) -> None:
    assert numeric(raw) == value


# -- what Docker ignores, and which of two names counts -------------------------------------------------------------


@pytest.mark.parametrize("records", [[(b"uid", b"7")], [(b"path", b"g")], [(b"mtime", b"5")],
                                     [(b"SCHILY.xattr.user.g", b"v")]], ids=["uid", "path", "mtime", "xattr"])
def test_global_pax_headers_are_ignored(records: list[tuple[bytes, bytes]]) -> None:
    """POSIX applies them to every later entry, tarfile did; Go hands them over as entries of their own, which
    Docker's extraction skips ("PAX Global Extended Headers found and ignored")."""
    glob = special(tarfile.XGLTYPE, pax_records(records), b"pax_global_header")
    tree = flat(glob + _file(b"h") + END)
    assert sorted(tree) == ["h"]
    node = tree["h"]
    assert node.info is not None
    assert (node.uid, node.info.mtime, node.xattrs) == (0, MTIME, {})


def test_a_global_header_is_checked_though() -> None:
    glob = special(tarfile.XGLTYPE, b"99 path=x\n", b"pax_global_header")
    assert "invalid PAX header" in _refused(glob + _file(b"h") + END)


def test_of_two_gnu_long_names_the_last_counts() -> None:
    """tarfile used the first, Go uses the last."""
    first = special(tarfile.GNUTYPE_LONGNAME, b"g1\0", b"././@LongLink", magic=GNU_MAGIC)
    second = special(tarfile.GNUTYPE_LONGNAME, b"g2\0", b"././@LongLink", magic=GNU_MAGIC)
    assert sorted(flat(first + second + _file(b"h") + END)) == ["g2"]


def test_a_gnu_long_name_wins_over_a_pax_path_and_a_second_pax_header_replaces_the_first() -> None:
    long_name = special(tarfile.GNUTYPE_LONGNAME, b"g\0", b"././@LongLink", magic=GNU_MAGIC)
    pax = special(tarfile.XHDTYPE, pax_records([(b"path", b"p")]))
    assert sorted(flat(pax + long_name + _file(b"h") + END)) == ["g"]
    assert sorted(flat(long_name + pax + _file(b"h") + END)) == ["g"]
    first = special(tarfile.XHDTYPE, pax_records([(b"path", b"p1"), (b"uid", b"5")]))
    second = special(tarfile.XHDTYPE, pax_records([(b"path", b"p2")]))
    tree = flat(first + second + _file(b"h") + END)
    assert sorted(tree) == ["p2"] and tree["p2"].uid == 0


# -- types Docker does not extract ------------------------------------------------------------------------------------


@pytest.mark.parametrize("type_", [tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE, b"V", b"D"])
def test_types_docker_does_not_extract_are_refused(type_: bytes) -> None:
    """'7' (contiguous, a regular file to POSIX) and 'S' (old GNU sparse, which GNU tar writes) included: moby's
    createTarFile fails on them ("unhandled tar header type"), whichever layer holds them."""
    member = header({"name": b"h", "mode": octal(0o644, 8), "uid": octal(0, 8), "gid": octal(0, 8),
                     "size": octal(3, 12), "mtime": octal(MTIME, 12), "type": type_, "magic": GNU_MAGIC}) + pad(b"xyz")
    message = _refused(member + END)
    assert f"'h' has type {type_.decode()!r}" in message and "Docker" in message
    hidden = _refused(member + END, encode(Member(b".wh.h"), Encoding()) + END)  # hidden by a newer layer: still
    assert "has type" in hidden


# -- the end of a layer ----------------------------------------------------------------------------------------------


def test_a_layer_may_end_where_a_header_would_start() -> None:
    """Without the two zero blocks (Go: io.EOF at a header boundary), or after just one of them."""
    assert sorted(flat(_file(b"a"))) == ["a"]
    assert sorted(flat(_file(b"a") + bytes(512))) == ["a"]
    assert flat(b"") == {}


def test_a_zero_block_then_something_else_is_refused() -> None:
    assert "a zero block" in _refused(_file(b"a") + bytes(512) + _file(b"b") + END)


def test_a_layer_cut_in_the_padding_of_its_last_file_ends_there() -> None:
    """Go reads a short padding as the end of the archive (its tryReadFull); the file is whole."""
    data = _file(b"a", b"xyz")
    tree = flat(data[:-100])
    assert tree["a"].content == b"xyz"


# -- sparse files ------------------------------------------------------------------------------------------------------


def _sparse_1_0(name: bytes, realsize: int, runs: list[tuple[int, bytes]]) -> bytes:
    records = [(b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0"), (b"GNU.sparse.name", name),
               (b"GNU.sparse.realsize", str(realsize).encode())]
    sparse_map = f"{len(runs)}\n".encode() + b"".join(f"{o}\n{len(d)}\n".encode() for o, d in runs)
    return special(tarfile.XHDTYPE, pax_records(records)) + _file(b"GNUSparseFile.0/x",
                                                                  pad(sparse_map) + b"".join(d for _, d in runs))


def test_a_sparse_file_reads_with_its_holes_as_zeros() -> None:
    content = flat(_sparse_1_0(b"s", 100_000, [(10, b"ab"), (70_000, b"cd")]) + END)["s"].content
    assert content == bytes(10) + b"ab" + bytes(69_988) + b"cd" + bytes(29_998)


def test_sparse_holes_beyond_the_budget_are_refused_before_anything_is_written() -> None:
    """The disk is sized from the layers: holes may add a quarter of the layer bytes read so far, plus 1 MiB."""
    ok = SPARSE_SLACK - 4096
    assert len(flat(_sparse_1_0(b"s", ok, [(0, b"ab")]) + END)["s"].content) == ok
    message = _refused(_sparse_1_0(b"s", 1 << 34, [(0, b"ab")]) + END)
    assert "'s'" in message and "holes" in message
    two = _sparse_1_0(b"s", ok, [(0, b"ab")]) + _sparse_1_0(b"t", ok, [(0, b"ab")])
    assert "'t'" in _refused(two + END)  # the budget is for the image, not for each file


def test_a_sparse_map_whose_data_is_not_what_follows_is_refused() -> None:
    data = _sparse_1_0(b"s", 100, [(0, b"ab")])
    records = [(b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0"), (b"GNU.sparse.name", b"s"),
               (b"GNU.sparse.realsize", b"100")]
    data = special(tarfile.XHDTYPE, pax_records(records)) + _file(b"GNUSparseFile.0/x", pad(b"1\n0\n5\n") + b"ab")
    assert "sparse map stores 5 bytes" in _refused(data + END)


def test_a_reader_refuses_reading_a_member_it_has_moved_past() -> None:
    reader = TarReader(io.BytesIO(_file(b"a") + _file(b"b") + END))
    first = reader.next()
    assert first is not None and reader.next() is not None
    with pytest.raises(tarfile.TarError, match="behind the stream"):
        reader.extractfile(first)
