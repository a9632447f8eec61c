"""Property-based fuzz of the flattener (issue 9): whatever the member headers of a layer say, flattening ends in
exactly one of two ways, in bounded memory and time: a tree that is extractable and means what the layers mean, or
a one-line ImgconvError.

Three properties, from strict to loose:

1. Every spelling of a layer means what its entries say. Random stacks of entries over a few colliding paths
   (files, sparse files, directories, symlinks, hard links, devices, fifos, whiteouts, opaque markers), each
   entry spelled one of the ways tar writers do (ustar/GNU/V7 magic, names in the ustar field, over the prefix,
   in a GNU long name or a PAX path, numbers in octal, base-256 or PAX records, harmless extra PAX records, global
   headers, sparse files in PAX 0.0/0.1/1.0). The result must be exactly the reference model's tree
   (tests/builders/tarmodel.py), or refused exactly where the model refuses.
2. Hostile headers are refused, or mean what Docker (Go's archive/tar) takes them to mean. One hostile member
   (names that escape, NUL bytes, over-long names and components, negative/huge/non-numeric sizes, owners and
   mtimes, unknown types, sizes on header-only types, invalid or truncated headers in the middle of a layer,
   malformed PAX records, lying sparse maps, GNU sparse records on plain files...) is put into a valid stack; each
   comes with what is correct, and, where the fuzz found today's flattener does something else, with the known
   wrong outcome and the strict-xfail regression test at the end of this module that pins it. Only that exact
   wrong outcome is tolerated (and counted as a hypothesis event), never another.
3. Corrupted bytes: flips and cuts anywhere in encoded layers end in a one-line error or an extractable tree.

Memory is traced (tracemalloc) against a bound proportional to the input, the clock is watched, and the output is
capped: see tests/builders/fuzzing.py. HYPOTHESIS_PROFILE=fuzz (`make fuzz`) runs thousands of examples.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from converter.errors import LayerError
from converter.oci.flatten import FlatTree, flatten
from converter.oci.tarutil import PATH_MAX, abandon_output, open_output
from tests.builders.flattening import Node, NotExtractable, extract, inputs
from tests.builders.fuzzing import (
    CappedSink,
    Outcome,
    Unbounded,
    bounded,
    examples,
    one_line_error,
    watchdog,
)
from tests.builders.rawtar import (
    BLOCK,
    END,
    GNU_MAGIC,
    Encoding,
    Member,
    Stream,
    base256,
    encode,
    header,
    octal,
    pad,
    pax_records,
    special,
)
from tests.builders.tarmodel import MTIME, MNode, Op, Refused, compare, model

# -- flattening under bounds -------------------------------------------------------------------------------------------


def flatten_capped(layers: Sequence[bytes]) -> tuple[bytes, FlatTree]:
    """flatten_bytes with an output that may not outgrow the input (a few times it, plus headers)."""
    size = sum(len(data) for data in layers)
    sink = CappedSink(4 * size + (2 << 20))
    tar = open_output(sink)
    try:
        tree = flatten(inputs(layers), tar)
    except BaseException:
        abandon_output(tar)  # as the converter does: nothing more is written after a failure
        raise
    tar.close()
    return sink.getvalue(), tree


def run(layers: Sequence[bytes]) -> Outcome:
    return bounded(lambda: flatten_capped(layers), sum(len(data) for data in layers))


def check_summary(flat: FlatTree, tree: dict[str, Node]) -> None:
    """flatten's own account of the tree (what later steps place files by) matches what it wrote."""
    assert flat.kinds == {p: "dir" if n.kind == "dir" else "nondir" for p, n in tree.items()}
    assert flat.symlinks == {p: n.linkname for p, n in tree.items() if n.kind == "symlink"}
    assert set(flat.dirs) == {p for p, n in tree.items() if n.kind == "dir" and not n.implicit}


def assert_means(outcome: Outcome, expected: dict[str, MNode]) -> None:
    assert outcome.error is None, f"refused a stack the model accepts: {outcome.error!r}"
    out, flat = outcome.value
    tree, _ = extract(out)
    differences = compare(expected, tree)
    assert not differences, "\n".join(differences)
    check_summary(flat, tree)


# -- entries and their spellings -------------------------------------------------------------------------------------

_SHORT = ["a", "b", "a/a", "a/b", "b/a", "a/a/a"]
_ODD = ["é", "\udcff", "a/" + "n" * 120, "p" * 60 + "/" + "q" * 90, "sp ace", "a/\udcfe\udcfd"]
PATHS = st.sampled_from(_SHORT) | st.sampled_from(_ODD)
MODES = st.sampled_from([0o644, 0o755, 0o600, 0o4755, 0o2755, 0o1777, 0o100644, 0o40755, 0])
IDS = st.sampled_from([0, 0, 1000, 65534, 8**7 - 1, 8**7, 2**31, 2**32 - 2])
MTIMES = st.sampled_from([MTIME, MTIME, 0, -1, 8**11, "1600000000.5", "1600000000.123456789", "-1.25", "5."])
XATTRS = st.sampled_from([(), (), (("user.a", "v"),), (("security.capability", "\x01\x00\x00\x02"),),
                          (("user.é", "\udcff"),), (("user.a", "1"), ("user.b", "2"))])
TARGETS = st.sampled_from(["/etc", "a", "../b", "t" * 150, "\udcfe", "a b", ".", "a/a"])
DEVICES = st.sampled_from([(1, 3), (8**7 - 1, 8**7 - 1), (0, 0), (259, 7)])


@st.composite
def sparse_content(draw: st.DrawFn) -> tuple[bytes, tuple[tuple[int, int], ...]]:
    """A file's content with holes, and the data runs a sparse encoding stores (sorted, disjoint, in the file)."""
    runs: list[tuple[int, int]] = []
    content = bytearray()
    for _ in range(draw(st.integers(0, 5))):
        content += bytes(draw(st.integers(0, 2000)))
        data = draw(st.binary(min_size=1, max_size=300))
        runs.append((len(content), len(data)))
        content += data
    content += bytes(draw(st.integers(0, 3000)))
    if not runs or draw(st.booleans()):
        runs.append((len(content), 0))  # GNU tar ends a map with an empty run at the end of the file (never empty)
    return bytes(content), tuple(runs)


