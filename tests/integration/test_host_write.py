"""oci-to-qcow2 writes an image's files into the root filesystem with debugfs on the host (issue 13,
converter/disk/hostwrite.py); the old way, GNU tar in the libguestfs appliance, is the judge.

Each fixture image of NAMES (not `system`, which no suite-wide test converts) is converted again with
IMGCONV_UNPACK_IN_APPLIANCE=1, and both disks' root filesystems are read by GNU tar in one appliance: every path,
kind, mode, owner, size, content, link target, device number, xattr, hard-link group and mtime to the nanosecond
must be the same, only extlinux's ldlinux.sys aside. As the fixtures' times are whole seconds and their xattrs
few, one more image is compared the same way: busybox plus a layer of what they lack (nanosecond, zero and
post-2038 times, security, ACL, trusted and empty xattrs, wide device numbers, big ids, implied directories, a
whiteout). So that two equally wrong disks cannot pass, each tree is also judged against the image's own layers
as Python's tarfile reads them (every entry, for the images without whiteouts; Debian's crafted top layer entry
by entry, and what its whiteouts removed; the extra layer's named facts). e2fsck checks each host-written
filesystem. An image with names debugfs cannot be given (a double quote, a newline) is converted through the
fallback, which says why, and its files are on the disk with their exact names.

Cost: the host-written disks are the session's (`converted_disk`); the module adds eight full conversions (six
with the appliance's tar, ~15 s each under TCG and ~30 s for Debian, the extra image's on the host and the
fallback's, ~15 s each), two at a time (beside the session's own when they are not made yet), then one appliance
reading the thirteen disks (~10 s to start, ~1.5 s a small disk, ~16 s each Debian disk: GNU tar's stream
through libguestfs is the slow part). About two minutes on an idle two-core machine when the session's disks
exist; five when its conversions are made here on a loaded one.
"""

from __future__ import annotations

import io
import json
import posixpath
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from fixtures import NAMES, BuiltFixture, debian
from fixtures.image import EPOCH
from tests.builders.derive import derived
from tests.builders.layers import d, dev, f, fifo, hl, layer, sym, wh
from tests.cli import Ran, imgconv
from tests.integration.conftest import session_events, source_ref
from tests.integration.judge import layer_tar, manifest_of, tar_out, tar_times, tool
from tests.treecmp import Entry, diff_trees, hardlink_groups, tree_from_tar
from tests.world import DockerWorld, FixtureImage

pytestmark = [pytest.mark.appliance, pytest.mark.docker]

IN_APPLIANCE = {"IMGCONV_UNPACK_IN_APPLIANCE": "1"}
FALLBACK = "the files cannot be written on the host"
ROOT_OFFSET = 2048 * 512  # the root partition of a BIOS disk
# What imgconv adds to an image's files (lost+found only where the image has none).
OURS = (".imgconv", "lost+found")
T = 1_650_000_000

# On busybox: what the fixtures lack and debugfs must be given exactly as GNU tar gives it (the fixtures' times are
# whole seconds, their only xattr a user one, their devices small).
# security.capability of cap_net_bind_service+ep; system.posix_acl_access of u::rw-,u:1000:r--,g::r--,m::r--,o::---
CAP = bytes.fromhex("0100000200040000000000000000000000000000").decode("utf-8", "surrogateescape")
ACL = bytes.fromhex("02000000" "01000600ffffffff" "02000400e8030000" "04000400ffffffff" "10000400ffffffff"
                    "20000000ffffffff").decode("utf-8", "surrogateescape")
LONG = "rich/" + "l" * 90 + "/" + "m" * 90 + "/file"
RICH_LAYER = layer(
    wh("etc/fixture-release"),
    d("rich", 0o710, uid=5, gid=6, mtime=T, pax={"SCHILY.xattr.user.dir": "on a directory"}),
    f("rich/frac", "a time with nanoseconds\n", mtime=1_600_000_000.123456789),
    f("rich/zero", "epoch\n", mtime=0),
    f("rich/huge", "after 2038\n", mtime=3_000_000_000),
    f("rich/xattrs", "x", 0o755, pax={"SCHILY.xattr.security.capability": CAP, "SCHILY.xattr.user.per%cent": "p",
                                      "SCHILY.xattr.user.empty": "", "SCHILY.xattr.trusted.t": "t"}, mtime=T),
    f("rich/acl", "x", 0o640, pax={"SCHILY.xattr.system.posix_acl_access": ACL}, mtime=T),
    dev("rich/blockdev", tarfile.BLKTYPE, 259, 4464, mode=0o660), dev("rich/null", tarfile.CHRTYPE, 1, 3),
    fifo("rich/fifo"),
    f("rich/setuid", "#!/bin/sh\n", 0o4755, uid=3000000, gid=3000001, mtime=T), d("rich/sticky", 0o1777, mtime=T),
    f("rich/deep/a/b/target", "a hard link shallower than its target\n", mtime=T),
    hl("rich/aa-link", "rich/deep/a/b/target"),
    f("rich/é ü 日本 \\back", "unicode and spaces\n", mtime=T), sym("rich/sym", "deep/a/b/target", mtime=T),
    f(LONG, "a long name\n", mtime=T), d("rich/empty", 0o700, uid=1, gid=2, mtime=T + 1),
)

# On busybox: names debugfs' command parser cannot take (it knows no escapes), a hard link between them.
QUOTED, NEWLINE = 'odd/a "quoted" name', "odd/new\nline"
ODD_LAYER = layer(
    d("odd", 0o750, uid=7, gid=8, mtime=T),
    f(QUOTED, "a double quote in the name\n", 0o640, uid=7, gid=8, mtime=T + 1),
    f(NEWLINE, "a newline in the name\n", 0o600, mtime=T + 2),
    hl("odd/linked", QUOTED, 0o640, uid=7, gid=8, mtime=T + 1),
)


@dataclass
class Conversion:
    """An `oci-to-qcow2 --json` run: its disk, notes and steps' ids."""

    disk: Path
    notes: list[str]
    steps: list[str]

    @classmethod
    def of(cls, disk: Path, events: list[dict[str, Any]]) -> Conversion:
        return cls(disk, [e["message"] for e in events if e["event"] == "note"],
                   [e["id"] for e in events if e["event"] == "step"])


def _events(ran: Ran) -> list[dict[str, Any]]:
    return [json.loads(line) for line in ran.stderr.splitlines() if line.startswith("{")]


@dataclass
class Disks:
    host: dict[str, Conversion]  # the session's conversions: files written by debugfs
    appliance: dict[str, Conversion]  # the same images, files unpacked by the appliance's GNU tar
    odd: Conversion  # busybox plus ODD_LAYER: the fallback
    rich: dict[str, Conversion]  # busybox plus RICH_LAYER, "host" and "appliance"
    odd_layout: Path
    tars: dict[str, Path]  # "host/NAME", "appliance/NAME", "odd" -> GNU tar's reading of the root filesystem
    _trees: dict[str, dict[str, Entry]] = field(default_factory=dict)
    _times: dict[str, dict[str, Decimal]] = field(default_factory=dict)

    def tree(self, key: str) -> dict[str, Entry]:
        if key not in self._trees:
            self._trees[key] = tree_from_tar(self.tars[key], keep_root=True)
        return self._trees[key]

    def times(self, key: str) -> dict[str, Decimal]:
        if key not in self._times:
            self._times[key] = tar_times(self.tars[key])
        return self._times[key]