@st.composite
def ops(draw: st.DrawFn, files: list[str]) -> Op:
    path = draw(PATHS)
    kind = draw(st.sampled_from(["file", "file", "file", "dir", "dir", "symlink", "link", "link", "char", "block",
                                 "fifo", "whiteout", "whiteout", "opaque", "root"]))
    meta = {"mode": draw(MODES), "uid": draw(IDS), "gid": draw(IDS), "mtime": draw(MTIMES), "xattrs": draw(XATTRS)}
    if kind == "file":
        files.append(path)
        if draw(st.integers(0, 4)) == 0:
            content, runs = draw(sparse_content())
            return Op("file", path, content, runs=runs, **meta)
        return Op("file", path, draw(st.binary(max_size=700)), **meta)
    if kind == "symlink":
        return Op("symlink", path, target=draw(TARGETS), **meta)
    if kind == "link":
        others = [p for p in files if p != path]
        pool = others if others and draw(st.integers(0, 9)) > 0 else _SHORT
        return Op("link", path, target=draw(st.sampled_from(pool)), **meta)
    if kind in ("char", "block"):
        return Op(kind, path, device=draw(DEVICES), **meta)
    if kind == "opaque":
        return Op("opaque", draw(st.sampled_from(["", *_SHORT])))
    if kind in ("whiteout", "root"):
        return Op(kind, path if kind == "whiteout" else "")
    return Op(kind, path, **meta)


HARMLESS_PAX = [(b"comment", b"hello"), (b"comment", b"\xff\xfe"), (b"atime", b"1600000000.25"), (b"ctime", b"1"),
                (b"uname", b"someone"), (b"gname", b"grp"), (b"VENDOR.key", b"value"), (b"SCHILY.dev", b"2049"),
                (b"SCHILY.ino", b"12"), (b"SCHILY.nlink", b"1"), (b"LIBARCHIVE.creationtime", b"1600000000"),
                (b"hdrcharset", b"ISO-IR 10646 2000 UTF-8")]

encodings = st.builds(
    Encoding,
    magic=st.sampled_from(["posix", "posix", "gnu", "v7"]),
    name_via=st.sampled_from(["field", "field", "prefix", "gnu", "pax"]),
    link_via=st.sampled_from(["field", "gnu", "pax"]),
    numbers=st.sampled_from(["nul", "space", "blank", "base256"]),
    pax_numbers=st.lists(st.sampled_from(["uid", "gid", "size", "mtime"]), unique=True, max_size=4).map(tuple),
    pax_type=st.sampled_from([tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE]),
    extra_pax=st.lists(st.sampled_from(HARMLESS_PAX), unique=True, max_size=3).map(tuple),
    sparse=st.sampled_from(["pax1.0", "pax0.1", "pax0.0"]),
    signed_checksum=st.booleans(),
    spelling=st.sampled_from(["", "", "./"]),
    dir_slash=st.booleans(),
)


@st.composite
def spelled(draw: st.DrawFn, op: Op) -> bytes:
    """One entry, spelled any way that keeps its meaning."""
    member = op.member()
    twist = draw(st.sampled_from(["", "", "", "slashes", "dots"]))
    if twist == "slashes":
        member = replace(member, name=member.name.replace(b"/", b"//"))
    elif twist == "dots":
        member = replace(member, name=member.name.replace(b"/", b"/./"))
    if op.kind == "link":
        member = replace(member, linkname=draw(st.sampled_from([b"", b"/", b"./", b"//"])) + member.linkname)
    if op.kind == "file" and op.runs is None and draw(st.booleans()):
        member = replace(member, type=tarfile.AREGTYPE)
    if op.kind == "whiteout" and draw(st.integers(0, 4)) == 0:
        member = replace(member, type=draw(st.sampled_from([tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.FIFOTYPE])),
                         data=b"")
    data = encode(member, draw(encodings))
    if draw(st.integers(0, 9)) == 0:
        data = special(tarfile.XGLTYPE, pax_records([(b"comment", b"global")]), b"pax_global_header") + data
    return data


def _short(data: bytes) -> str:
    return repr(data) if len(data) <= 80 else f"<{len(data)} bytes: {data[:60]!r}...>"


@dataclass
class Stack:
    """Layers as ops (oldest first) and each op's bytes; `blobs()` assembles the layer tars."""

    def __repr__(self) -> str:
        extra = {k: _short(v) for k, v in self.extra.items()}
        return f"Stack(layers={self.layers!r}, ends={self.ends!r}, extra={extra}, cut={self.cut})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # what hypothesis prints for a failing example
        printer.text(repr(self))

    layers: list[list[Op]]
    parts: list[list[bytes]]
    ends: list[str]
    extra: dict[tuple[int, int], bytes] = field(default_factory=dict)  # (layer, position) -> bytes put before it
    cut: dict[int, int] = field(default_factory=dict)  # layer -> the op after which the layer's bytes stop

    def blobs(self) -> list[bytes]:
        out = []
        for i, parts in enumerate(self.parts):
            stream = Stream()
            last = self.cut.get(i, len(parts))
            for j, part in enumerate(parts[:last]):
                if (i, j) in self.extra:
                    stream.add(self.extra[(i, j)])
                stream.add(part)
            if (i, last) in self.extra:
                stream.add(self.extra[(i, last)])
            out.append(stream.bytes("none" if i in self.cut else self.ends[i]))
        return out


@st.composite
def stacks(draw: st.DrawFn, max_layers: int = 3) -> Stack:
    """1-3 layers of 0-7 entries over a few paths. Layers that contradict themselves are kept rare (they are refused
    whole, which says little about the rest), not excluded."""
    from tests.builders.tarmodel import check_layer

    files: list[str] = []
    layers: list[list[Op]] = []
    for _ in range(draw(st.integers(1, max_layers))):
        layer_ops: list[Op] = []
        for _ in range(draw(st.integers(0, 7))):
            op = draw(ops(files))
            try:
                check_layer([*layer_ops, op])
            except Refused:
                if draw(st.integers(0, 19)) > 0:
                    continue
            layer_ops.append(op)
        layers.append(layer_ops)
    parts = [[draw(spelled(op)) for op in layer_ops] for layer_ops in layers]
    ends = [draw(st.sampled_from(["marker", "record", "none"])) for _ in layers]
    return Stack(layers, parts, ends)


def expected_tree(layers: Sequence[Sequence[Op]]) -> dict[str, MNode] | None:
    try:
        return model(layers)
    except Refused:
        return None


# -- property 1 ------------------------------------------------------------------------------------------------------


@examples()
@given(stacks())
def test_every_spelling_of_a_layer_means_what_its_entries_say(stack: Stack) -> None:
    expected = expected_tree(stack.layers)
    outcome = run(stack.blobs())
    if expected is None:
        one_line_error(outcome.error)
        event("refused")
        return
    assert_means(outcome, expected)


# -- property 2: hostile members -------------------------------------------------------------------------------------

REFUSE = "refuse"
ANY = "any"  # any one-line error or extractable tree: no standard says more


@dataclass(frozen=True)
class Meaning:
    """One acceptable reading of a hostile member: REFUSE, ANY, or the ops it stands for (none: it means nothing),
    optionally ending its layer there (*truncates*: nothing after it is read)."""

    verdict: str = "tree"  # tree | refuse | any
    ops: tuple[Op, ...] = ()
    truncates: bool = False


REFUSED = Meaning(REFUSE)
ANYTHING = Meaning(ANY)


def means(*ops_: Op, truncates: bool = False) -> Meaning:
    return Meaning("tree", ops_, truncates)


@dataclass(frozen=True)
class Hostile:
    """A hostile member: its bytes, what a correct reader makes of it, and where today's flattener is known to do
    otherwise, what it does (*buggy*: readings, or a check of the outcome) and the regression test pinning it."""

    what: str
    data: bytes = field(repr=False)
    correct: tuple[Meaning, ...]
    bug: str = ""
    buggy: tuple[Meaning, ...] = ()
    buggy_outcome: Callable[[Outcome], bool] | None = None

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(f"Hostile({self.what!r}, {_short(self.data)}, correct={self.correct}, bug={self.bug!r}, "
                     f"buggy={self.buggy})")


def _file(path: str = "h", content: bytes = b"xyz", **kw: Any) -> Op:
    return Op("file", path, content, **kw)


def _bytes(member: Member, enc: Encoding | None = None) -> bytes:
    return encode(member, enc or Encoding())


def _with_pax(member: Member, *records: tuple[bytes, bytes]) -> bytes:
    return special(tarfile.XHDTYPE, pax_records(list(records))) + encode(member, Encoding())


def _owned(key: str, value: int) -> Op:
    """The file `h` owned by *value*: refused where it is written if no Linux file can have that owner (the
    flattener checks the entries it writes, not those a newer layer hides)."""
    invalid = "" if 0 <= value < 2**32 else "an owner no Linux file can have"
    return _file(**{key: value}, invalid=invalid)


def _go_int(text: str) -> int | None:
    """What Go's strconv.ParseInt(text, 10, 64) makes of it (None: an error, so archive/tar's ErrHeader)."""
    body = text[1:] if text[:1] in "+-" else text
    if not body or not body.isascii() or not body.isdigit():
        return None
    value = int(text)
    return value if -(2**63) <= value < 2**63 else None


_NUMBER_TEXTS = ["abc", "", " 7", "7 ", "7_0", "\u0667", "0x7", "7.0", "+7", "-1", "99999999999999999999",
                 "4294967296", "1000"]


@st.composite
def hostile_names(draw: st.DrawFn) -> Hostile:
    choice = draw(st.sampled_from(["absolute", "dotdot", "nul-pax", "nul-field", "path-max", "component",
                                   "whiteout-dot", "beneath-whiteout", "aufs", "trailing-slash-file",
                                   "xattr-name"]))
    base = draw(st.sampled_from(["h", "a", "a/h"]))
    if choice == "absolute":
        return Hostile(choice, _bytes(Member(b"/" + base.encode(), data=b"xyz")), (REFUSED,))
    if choice == "dotdot":
        name = draw(st.sampled_from([b"../h", b"a/../../h", b"a/..", b"..", b"a/b/../../../h"]))
        return Hostile(choice, _bytes(Member(name, data=b"xyz"), draw(encodings)), (REFUSED,))
    if choice == "nul-pax":  # Go's archive/tar refuses a NUL in a PAX path (and tarfile keeps it)
        return Hostile(choice, _with_pax(Member(b"h", data=b"xyz"), (b"path", b"h\0x")), (REFUSED,))
    if choice == "nul-field":  # in the ustar field a NUL ends the name, for every reader
        return Hostile(choice, _bytes(Member(b"h\0junk", data=b"xyz")), (means(_file("h")),))
    if choice == "path-max":
        # Few components: how deep paths cost is test_deep_paths_cost_time_and_memory_linear_in_the_layer's.
        length = draw(st.sampled_from([PATH_MAX, PATH_MAX + 1]))
        name = (("c" * 200 + "/") * 20 + "x" * (length - 4020)).encode()
        assert len(name) == length
        data = _with_pax(Member(b"long", data=b"xyz"), (b"path", name))
        if length > PATH_MAX:
            return Hostile(choice, data, (REFUSED,))
        return Hostile(choice, data, (means(_file(name.decode())),))
    if choice == "component":  # Linux's NAME_MAX: no filesystem can hold a longer name, Docker's extraction fails
        name = ("c" * 256).encode()
        return Hostile(choice, _bytes(Member(name, data=b"xyz"), draw(encodings)), (REFUSED,),
                       )
    if choice == "whiteout-dot":
        name = draw(st.sampled_from([b".wh..", b".wh...", b"a/.wh..", b"a/.wh..."]))
        return Hostile(choice, _bytes(Member(name)), (REFUSED,))
    if choice == "beneath-whiteout":
        return Hostile(choice, _bytes(Member(b"a/.wh.x/y", data=b"xyz")), (REFUSED,))
    if choice == "aufs":  # AUFS bookkeeping (hard link directory, metadata): skipped, as Docker does
        name = draw(st.sampled_from([b".wh..wh.plnk/1234.5", b".wh..wh.aufs", b".wh..wh.orph/x", b".wh."]))
        return Hostile(choice, _bytes(Member(name, data=b"xyz")), (means(),))
    if choice == "xattr-name":  # not UTF-8: kept byte for byte (as Go and Docker do) or refused, not a traceback
        name = draw(st.sampled_from([b"user.\xff", b"user.\x80x", b"\xffuser.a"]))
        data = _with_pax(Member(b"h", data=b"xyz"), (b"SCHILY.xattr." + name, b"v"))
        meant = _file(xattrs=((name.decode("utf-8", "surrogateescape"), "v"),))
        return Hostile(choice, data, (REFUSED, means(meant)))
    # a regular file whose PAX path ends in a slash is still that file (tarfile and Go both drop the slash)
    return Hostile(choice, _with_pax(Member(b"h", data=b"xyz"), (b"path", b"h/")), (means(_file("h")),))