@pytest.fixture(scope="module")
def disks(converted_disk: Callable[[str], Path], fixture_image: Callable[[str], FixtureImage],
          built_fixture: Callable[[str], BuiltFixture], docker_world: DockerWorld,
          tmp_path_factory: pytest.TempPathFactory) -> Disks:
    top = tmp_path_factory.mktemp("host-write")
    images = {name: fixture_image(name) for name in NAMES}  # (built and loaded here, in the main thread)
    busybox = built_fixture("busybox")
    odd_layout = top / "odd-layout"
    derived(busybox.oci_dir, odd_layout, [ODD_LAYER], tag="odd")
    derived(busybox.oci_dir, top / "rich-layout", [RICH_LAYER], tag="rich")
    rich_ref = f"oci:{top / 'rich-layout'}:rich"
    env = dict(docker_world.env)  # the whole environment, as the session's conversions have it

    def convert(source: str, disk: Path, extra: dict[str, str]) -> Conversion:
        ran = imgconv("oci-to-qcow2", "--json", source, str(disk), env={**env, **extra}, inherit_env=False)
        return Conversion.of(disk, _events(ran.ok()))

    # The longest first; the session's conversions (when not made yet) run in this thread meanwhile.
    order = sorted(NAMES, key=lambda name: name != "debian")
    with ThreadPoolExecutor(2) as pool:
        pending = {name: pool.submit(convert, source_ref(images[name]), top / f"{name}.qcow2", IN_APPLIANCE)
                   for name in order}
        odd_pending = pool.submit(convert, f"oci:{odd_layout}:odd", top / "odd.qcow2", {})
        rich_pending = {way: pool.submit(convert, rich_ref, top / f"rich-{way}.qcow2", extra)
                        for way, extra in (("host", {}), ("appliance", IN_APPLIANCE))}
        host = {}
        for name in order:
            disk = converted_disk(name)
            host[name] = Conversion.of(disk, session_events(disk))
        appliance = {name: pending[name].result() for name in NAMES}
        odd = odd_pending.result()
        rich = {way: future.result() for way, future in rich_pending.items()}
    host["rich"], appliance["rich"] = rich["host"], rich["appliance"]
    readable = {**{f"host/{n}": c.disk for n, c in host.items()},
                **{f"appliance/{n}": c.disk for n, c in appliance.items()}, "odd": odd.disk}
    tars = tar_out({key.replace("/", "-"): disk for key, disk in readable.items()}, top)
    return Disks(host, appliance, odd, rich, odd_layout, {key: tars[key.replace("/", "-")] for key in readable})


# -- the two ways give the same files -----------------------------------------------------------------------------


def test_the_session_conversions_write_the_files_on_the_host(disks: Disks) -> None:
    """No fixture takes the fallback today (it would cost the appliance's slow tar again, and say so in a note);
    the judge's conversions took the old way (else the comparison below would compare debugfs with itself)."""
    for name in (*NAMES, "rich"):
        host, appliance = disks.host[name], disks.appliance[name]
        assert [n for n in host.notes if n.startswith(FALLBACK)] == [], name
        assert "write-files" in host.steps and "write-rootfs" not in host.steps, (name, host.steps)
        assert "write-rootfs" in appliance.steps and "write-files" not in appliance.steps, (name, appliance.steps)
        assert [n for n in appliance.notes if n.startswith(FALLBACK)] == [], name


# extlinux writes ldlinux.sys in the appliance in both ways, after the image's files, and patches into it the
# sectors the file itself landed on: debugfs and the kernel's ext4 allocate the image's files to other blocks,
# which leaves other blocks free for ldlinux.sys. Its size and every other field are the same.
BOOTLOADER = (".imgconv/boot/ldlinux.sys",)


@pytest.mark.parametrize("name", (*NAMES, "rich"))
def test_the_host_written_disk_holds_what_the_appliance_writes(disks: Disks, name: str) -> None:
    host, appliance = disks.tree(f"host/{name}"), disks.tree(f"appliance/{name}")
    assert diff_trees(host, appliance, hardlinks=True) == [
        f"{path}: sha256 a={host[path].sha256[:12]} b={appliance[path].sha256[:12]}"
        for path in BOOTLOADER]
    host_times, appliance_times = disks.times(f"host/{name}"), disks.times(f"appliance/{name}")
    assert {p: (t, appliance_times.get(p)) for p, t in host_times.items() if appliance_times.get(p) != t} == {}
    assert set(host_times) == set(appliance_times)


# -- and what the image's layers say ------------------------------------------------------------------------------


def _flattened(layout: Path, tag: str) -> tuple[dict[str, Entry], dict[str, Decimal]]:
    """An image without whiteouts, its layers applied in order by Python's tarfile: tree and mtimes."""
    _, manifest, _ = manifest_of(layout, tag)
    tree: dict[str, Entry] = {}
    times: dict[str, Decimal] = {}
    for descriptor in manifest["layers"]:
        data = layer_tar(layout, descriptor)
        entries = tree_from_tar(io.BytesIO(data))
        assert not [p for p in entries if posixpath.basename(p).startswith(".wh.")], "a whiteout: judge otherwise"
        tree.update(entries)
        times.update({p: t for p, t in tar_times(data).items() if p in entries})
    return tree, times


def _judge_by_layers(disks: Disks, key: str, layout: Path, tag: str) -> dict[str, Entry]:
    disk, disk_times = disks.tree(key), disks.times(key)
    image, image_times = _flattened(layout, tag)
    assert diff_trees({p: e for p, e in disk.items() if p}, image, ignore=OURS, hardlinks=True) == []
    assert {p: (disk_times[p], t) for p, t in image_times.items() if disk_times[p] != t} == {}
    assert (disk["lost+found"].type, disk["lost+found"].mode) == ("dir", 0o700)
    assert disk[".imgconv/init"].mode == 0o755 and ".imgconv/origin.json" in disk
    return disk


@pytest.mark.parametrize("name", [n for n in NAMES if n != "debian"])
def test_the_disk_holds_the_layers_files(disks: Disks, built_fixture: Callable[[str], BuiltFixture],
                                         name: str) -> None:
    """Every entry of the image, as its layers give it; a few named ones, in case the layers say nothing."""
    built = built_fixture(name)
    disk = _judge_by_layers(disks, f"host/{name}", built.oci_dir, built.tag)
    times = disks.times(f"host/{name}")
    if name == "distroless":
        assert (disk["home/nonroot"].mode, disk["home/nonroot"].uid, disk["home/nonroot"].gid) == (0o700, 65532, 65532)
        assert disk["app"].type == "file" and disk["app"].mode == 0o755 and disk["app"].size
    else:
        assert (disk["bin/busybox"].mode, disk["bin/sh"].type, disk["bin/sh"].linkname) == (0o755, "symlink", "busybox")
        assert (disk["tmp"].mode, disk["root"].mode) == (0o1777, 0o700)
        assert times["etc/fixture-release"] == EPOCH
    if name == "tricky":
        assert (disk["home/app/.profile"].uid, disk["home/app/.profile"].gid) == (1000, 1000)
    if name == "runtime":
        assert disk["etc/hosts"].mode == 0o600 and disk["etc/hosts"].size == len(b"10.1.2.3\tfrom-the-image\n")


def test_the_debian_disk_holds_its_top_layer_and_not_what_it_whited_out(
        disks: Disks, built_fixture: Callable[[str], BuiltFixture]) -> None:
    """The crafted top layer's every entry (opaque marker, devices, long and non-ASCII names, big ids, an xattr,
    a hard link); what its whiteouts and opaque marker removed is gone; the lower layers' hard links too."""
    built = built_fixture("debian")
    _, manifest, _ = manifest_of(built.oci_dir, built.tag)
    data = layer_tar(built.oci_dir, manifest["layers"][-1])
    entries = {p: e for p, e in tree_from_tar(io.BytesIO(data)).items()
               if not posixpath.basename(p).startswith(".wh.")}
    assert debian.XATTR_PATH in entries and debian.UNICODE_PATH in entries  # it is the crafted layer
    for key in ("host/debian", "appliance/debian"):
        disk, times = disks.tree(key), disks.times(key)
        assert diff_trees({p: disk[p] for p in entries if p in disk}, entries, hardlinks=True) == []
        assert [p for p in entries if p not in disk] == []
        layer_times = tar_times(data)
        assert {p: (times[p], layer_times[p]) for p in entries if times[p] != layer_times[p]} == {}
        gone = [*debian.OPAQUE_HIDDEN, *debian.WHITED_OUT]
        assert [p for p in gone if p in disk] == []
        assert dict(disk[debian.XATTR_PATH].xattrs) == {debian.XATTR[0]: debian.XATTR[1].encode()}
        assert (disk["fixture/owned/big-ids"].uid, disk["fixture/owned/big-ids"].gid) == (3000000, 3000001)
        assert (disk["fixture/devices/null"].type, disk["fixture/devices/null"].devmajor,
                disk["fixture/devices/null"].devminor) == ("char", 1, 3)
        groups = hardlink_groups(disk)
        assert groups["fixture/hardlinks/one"] == ("fixture/hardlinks/one", "fixture/hardlinks/two")
        assert disk["fixture/suid-true"].mode == 0o4755 and disk["fixture/sticky"].mode == 0o1777
        assert disk["home/user/file"].mode == 0o600 and disk["home/user/file"].uid == 1000