@st.composite
def hostile_numbers(draw: st.DrawFn) -> Hostile:
    choice = draw(st.sampled_from(["pax-size", "negative-size", "huge-size", "pax-owner", "ustar-owner",
                                   "pax-mtime", "device"]))
    if choice == "pax-size":
        text = draw(st.sampled_from(["abc", "", " 3", "3 ", "\u0663", "3.0", "0x3", "+3", "3"]))
        data = _with_pax(Member(b"h", data=b"xyz"), (b"size", text.encode()))
        go = _go_int(text) if text else 3  # Go keeps the ustar size for an empty record
        correct = (means(_file()),) if go == 3 else (REFUSED,)
        return Hostile(choice, data, correct)
    if choice == "negative-size":
        size = -draw(st.sampled_from([1, 2, 511, 512, 2**40]))
        member = header({"name": b"h", "mode": octal(0o644, 8), "uid": octal(0, 8), "gid": octal(0, 8),
                         "size": base256(size, 12), "mtime": octal(MTIME, 12), "type": tarfile.REGTYPE,
                         "magic": GNU_MAGIC}) + pad(b"xyz")
        return Hostile(choice, member, (REFUSED,))
    if choice == "huge-size":  # the data ends long before: refused, whether the data is read or skipped
        # (skipping the data of an entry the flattener does not read stops at the end of the stream, however much
        # it declares: test_a_huge_size_on_an_entry_that_is_not_read_is_refused_at_once)
        size = draw(st.sampled_from([10**10, 10**12, 2**63 - 1]))
        data = _with_pax(Member(b"h", data=b"xyz"), (b"size", str(size).encode()))
        return Hostile(choice, data, (REFUSED,))
    if choice == "pax-owner":
        key = draw(st.sampled_from(["uid", "gid"]))
        text = draw(st.sampled_from(_NUMBER_TEXTS))
        ustar = draw(st.sampled_from([0, 1000]))
        member = Member(b"h", data=b"xyz", **{key: ustar})
        data = _with_pax(member, (key.encode(), text.encode()))
        go = _go_int(text) if text else ustar
        correct = REFUSED if go is None else means(_owned(key, go))
        return Hostile(choice, data, (correct,))
    if choice == "ustar-owner":
        value = draw(st.sampled_from([-1, -(2**40), 2**32, 2**40, 2**32 - 2]))
        member = header({"name": b"h", "mode": octal(0o644, 8), "uid": base256(value, 8), "gid": octal(0, 8),
                         "size": octal(3, 12), "mtime": octal(MTIME, 12), "type": tarfile.REGTYPE,
                         "magic": GNU_MAGIC}) + pad(b"xyz")
        return Hostile(choice, member, (means(_owned("uid", value)),))
    if choice == "pax-mtime":
        text = draw(st.sampled_from(["abc", "inf", "-inf", "nan", "1e999", "1e30", ".5", "1_600_000_000",
                                     " 1600000000", "0x10", "1600000000.5", "-1.25", "+5", "5.", "7"]))
        data = _with_pax(Member(b"h", data=b"xyz"), (b"mtime", text.encode()))
        if _go_time(text):
            return Hostile(choice, data, (means(_file(mtime=text)),))
        return Hostile(choice, data, (REFUSED,))
    # device numbers beyond what the ustar fields can hold again (base-256), or negative
    major = draw(st.sampled_from([8**7, 2**40, -1]))
    member = header({"name": b"h", "mode": octal(0o644, 8), "uid": octal(0, 8), "gid": octal(0, 8),
                     "size": octal(0, 12), "mtime": octal(MTIME, 12), "type": tarfile.CHRTYPE, "magic": GNU_MAGIC,
                     "devmajor": base256(major, 8), "devminor": octal(1, 8)})
    return Hostile(choice, member, (means(Op("char", "h", device=(major, 1), invalid="device numbers")),))


def _go_time(text: str) -> bool:
    """Does Go's parsePAXTime accept *text* (decimal seconds, an optional sign and fraction)?"""
    seconds, _, fraction = text.partition(".")
    return _go_int(seconds) is not None and (not fraction or (fraction.isascii() and fraction.isdigit()))


@st.composite
def hostile_types(draw: st.DrawFn) -> Hostile:
    choice = draw(st.sampled_from(["unknown", "contiguous", "old-gnu-sparse", "aregtype-dir", "sized-header-only"]))
    if choice == "unknown":
        type_ = draw(st.sampled_from([b"Z", b"V", b"D", b"M", b"N", b"A", b"8", b"9", b"I", b"\x80", b"?"]))
        data = draw(st.sampled_from([b"", b"xyz", b"q" * 600]))
        member = header({"name": b"h", "mode": octal(0o644, 8), "uid": octal(0, 8), "gid": octal(0, 8),
                         "size": octal(len(data), 12), "mtime": octal(MTIME, 12), "type": type_,
                         "magic": GNU_MAGIC}) + pad(data)
        return Hostile(choice, member, (REFUSED,))  # wherever it is: Docker applies every layer whole
    if choice == "contiguous":  # POSIX: read as a regular file; Docker refuses the type
        return Hostile(choice, _bytes(Member(b"h", type=tarfile.CONTTYPE, data=b"xyz")), (REFUSED, means(_file())))
    if choice == "old-gnu-sparse":  # GNU tar and Go read it; Docker's extraction refuses the type
        content, runs = draw(sparse_content())
        data = _bytes(Member(b"h", data=content, runs=runs), Encoding(sparse="oldgnu"))
        return Hostile(choice, data, (REFUSED, means(_file(content=content))))
    if choice == "aregtype-dir":  # V7's directory: an old regular file whose name ends in a slash
        return Hostile(choice, _bytes(Member(b"h/", type=tarfile.AREGTYPE), Encoding(magic="v7")),
                       (means(Op("dir", "h")),))
    # a header-only type declaring data: its data is taken for the next header (by Go too), which is not one
    type_ = draw(st.sampled_from([tarfile.SYMTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE, tarfile.CHRTYPE]))
    member = header({"name": b"h", "mode": octal(0o644, 8), "uid": octal(0, 8), "gid": octal(0, 8),
                     "size": octal(3, 12), "mtime": octal(MTIME, 12), "type": type_, "linkname": b"t",
                     "magic": GNU_MAGIC}) + pad(b"xyz")
    return Hostile(choice, member, (REFUSED,))


@st.composite
def hostile_structure(draw: st.DrawFn) -> Hostile:
    choice = draw(st.sampled_from(["garbage", "bad-number", "bad-checksum", "lone-zero", "bad-pax-record",
                                   "dangling", "special-size", "after-end", "names-twice", "global-records"]))
    after = _bytes(Member(b"h", data=b"xyz"))
    if choice == "after-end":  # two zero blocks end the archive for every reader: what follows means nothing
        return Hostile(choice, END + draw(st.sampled_from([after, b"\x01" * BLOCK, b"junk"])), (means(truncates=True),))
    if choice == "names-twice":  # two long names for one entry: readers differ on which wins (tarfile, Go)
        first = draw(st.sampled_from([special(tarfile.GNUTYPE_LONGNAME, b"g1\0", b"././@LongLink", magic=GNU_MAGIC),
                                      special(tarfile.XHDTYPE, pax_records([(b"path", b"p1")]))]))
        second = draw(st.sampled_from([special(tarfile.GNUTYPE_LONGNAME, b"g2\0", b"././@LongLink", magic=GNU_MAGIC),
                                       special(tarfile.XHDTYPE, pax_records([(b"path", b"p2")]))]))
        return Hostile(choice, first + second + after, (ANYTHING,))
    if choice == "global-records":  # POSIX applies them to every later entry, Go (and so Docker) to none
        records = draw(st.sampled_from([[(b"uid", b"7")], [(b"path", b"g")], [(b"mtime", b"5")],
                                        [(b"SCHILY.xattr.user.g", b"v")]]))
        return Hostile(choice, special(tarfile.XGLTYPE, pax_records(records), b"pax_global_header") + after,
                       (ANYTHING,))
    if choice == "garbage":
        block = draw(st.binary(min_size=BLOCK, max_size=BLOCK).filter(lambda b: any(b)))
        return Hostile(choice, block + after, (REFUSED,))
    if choice == "bad-number":
        key = draw(st.sampled_from(["size", "uid", "mode", "mtime"]))
        fields = {"name": b"h", "mode": octal(0o644, 8), "uid": octal(0, 8), "gid": octal(0, 8),
                  "size": octal(3, 12), "mtime": octal(MTIME, 12), "type": tarfile.REGTYPE, "magic": GNU_MAGIC}
        fields[key] = draw(st.sampled_from([b"zzzz", b"12 34", b"9", b"0x1f"]))
        return Hostile(choice, header(fields) + pad(b"xyz") + after, (REFUSED,))
    if choice == "bad-checksum":
        block = bytearray(_bytes(Member(b"h", data=b"xyz"))[:BLOCK])
        block[148:156] = draw(st.sampled_from([b"0000000\0", b"zzzzzz\0 ", b"\0" * 8]))
        return Hostile(choice, bytes(block) + pad(b"xyz") + after, (REFUSED,))
    if choice == "lone-zero":  # GNU tar reads on after one zero block, Go refuses, tarfile stops
        return Hostile(choice, bytes(BLOCK) + after, (REFUSED, means(_file()), means(truncates=True)))
    if choice == "bad-pax-record":
        body = draw(st.sampled_from([b"99 path=x\n", b"5 path=x\n", b"9 pathx\n", b"10 path=x", b"x path=y\n",
                                     b"0 path=x\n", b"12 =value\n"]))
        data = special(tarfile.XHDTYPE, body) + after
        return Hostile(choice, data, (REFUSED,))
    if choice == "dangling":  # a special header and then the end
        type_ = draw(st.sampled_from([tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK]))
        body = pax_records([(b"path", b"x")]) if type_ == tarfile.XHDTYPE else b"x\0"
        return Hostile(choice, special(type_, body, magic=GNU_MAGIC) + END, (REFUSED,))
    size = draw(st.sampled_from([(1 << 20) + 1, 1 << 40, -1]))
    type_ = draw(st.sampled_from([tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME]))
    head = header({"name": b"././@LongLink", "mode": octal(0o644, 8), "uid": octal(0, 8), "gid": octal(0, 8),
                   "size": base256(size, 12), "mtime": octal(0, 12), "type": type_, "magic": GNU_MAGIC})
    return Hostile(choice, head + bytes(BLOCK) + after, (REFUSED,))