def test_the_rich_layer_is_on_the_disk(disks: Disks) -> None:
    """What RICH_LAYER says (so that its comparison above cannot pass on two equally wrong disks)."""
    disk, times = disks.tree("host/rich"), disks.times("host/rich")
    assert "etc/fixture-release" not in disk and "etc/passwd" in disk
    assert (disk["rich"].mode, disk["rich"].uid, disk["rich"].gid) == (0o710, 5, 6)
    assert dict(disk["rich"].xattrs) == {"user.dir": b"on a directory"}
    # (GNU tar writes a "%" of an xattr name as %25)
    assert dict(disk["rich/xattrs"].xattrs) == {"security.capability": CAP.encode("utf-8", "surrogateescape"),
                                                "user.per%25cent": b"p", "user.empty": b"", "trusted.t": b"t"}
    assert dict(disk["rich/acl"].xattrs) == {"system.posix_acl_access": ACL.encode("utf-8", "surrogateescape")}
    assert times["rich/frac"] == Decimal("1600000000.1234567")  # the layer's PAX text, as tar gives it
    assert (times["rich/zero"], times["rich/huge"], times["rich/empty"]) == (0, 3_000_000_000, T + 1)
    assert times["rich/deep"] == times["rich/deep/a/b"] == 0 and disk["rich/deep/a"].mode == 0o755  # implied
    assert (disk["rich/blockdev"].type, disk["rich/blockdev"].devmajor, disk["rich/blockdev"].devminor) == (
        "block", 259, 4464)
    assert disk["rich/fifo"].type == "fifo" and disk["rich/sticky"].mode == 0o1777
    assert (disk["rich/setuid"].mode, disk["rich/setuid"].uid, disk["rich/setuid"].gid) == (0o4755, 3000000, 3000001)
    assert hardlink_groups(disk)["rich/aa-link"] == ("rich/aa-link", "rich/deep/a/b/target")
    assert disk["rich/é ü 日本 \\back"].size == len("unicode and spaces\n") and disk[LONG].size == len("a long name\n")
    assert (disk["rich/empty"].type, disk["rich/empty"].mode, disk["rich/empty"].uid) == ("dir", 0o700, 1)


# -- the filesystems --------------------------------------------------------------------------------------------


def test_host_written_filesystems_are_clean_for_e2fsck(disks: Disks, tmp_path: Path) -> None:
    e2fsck = shutil.which("e2fsck") or "/sbin/e2fsck"
    for name, conversion in disks.host.items():  # (rich included)
        raw = tmp_path / "disk.raw"
        tool("qemu-img", "convert", "-O", "raw", str(conversion.disk), str(raw))
        checked = subprocess.run([e2fsck, "-fn", f"{raw}?offset={ROOT_OFFSET}"], capture_output=True, text=True,
                                 check=False)
        assert checked.returncode == 0, (name, checked.stdout + checked.stderr)
        raw.unlink()


# -- the fallback --------------------------------------------------------------------------------------------------


def test_names_debugfs_cannot_be_given_are_unpacked_in_the_appliance(disks: Disks) -> None:
    """The note says why; the appliance's tar wrote the files; they are there with their exact names, and the
    image's other files as its layers give them."""
    odd = disks.odd
    notes = [n for n in odd.notes if n.startswith(FALLBACK)]
    assert len(notes) == 1 and "cannot be written by debugfs" in notes[0], odd.notes
    assert repr(QUOTED) in notes[0] or repr(NEWLINE) in notes[0], notes[0]
    assert notes[0].endswith("unpacking them in the appliance"), notes[0]
    assert "write-rootfs" in odd.steps and "write-files" not in odd.steps, odd.steps
    disk = _judge_by_layers(disks, "odd", disks.odd_layout, "odd")
    assert (disk[QUOTED].size, disk[QUOTED].mode, disk[QUOTED].uid) == (len("a double quote in the name\n"), 0o640, 7)
    assert disk[NEWLINE].size == len("a newline in the name\n")
    assert hardlink_groups(disk)[QUOTED] == ("odd/a \"quoted\" name", "odd/linked")
    assert disks.times("odd")[NEWLINE] == T + 2