@st.composite
def hostile_sparse(draw: st.DrawFn) -> Hostile:
    choice = draw(st.sampled_from(["huge", "overlap", "beyond", "unsorted", "odd-map", "not-a-number",
                                   "records-on-plain-file"]))
    enc = Encoding(sparse=draw(st.sampled_from(["pax1.0", "pax0.1", "oldgnu"])))
    if choice == "huge":  # 4 KiB of layer meaning a 16 GiB file of zeros
        realsize = draw(st.sampled_from([1 << 34, 1 << 40]))
        records = [(b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0"), (b"GNU.sparse.name", b"h"),
                   (b"GNU.sparse.realsize", str(realsize).encode())]
        sparse_map = pad(f"1\n{realsize - 3}\n3\n".encode())
        data = special(tarfile.XHDTYPE, pax_records(records)) + _bytes(
            Member(b"GNUSparseFile.0/h", data=sparse_map + b"xyz"))
        return Hostile(choice, data, (REFUSED, ANYTHING))
    if choice == "records-on-plain-file":  # without a sparse version or map, Go ignores GNU.sparse.* records
        record = draw(st.sampled_from([(b"GNU.sparse.name", b"renamed"), (b"GNU.sparse.size", b"3"),
                                       (b"GNU.sparse.realsize", b"700"), (b"GNU.sparse.realsize", b"5")]))
        return Hostile(choice, _with_pax(Member(b"h", data=b"xyz"), record), (means(_file()),))
    runs = {"overlap": ((0, 4), (2, 4)), "beyond": ((0, 2), (10, 2)), "unsorted": ((4, 2), (0, 2)),
            "odd-map": ((0, 2), (4, 2)), "not-a-number": ((0, 2),)}[choice]
    member = Member(b"h", data=b"abcdefgh", runs=runs)
    if choice == "odd-map":  # a 0.1 map with an odd count of numbers
        data = _with_pax(Member(b"h", data=b"abcd"), (b"GNU.sparse.major", b"0"), (b"GNU.sparse.minor", b"1"),
                         (b"GNU.sparse.size", b"8"), (b"GNU.sparse.map", b"0,2,4"))
    elif choice == "not-a-number":
        data = _with_pax(Member(b"h", data=b"ab"), (b"GNU.sparse.major", b"0"), (b"GNU.sparse.minor", b"1"),
                         (b"GNU.sparse.size", b"8"), (b"GNU.sparse.map", b"0,x"))
        return Hostile(choice, data, (REFUSED,))
    else:
        data = _bytes(member, enc)
    return Hostile(choice, data, (REFUSED,))


@st.composite
def hostile_links(draw: st.DrawFn) -> Hostile:
    choice = draw(st.sampled_from(["nul-linkpath", "empty-symlink", "empty-hardlink", "dotdot-hardlink",
                                   "long-target"]))
    if choice == "nul-linkpath":
        data = _with_pax(Member(b"h", type=tarfile.SYMTYPE, linkname=b"t"), (b"linkpath", b"t\0x"))
        return Hostile(choice, data, (REFUSED,))
    if choice == "empty-symlink":  # no system can create it; nothing says who refuses
        data = _bytes(Member(b"h", type=tarfile.SYMTYPE, linkname=b""))
        return Hostile(choice, data, (REFUSED, means(Op("symlink", "h", target=""))))
    if choice == "empty-hardlink":
        return Hostile(choice, _bytes(Member(b"h", type=tarfile.LNKTYPE, linkname=b"")), (REFUSED,))
    if choice == "dotdot-hardlink":
        return Hostile(choice, _bytes(Member(b"h", type=tarfile.LNKTYPE, linkname=b"../etc/passwd")), (REFUSED,))
    target = b"t" * (PATH_MAX + 1)
    type_ = draw(st.sampled_from([tarfile.SYMTYPE, tarfile.LNKTYPE]))
    return Hostile(choice, _bytes(Member(b"h", type=type_, linkname=target), Encoding(link_via="gnu")), (REFUSED,))


@st.composite
def hostile_cuts(draw: st.DrawFn) -> Hostile:
    """A member cut short (the layer's bytes end inside it)."""
    member = Member(b"h" * draw(st.sampled_from([1, 150])), data=draw(st.sampled_from([b"xyz", b"d" * 1500])),
                    pax=draw(st.sampled_from([(), ((b"SCHILY.xattr.user.a", b"v"),)])))
    enc = draw(encodings)
    whole = encode(member, enc)
    stored = len(pad(member.data))
    data_at = len(whole) - stored
    cut = draw(st.integers(1, len(whole) - 1))
    op = _file(member.name.decode(), member.data, xattrs=(("user.a", "v"),) if member.pax else ())
    if cut >= data_at + len(member.data):  # only padding is missing
        return Hostile("cut-in-padding", whole[:cut], (REFUSED, means(op, truncates=True)))
    where = "cut-in-data" if cut > data_at else "cut-in-header"
    if cut == data_at:  # every header is whole, no data: Go reads a truncated file; tarfile the same
        where = "cut-before-data"
    return Hostile(where, whole[:cut], (REFUSED,))


HOSTILES = st.one_of(hostile_names(), hostile_numbers(), hostile_types(), hostile_structure(), hostile_sparse(),
                     hostile_links(), hostile_cuts())


def _readings(stack: Stack, where: tuple[int, int], meanings: Sequence[Meaning]) -> list[Meaning | list[list[Op]]]:
    """For each meaning, the layers (ops) it makes of the stack, or the meaning itself for REFUSE and ANY."""
    layer_index, position = where
    out: list[Meaning | list[list[Op]]] = []
    for meaning in meanings:
        if meaning.verdict != "tree":
            out.append(meaning)
            continue
        layers = [list(ops_) for ops_ in stack.layers]
        ops_ = layers[layer_index]
        after = [] if meaning.truncates else ops_[position:]
        layers[layer_index] = [*ops_[:position], *meaning.ops, *after]
        out.append(layers)
    return out


def _fits(outcome: Outcome, reading: Meaning | list[list[Op]]) -> str:
    """"" if *outcome* is what *reading* says, else why not."""
    if isinstance(reading, Meaning):
        if outcome.error is not None:
            try:
                one_line_error(outcome.error)
            except AssertionError as exc:
                return str(exc)
            return ""
        if reading.verdict == REFUSE:
            return "not refused"
        try:
            extract(outcome.value[0])
        except NotExtractable as exc:
            return f"not extractable: {exc}"
        return ""
    expected = expected_tree(reading)
    if expected is None:
        return _fits(outcome, REFUSED)
    try:
        assert_means(outcome, expected)
    except AssertionError as exc:
        return str(exc)
    return ""


@st.composite
def hostile_stacks(draw: st.DrawFn) -> tuple[Stack, Hostile, tuple[int, int]]:
    stack = draw(stacks(max_layers=2))
    hostile = draw(HOSTILES)
    layer_index = draw(st.integers(0, len(stack.layers) - 1))
    position = draw(st.integers(0, len(stack.layers[layer_index])))
    stack.extra[(layer_index, position)] = hostile.data
    if hostile.what.startswith("cut"):
        stack.cut[layer_index] = position  # nothing of the layer follows a member cut short
    return stack, hostile, (layer_index, position)


@examples(2)
@given(hostile_stacks())
def test_hostile_headers_are_refused_or_mean_what_docker_reads(case: tuple[Stack, Hostile, tuple[int, int]]) -> None:
    stack, hostile, where = case
    event(hostile.what)
    outcome = run(stack.blobs())
    if outcome.error is not None and not isinstance(outcome.error, Exception):
        raise outcome.error
    reasons = [_fits(outcome, reading) for reading in _readings(stack, where, hostile.correct)]
    if "" in reasons:
        return
    if hostile.bug:
        if hostile.buggy_outcome is not None and hostile.buggy_outcome(outcome):
            event(f"known bug: {hostile.bug}")
            return
        if any(_fits(outcome, reading) == "" for reading in _readings(stack, where, hostile.buggy)):
            event(f"known bug: {hostile.bug}")
            return
    got = f"error {outcome.error!r}" if outcome.error is not None else "a tree"
    raise AssertionError(f"{hostile.what}: got {got}; " + " / ".join(reasons))


# -- property 3: corrupted bytes -------------------------------------------------------------------------------------


@examples()
@given(stacks(max_layers=2), st.data())
def test_corrupted_layers_are_refused_or_extractable(stack: Stack, data: st.DataObject) -> None:
    blobs = stack.blobs()
    index = data.draw(st.integers(0, len(blobs) - 1))
    blob = bytearray(blobs[index])
    for _ in range(data.draw(st.integers(0, 4))):
        if blob:
            blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    blobs[index] = bytes(blob)
    outcome = run(blobs)
    if outcome.error is not None:
        one_line_error(outcome.error)
        return
    out, flat = outcome.value
    tree, _ = extract(out)
    check_summary(flat, tree)


# -- regression tests for what the fuzz found (each failed before its fix; a new finding is pinned as a strict xfail) -


# What a regression test may fail with (anything else, a NameError say, is the test's own bug and must not pass).
_FAILS = (AssertionError, pytest.fail.Exception)  # (for the next finding's strict xfail)


def _flatten(*layers: bytes) -> dict[str, Node]:
    out, _ = flatten_capped(layers)
    return extract(out)[0]


def _one(member: bytes) -> bytes:
    return member + _bytes(Member(b"after", data=b"after")) + END


@pytest.mark.parametrize("text", ["abc", "0x7", " 7", "\u0667", "7_0"])
def test_a_pax_uid_that_is_not_a_number_is_refused(text: str) -> None:
    """Fuzz finding (was a strict xfail): tarfile reads a PAX uid it cannot parse as 0 (and ' 7', '7_0', Arabic
    digits as 7 / 70): the file was flattened root-owned; Go's archive/tar (Docker) refuses the layer."""
    layer = _one(_with_pax(Member(b"a", data=b"xyz", uid=1000), (b"uid", text.encode())))
    with pytest.raises(LayerError):
        _flatten(layer)


def test_an_empty_pax_uid_keeps_the_ustar_uid() -> None:
    """Fuzz finding (was a strict xfail): an empty PAX uid record means 'keep the ustar value' (POSIX; Go keeps it),
    but tarfile reads it as 0: a file of uid 1000 comes out root-owned."""
    layer = _one(_with_pax(Member(b"a", data=b"xyz", uid=1000), (b"uid", b"")))
    outcome = run([layer])
    assert outcome.error is not None or _flatten(layer)["a"].uid == 1000


def test_a_negative_size_is_a_layer_error() -> None:
    """Fuzz finding (was a strict xfail): a regular file of size -1 (a base-256 ustar size) makes tarfile's copy raise
    OSError('unexpected end of data') out of flatten: a traceback, not a LayerError."""
    member = header({"name": b"a", "mode": octal(0o644, 8), "uid": octal(0, 8), "gid": octal(0, 8),
                     "size": base256(-1, 12), "mtime": octal(MTIME, 12), "type": tarfile.REGTYPE, "magic": GNU_MAGIC})
    outcome = run([member + pad(b"xyz") + END])
    assert isinstance(outcome.error, LayerError), repr(outcome.error)


def test_an_xattr_name_that_is_not_utf8_is_not_a_crash() -> None:
    """Fuzz finding (was a strict xfail): a PAX xattr record whose name is not UTF-8 (SCHILY.xattr.user.\\xff) is kept
    by the flattener, and tarfile's writer cannot encode it: UnicodeEncodeError escapes flatten (a traceback); Go
    keeps the name's bytes."""
    layer = _one(_with_pax(Member(b"a", data=b"xyz"), (b"SCHILY.xattr.user.\xff", b"v")))
    outcome = run([layer])
    if outcome.error is not None:
        assert isinstance(outcome.error, LayerError), repr(outcome.error)
        return
    assert _flatten(layer)["a"].xattrs == {"SCHILY.xattr.user.\udcff": "v"}


@pytest.mark.parametrize("text", ["abc", "3.0", ""])
def test_a_pax_size_that_is_not_a_number_is_refused(text: str) -> None:
    """Fuzz finding (was a strict xfail): tarfile reads a PAX size it cannot parse as 0: the file's content is lost and
    its data is then read as the next header, which ends the layer silently; Go refuses."""
    layer = _one(_with_pax(Member(b"a", data=b"xyz"), (b"size", text.encode())))
    if text == "":  # Go keeps the ustar size: the right tree is the layer's
        tree = _flatten(layer)
        assert tree["a"].content == b"xyz" and "after" in tree
        return
    with pytest.raises(LayerError):
        _flatten(layer)


@pytest.mark.parametrize("text", ["inf", "-inf", "nan", "1e999"])
def test_an_infinite_or_nan_pax_mtime_is_a_layer_error(text: str) -> None:
    """Fuzz finding (was a strict xfail): a PAX mtime of inf/nan/1e999 escapes flatten as OverflowError/ValueError
    (tarfile's writer cannot round it): a traceback instead of a one-line LayerError."""
    layer = _one(_with_pax(Member(b"a", data=b"xyz"), (b"mtime", text.encode())))
    with pytest.raises(LayerError):
        _flatten(layer)


@pytest.mark.parametrize("text", ["abc", "1e30", ".5", "1_600_000_000"])
def test_a_pax_mtime_that_is_not_a_decimal_is_refused(text: str) -> None:
    """Fuzz finding (was a strict xfail): tarfile reads a PAX mtime with float(): 'abc' becomes 0, '1e30', ' 5', '1_0',
    '.5' are taken; Go's archive/tar accepts only [-]digits[.digits] and refuses the layer."""
    layer = _one(_with_pax(Member(b"a", data=b"xyz"), (b"mtime", text.encode())))
    with pytest.raises(LayerError):
        _flatten(layer)


@pytest.mark.parametrize("type_", [b"Z", b"V", b"D"])
def test_an_entry_of_unknown_type_is_refused(type_: bytes) -> None:
    """Fuzz finding (was a strict xfail): an entry of unknown type ('Z', GNU 'V'/'D'/'M'/'N'...) is written to the
    output as it is: no extractor knows what to make of it (GNU tar makes an empty regular file); Docker refuses the
    layer ('unhandled tar header type')."""
    member = header({"name": b"a", "mode": octal(0o644, 8), "uid": octal(0, 8), "gid": octal(0, 8),
                     "size": octal(3, 12), "mtime": octal(MTIME, 12), "type": type_, "magic": GNU_MAGIC})
    with pytest.raises(LayerError):
        _flatten(_one(member + pad(b"xyz")))


@pytest.mark.parametrize("bad", ["garbage", "checksum", "number", "pax-record", "sized-symlink"])
def test_an_invalid_header_after_the_first_is_refused(bad: str) -> None:
    """Fuzz finding (was a strict xfail): tarfile takes an invalid header after the first member (bad checksum, non-
    octal field, malformed PAX record, data after a header-only type) for the end of the archive: every later entry
    is dropped silently; Go's archive/tar refuses (ErrHeader)."""
    member = _bytes(Member(b"b", data=b"xyz"))
    if bad == "garbage":
        member = b"\x01" * BLOCK + member
    elif bad == "checksum":
        member = member[:148] + b"0000000\0" + member[156:]
    elif bad == "number":
        member = header({"name": b"b", "mode": b"zzzz", "size": octal(3, 12), "type": tarfile.REGTYPE,
                         "magic": GNU_MAGIC}) + pad(b"xyz")
    elif bad == "pax-record":
        member = special(tarfile.XHDTYPE, b"99 path=x\n") + member
    else:
        member = header({"name": b"s", "mode": octal(0o777, 8), "size": octal(3, 12), "type": tarfile.SYMTYPE,
                         "linkname": b"t", "magic": GNU_MAGIC}) + pad(b"xyz") + member
    layer = _bytes(Member(b"a", data=b"first")) + member + _bytes(Member(b"c", data=b"last")) + END
    with pytest.raises(LayerError):
        _flatten(layer)


@pytest.mark.parametrize("cut", [100, 511])
def test_a_layer_cut_short_is_refused(cut: int) -> None:
    """Fuzz finding (was a strict xfail): a layer whose bytes end inside a header (or inside the data of an entry a
    newer layer hides) is read as ending before it; Go reports io.ErrUnexpectedEOF."""
    layer = _bytes(Member(b"a", data=b"first")) + _bytes(Member(b"b", data=b"second"))[:cut]
    with pytest.raises(LayerError):
        _flatten(layer)


@pytest.mark.parametrize("how", ["pax", "base256"])
def test_a_pax_owner_of_4294967296_or_more_is_refused(how: str) -> None:
    """Fuzz finding (was a strict xfail): uids and gids of 2**32 or more (base-256 or PAX) are written to the output as
    they are: no Linux file can have them (GNU tar in the appliance refuses them, Docker's chown truncates them);
    they should be a LayerError."""
    if how == "pax":
        member = _with_pax(Member(b"a", data=b"xyz"), (b"uid", b"4294967296"))
    else:
        member = header({"name": b"a", "mode": octal(0o644, 8), "uid": base256(2**40, 8), "gid": octal(0, 8),
                         "size": octal(3, 12), "mtime": octal(MTIME, 12), "type": tarfile.REGTYPE,
                         "magic": GNU_MAGIC}) + pad(b"xyz")
    with pytest.raises(LayerError):
        _flatten(_one(member))


def test_a_huge_sparse_file_is_not_expanded_in_full() -> None:
    """Fuzz finding (was a strict xfail): a GNU sparse file is expanded in full: 2 KiB of layer declaring a 16 GiB real
    size make 16 GiB of zeros in the flattened stream (time and scratch unbounded by the input); it should stay
    sparse in the output or be refused past a bound."""
    realsize = 1 << 34
    records = [(b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0"), (b"GNU.sparse.name", b"a"),
               (b"GNU.sparse.realsize", str(realsize).encode())]
    member = special(tarfile.XHDTYPE, pax_records(records)) + _bytes(
        Member(b"GNUSparseFile.0/a", data=pad(f"1\n{realsize - 3}\n3\n".encode()) + b"xyz"))
    layer = member + END
    try:
        outcome = run([layer])
    except Unbounded as exc:
        pytest.fail(f"{len(layer)} bytes of layer: {exc}")
    assert outcome.error is None or isinstance(outcome.error, LayerError)


@pytest.mark.parametrize("record", [(b"GNU.sparse.name", b"renamed"), (b"GNU.sparse.size", b"3"),
                                    (b"GNU.sparse.realsize", b"5")])
def test_gnu_sparse_records_on_a_plain_file_change_nothing(record: tuple[bytes, bytes]) -> None:
    """Fuzz finding (was a strict xfail): GNU.sparse.name/size/realsize records on a file that declares no sparse
    version or map are applied by tarfile (a rename, a file of zeros, a size read past the data); Go's archive/tar
    ignores them and reads the plain file."""
    tree = _flatten(_one(_with_pax(Member(b"a", data=b"xyz"), record)))
    assert sorted(tree) == ["a", "after"] and tree["a"].content == b"xyz"


@pytest.mark.parametrize("runs", [((0, 4), (2, 4)), ((4, 2), (0, 2)), ((0, 2), (10, 2))],
                         ids=["overlapping", "unsorted", "beyond"])
def test_a_sparse_map_go_refuses_is_refused(runs: tuple[tuple[int, int], ...]) -> None:
    """Fuzz finding (was a strict xfail): sparse maps Go's archive/tar refuses (overlapping, unsorted, or past the real
    size) are read by tarfile, with content that is none of the file's."""
    layer = _one(_bytes(Member(b"a", data=b"abcdefgh", runs=runs)))
    with pytest.raises(LayerError):
        _flatten(layer)


def test_a_nul_in_a_pax_linkpath_is_refused() -> None:
    """Fuzz finding (was a strict xfail): a NUL in a PAX linkpath cuts a symlink's target short silently (t\\0x becomes
    t); Go's archive/tar refuses a NUL in PAX path and linkpath records."""
    layer = _one(_with_pax(Member(b"s", type=tarfile.SYMTYPE, linkname=b"t"), (b"linkpath", b"t\0x")))
    with pytest.raises(LayerError):
        _flatten(layer)


def test_a_name_component_longer_than_name_max_is_refused() -> None:
    """Fuzz finding (was a strict xfail): a path component longer than NAME_MAX (255 bytes) is flattened; no Linux
    filesystem can hold it, so extraction fails later (ENAMETOOLONG) instead of a LayerError."""
    with pytest.raises(LayerError):
        _flatten(_one(_bytes(Member(b"c" * 256, data=b"xyz"))))


def test_deep_paths_cost_time_and_memory_linear_in_the_layer() -> None:
    """Fuzz finding (was a strict xfail): the flattener kept every ancestor of every path by name and, at the end of
    a layer, checked each against all of its own ancestors: a path of n components cost O(n^2) memory and O(n^3)
    time. One 4096-byte path of 2048 components (a 7 KB layer) took 9 MiB and 2-4 s; 50 of them (300 KB) took 104 s.
    Ancestors are now keys of 16 bytes, computed along the path once."""
    names = [(f"{i}/" + "d/" * 1020 + "zz").encode() for i in range(2)]
    layer = b"".join(_with_pax(Member(b"long", data=b"xyz"), (b"path", name)) for name in names) + END
    outcome = run([layer])
    assert outcome.error is None
    assert outcome.peak < 256 * len(layer) + (1 << 20), f"{outcome.peak} bytes held for a {len(layer)}-byte layer"


def test_fifty_paths_of_2048_components_flatten_in_seconds() -> None:
    names = [(f"{i}/" + "d/" * 2046 + "z").encode() for i in range(50)]
    layer = b"".join(_with_pax(Member(b"long", data=b"xyz"), (b"path", name)) for name in names) + END
    outcome = bounded(lambda: flatten_capped([layer]), len(layer), per_byte=256)
    assert outcome.error is None and outcome.seconds < 10, outcome
    tree, _ = extract(outcome.value[0])
    assert sum(1 for node in tree.values() if node.kind == "file") == 50


def test_a_huge_size_on_an_entry_that_is_not_read_is_refused_at_once() -> None:
    """An entry whose data the flattener does not read (a whiteout, an entry a newer layer hides) was skipped by
    tarfile's stream seek one 1 MiB read per MiB it declares, even after the stream had ended: a PAX size of
    2**63-1 on a whiteout (a 1.5 KB layer) looped for days. The skip now stops at the end of the data, as Go's."""
    layer = _with_pax(Member(b".wh.x"), (b"size", str(2**63 - 1).encode())) + END
    try:
        with watchdog(2.0):
            outcome = run([layer])
    except Unbounded as exc:
        pytest.fail(f"{len(layer)} bytes of layer: {exc}")
    assert isinstance(outcome.error, LayerError), repr(outcome.error)
