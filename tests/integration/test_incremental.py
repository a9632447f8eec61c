"""Incremental rebuilds (issue 12 item 6): `oci-to-qcow2 IMAGE store:NAME` builds on the store's version of IMAGE's
older layers, applying only the new layers on the host (no appliance), and gives what a full build gives.

The store (IMGCONV_STORE in a tmp dir) gets the busybox fixture as v1 (a full build), then v2 (busybox plus a layer
with a bit of everything and a layer that also changes Cmd and Env) and v3 (v2 plus a layer of what a rebuild could
get wrong: opaque directories, whiteouts, kinds replaced, a hard-link group broken up, a link shallower than its
target, xattrs, devices, odd times), each rebuilt on the one before. The judges are not imgconv: GNU tar in a
libguestfs appliance reads the rebuilt v3 and a full build of v3 (`--no-incremental`, its files unpacked by GNU
tar in the appliance: IMGCONV_UNPACK_IN_APPLIANCE) and every field is compared,
mtimes to the nanosecond, hard-link groups included, only the bootloader's files aside (they hold the base's
filesystem UUID); e2fsck checks each rebuilt filesystem; skopeo reads `vm-to-oci`'s image; `docker run` of v3 is what
`imgconv boot store:app` must print. An opaque marker at the root is judged against its layer alone. Falling back
to a full build, with the reason in a note, is checked to the end for a layer touching /boot and a hard link into
an older layer and, stopped with SIGINT as the appliance starts, for names, times, xattrs and devices debugfs cannot
be given, kernel and imgconv paths, and other options.

Full conversions cost ~3 s (~25 s in the appliance) and rebuilds ~2 s: the module makes four full builds (three
of them at once), five rebuilds, one boot and one vm-to-oci.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import signal
import subprocess
import tarfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from fixtures import BuiltFixture
from tests.builders.derive import derived
from tests.builders.layers import d, dev, f, fifo, hl, layer, opq, sym, wh
from tests.cli import Ran, assert_one_line_error, imgconv, start
from tests.integration.judge import tar_out as _tar_out
from tests.integration.judge import tar_times as _times
from tests.integration.judge import tool
from tests.treecmp import Entry, diff_trees, hardlink_groups, tree_from_tar
from tests.world import DockerWorld

pytestmark = [pytest.mark.appliance, pytest.mark.boot, pytest.mark.docker]

PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
T = 1_650_000_000
# security.capability of cap_net_bind_service+ep (VFS_CAP_REVISION_2), as a PAX value carries binary bytes.
CAP = bytes.fromhex("0100000200040000000000000000000000000000").decode("utf-8", "surrogateescape")
# system.posix_acl_access of u::rw-,u:1000:r--,g::r--,m::r--,o::--- (the kernel's xattr form, which ext4 stores
# in another)
ACL = bytes.fromhex("02000000" "01000600ffffffff" "02000400e8030000" "04000400ffffffff" "10000400ffffffff"
                    "20000000ffffffff").decode("utf-8", "surrogateescape")
BOOTLOADER = (".imgconv/boot/extlinux.conf", ".imgconv/boot/ldlinux.sys")  # they name the base's filesystem UUID
ROOT_OFFSET = 2048 * 512  # the root partition of a BIOS disk

RUN_SH = """#!/bin/sh
echo "greeting: $GREETING"
cat /app/message /app/config-layer "/spaces/a file with spaces" /aa-link
stat -c '%n %a %u:%g %F' /app /app/message /setuid /data /lnk-to-dir /will-be-dir /will-be-file
readlink /app/latest; readlink /will-be-symlink
ls /opq-dir /opq-dir/sub /data /redo
cat /grp/a /grp/b /grp/c
[ -e /etc/fixture-release ] || echo "fixture-release: whited out"
exit 3
"""

# v2's first layer: a bit of everything, and what v3's layer attacks.
LAYER_A = layer(
    d("app", 0o750, uid=1000, gid=1000, mtime=T),
    f("app/message", "hello from the new layer\n", 0o640, uid=1000, gid=1000, mtime=T),
    hl("app/message.link", "app/message", 0o640, uid=1000, gid=1000),
    sym("app/latest", "message", mtime=T),
    fifo("app/pipe"),
    f("app/run.sh", "echo replaced by the next layer\n", 0o755),
    d("data", 0o755, pax={"SCHILY.xattr.user.old": "dir value"}, mtime=T),
    f("data/keep", "kept\n", pax={"SCHILY.xattr.user.file": "file value"}),
    d("opq-dir", 0o711, uid=7, gid=7),
    f("opq-dir/old", "hidden by v3's opaque marker\n"),
    d("opq-dir/sub", 0o700, uid=5, gid=6, pax={"SCHILY.xattr.user.sub": "sub value"}),
    f("opq-dir/sub/old", "gone\n"),
    d("redo", 0o700, uid=9, gid=9, pax={"SCHILY.xattr.user.redo": "r"}), f("redo/old", "gone\n"),
    d("will-vanish"), d("will-vanish/deeper", 0o700), f("will-vanish/deeper/file", "gone\n"),
    sym("lnk-to-dir", "app"),
    f("will-be-symlink", "a file now\n"),
    f("will-be-dir", "a file now\n"),
    d("will-be-file", 0o700), f("will-be-file/inner", "inside\n"),
    f("grp/a", "group member\n", 0o604, uid=3, gid=4), hl("grp/b", "grp/a", 0o604), hl("grp/c", "grp/a", 0o604),
    wh("var"),  # a directory of the base image (empty)
    wh("nothing-here"),  # a whiteout of nothing
)

# v2's second layer, with a new Cmd and Env: replaces a file of the first, whites out another, links to a third.
LAYER_B = layer(
    f("app/run.sh", RUN_SH, 0o755, mtime=T + 1),
    f("app/config-layer", "from the layer that changed the config\n", mtime=T + 1),
    hl("app/message.again", "app/message", 0o640, uid=1000, gid=1000),
    wh("app/pipe"),
)
CONFIG_B = {"Entrypoint": None, "Cmd": ["/bin/sh", "/app/run.sh"], "Env": [PATH, "GREETING=v2"]}

# v3's layer: what a rebuild could get wrong.
LAYER_C = layer(
    wh("etc/fixture-release"),  # a file of the base image
    opq("opq-dir"), f("opq-dir/sub/new", "under an opaque directory\n"),  # opq-dir/sub: now a directory no layer names
    d("data", 0o775, uid=1, gid=2, mtime=T + 5),  # attributes changed, its xattr gone
    wh("redo"), d("redo", 0o755), f("redo/new", "whited out and made again\n"),
    wh("will-vanish"),  # a directory with contents
    d("lnk-to-dir", 0o755), f("lnk-to-dir/inside", "a directory where a symlink was\n"),
    sym("will-be-symlink", "app/message"),
    d("will-be-dir", 0o750), f("will-be-dir/x", "a directory where a file was\n"),
    f("will-be-file", "a file where a directory was\n"),
    f("grp/b", "one member of a hard-link group overwritten\n"),
    f("setuid", "#!/bin/sh\n", 0o4755), d("sticky", 0o1777),
    f("deep/a/b/c/d/file", "implied parents\n"),
    f("zz/deeper/target", "a hard link shallower than its target\n"), hl("aa-link", "zz/deeper/target"),
    f("spaces/a file with spaces", "spaces\n"), hl("spaces/another name", "spaces/a file with spaces"),
    f("unicode/é ü 日本 \\back", "unicode\n"),
    f("xattrs", "x", pax={"SCHILY.xattr.user.x": "v", "SCHILY.xattr.security.capability": CAP,
                          "SCHILY.xattr.user.per%cent": "p"}),
    f("acl", "x", 0o640, pax={"SCHILY.xattr.system.posix_acl_access": ACL}),
    f("xattr-odd", "x", pax={"SCHILY.xattr.user.empty": "", "SCHILY.xattr.trusted.t": "t"}),
    dev("chardev", tarfile.CHRTYPE, 1, 3), dev("blockdev", tarfile.BLKTYPE, 259, 70_000 - 65_536, mode=0o660),
    fifo("fifo"),
    f("time/frac", "fractional mtime\n", mtime=1_600_000_000.123456789),
    f("time/huge", "after 2038\n", mtime=3_000_000_000),
    f("time/zero", "epoch\n", mtime=0),
    sym("etc/motd", "/app/message"),
)
CONFIG_C = {"Env": [PATH, "GREETING=v3"]}

# On v3: an opaque marker at the root, so the tree is this layer's alone (plus imgconv's files).
LAYER_WIPED = layer(
    opq(""),
    d("app", 0o755, mtime=T + 9),  # a directory of the base, made again
    f("app/message", "all that is left\n", mtime=T + 9),
    d("etc", 0o700, uid=2, gid=3, pax={"SCHILY.xattr.user.kept": "yes"}, mtime=T + 9),
    sym("etc/passwd", "../app/message", mtime=T + 9),
    d("grp", mtime=T + 9), f("grp/c", "no longer linked\n", mtime=T + 9),
)


@dataclass
class Conversion:
    """An `oci-to-qcow2 --json` run: its record (stdout), its notes and its steps' ids (stderr)."""

    ran: Ran
    notes: list[str] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, ran: Ran) -> Conversion:
        events = [json.loads(line) for line in ran.stderr.splitlines() if line.startswith("{")]
        return cls(ran, [e["message"] for e in events if e["event"] == "note"],
                   [e["id"] for e in events if e["event"] == "step"])

    @property
    def sha256(self) -> str:
        return str(self.ran.ok().json["sha256"])

    def note(self, prefix: str) -> str:
        found = [note for note in self.notes if note.startswith(prefix)]
        assert found, (prefix, self.notes)
        return found[0]


@dataclass
class Store:
    root: Path
    layouts: Path

    @property
    def env(self) -> dict[str, str]:
        return {"IMGCONV_STORE": str(self.root)}

    def run(self, *args: str, timeout: float = 600) -> Ran:
        return imgconv(*args, env=self.env, timeout=timeout)

    def convert(self, source: str, dest: str, *flags: str) -> Conversion:
        return Conversion.of(self.run("oci-to-qcow2", "--json", *flags, source, dest, timeout=900))

    def convert_all(self, *runs: tuple[str, str, tuple[str, ...]], in_appliance: str = "") -> list[Conversion]:
        """Conversions (source, dest, flags) run at once: full builds spend most of their time in an appliance.
        The one to *in_appliance* unpacks its files with the appliance's GNU tar, not debugfs (the judge's way)."""
        procs = [start("oci-to-qcow2", "--json", *flags, source, dest,
                       env={**self.env, **({"IMGCONV_UNPACK_IN_APPLIANCE": "1"} if dest == in_appliance else {})})
                 for source, dest, flags in runs]
        done = []
        for proc, (source, dest, flags) in zip(procs, runs, strict=True):
            out, err = proc.communicate(timeout=900)
            done.append(Conversion.of(Ran(("oci-to-qcow2", *flags, source, dest), proc.returncode, out, err)))
        return done

    def derive(self, name: str, base: str, layers: Sequence[bytes], **config: Any) -> str:
        """A layout *name* holding the image of layout *base* (under self.layouts) plus *layers*; its oci: ref."""
        derived(self.layouts / base, self.layouts / name, layers, config=config or None, tag=name)
        return f"oci:{self.layouts / name}:{name}"

    def object(self, sha256: str) -> Path:
        return self.root / "objects" / "sha256" / sha256.removeprefix("sha256:")

    def sidecar(self, sha256: str) -> dict[str, Any]:
        path = self.object(sha256)
        return json.loads(path.with_name(path.name + ".json").read_text())  # type: ignore[no-any-return]

    def tags(self) -> dict[str, str]:
        return {f"{t['name']}:{t['tag']}": t["sha256"] for t in self.run("store", "list", "--json").ok().json}


@dataclass
class Versions:
    store: Store
    refs: dict[str, str]  # oci: references of busybox, v2, v3, wiped
    v1: Conversion
    v2: Conversion
    v3: Conversion
    wiped: Conversion  # v3 plus LAYER_WIPED, rebuilt on v3
    full: Conversion  # v3 with --no-incremental, its files unpacked by the appliance's GNU tar
    kernel: Conversion  # v3 plus a layer writing /boot (and an image's own /lost+found): a full build
    old_link: Conversion  # v3 plus a layer with a hard link to a file of an older layer: a full build
    unlost: Conversion  # the kernel image plus a whiteout of its /lost+found, rebuilt on it
    archived: Conversion  # v3 plus a layer, from a `docker save` archive (no manifest), rebuilt on v3


@pytest.fixture(scope="module")
def versions(built_fixture: Callable[[str], BuiltFixture], tmp_path_factory: pytest.TempPathFactory) -> Versions:
    top = tmp_path_factory.mktemp("incremental")
    store = Store(top / "store", top / "layouts")
    busybox = built_fixture("busybox")
    refs = {"busybox": f"oci:{busybox.oci_dir}:{busybox.tag}"}
    store.layouts.mkdir()
    (store.layouts / "busybox").symlink_to(busybox.oci_dir)
    refs["v2"] = store.derive("v2", "busybox", [LAYER_A, LAYER_B], **CONFIG_B)
    refs["v3"] = store.derive("v3", "v2", [LAYER_C], **CONFIG_C)
    refs["wiped"] = store.derive("wiped", "v3", [LAYER_WIPED])
    refs["kernel"] = store.derive("kernel", "v3", [layer(d("boot"), f("boot/notes", "not a kernel\n"),
                                                         d("lost+found", 0o755, mtime=T), f("lost+found/mine", "x"))])
    refs["unlost"] = store.derive("unlost", "kernel", [layer(wh("lost+found"))])
    store.derive("archived", "v3", [layer(f("archived", "from an archive\n"))])
    refs["archived"] = f"docker-archive:{top / 'archived.tar'}"
    tool("skopeo", "copy", "--quiet", f"oci:{store.layouts / 'archived'}:archived",
         f"{refs['archived']}:imgconv-test/archived:1")
    refs["old-link"] = store.derive("old-link", "v3", [layer(hl("app/message.third", "app/message", 0o640,
                                                                uid=1000, gid=1000))])
    v1 = store.convert(refs["busybox"], "store:app")
    v2 = store.convert(refs["v2"], "store:app")
    v3 = store.convert(refs["v3"], "store:app")
    wiped = store.convert(refs["wiped"], "store:wiped")  # before v3's full build, so that its base is v3
    full, kernel, old_link = store.convert_all((refs["v3"], "store:full", ("--no-incremental",)),
                                               (refs["kernel"], "store:kernel", ()),
                                               (refs["old-link"], "store:old-link", ()),
                                               in_appliance="store:full")
    unlost = store.convert(refs["unlost"], "store:unlost")
    archived = store.convert(refs["archived"], "store:archived")
    return Versions(store, refs, v1, v2, v3, wiped, full, kernel, old_link, unlost, archived)


@dataclass
class Trees:
    tars: dict[str, Path]

    def tree(self, name: str, keep_root: bool = True) -> dict[str, Entry]:
        return tree_from_tar(self.tars[name], keep_root=keep_root)

    def times(self, name: str) -> dict[str, Decimal]:
        return _times(self.tars[name])


@pytest.fixture(scope="module")
def trees(versions: Versions, tmp_path_factory: pytest.TempPathFactory) -> Trees:
    store = versions.store
    disks = {"v3": versions.v3, "full": versions.full, "wiped": versions.wiped, "kernel": versions.kernel,
             "old-link": versions.old_link, "unlost": versions.unlost, "archived": versions.archived}
    return Trees(_tar_out({name: store.object(c.sha256) for name, c in disks.items()},
                          tmp_path_factory.mktemp("trees")))


# -- the rebuilds ------------------------------------------------------------------------------------------------


def test_a_new_image_is_built_on_the_version_of_its_older_layers(versions: Versions) -> None:
    store = versions.store
    for conversion, base, held in ((versions.v2, versions.v1, 1), (versions.v3, versions.v2, 3),
                                   (versions.wiped, versions.v3, 4), (versions.unlost, versions.kernel, 5)):
        note = conversion.note("incremental: building on")
        assert f"incremental: building on {base.sha256} (it holds {held} of the image's" in note
        assert not {"launch-appliance", "read-layers"} & set(conversion.steps) and "apply-layers" in conversion.steps
        assert store.sidecar(conversion.sha256)["built_on"] == base.sha256
    # v1 had nothing to build on; --no-incremental builds in full without looking
    assert "no version in the store was built from the image's older layers" in versions.v1.note("incremental:")
    # (a full build flattens every layer: read-layers, written by debugfs; the judge's, by the appliance's tar)
    assert "read-layers" in versions.v1.steps and "built_on" not in store.sidecar(versions.v1.sha256)
    assert not [n for n in versions.full.notes if n.startswith("incremental")]
    assert "write-rootfs" in versions.full.steps and "built_on" not in store.sidecar(versions.full.sha256)
    history = store.run("store", "history", "--json", "app").ok().json["history"]
    assert [e["sha256"] for e in history] == [versions.v3.sha256, versions.v2.sha256, versions.v1.sha256]
    assert store.tags()["app:latest"] == versions.v3.sha256
    # a version made from the same image by either way is the same image: the records say so
    rebuilt, full = store.sidecar(versions.v3.sha256), store.sidecar(versions.full.sha256)
    for key in ("config_digest", "options", "kernel", "run", "layers", "virtual_size"):
        assert rebuilt.get(key) == full.get(key), key
    verified = store.run("verify", "store:app").ok()
    assert verified.stdout.startswith(f"store:app: OK ({versions.v3.sha256}")
    # the statement names the version it was built on; a full rebuild would not give these bytes: refused
    statement = json.loads(store.run("provenance", "store:app").ok().stdout)
    definition = statement["predicate"]["buildDefinition"]
    assert definition["externalParameters"]["built_on"] == versions.v2.sha256
    assert {"name": "base-version", "digest": {"sha256": versions.v2.sha256.removeprefix("sha256:")}} in \
        definition["resolvedDependencies"]
    assert_one_line_error(store.run("verify", "--rebuild", "store:app"), "rebuilt incrementally", code=2)


def test_the_rebuilt_disk_holds_what_a_full_build_holds(trees: Trees) -> None:
    """Every path, kind, mode, owner, size, content, link target, device number, xattr and hard-link group, and
    every mtime to the nanosecond; only the bootloader's files differ."""
    rebuilt, full = trees.tree("v3"), trees.tree("full")
    assert diff_trees(rebuilt, full, hardlinks=True) == [f"{path}: sha256 a={rebuilt[path].sha256[:12]} "
                                                         f"b={full[path].sha256[:12]}" for path in BOOTLOADER]
    rebuilt_times, full_times = trees.times("v3"), trees.times("full")
    assert {p: t for p, t in rebuilt_times.items() if full_times.get(p) != t} == {}
    assert set(rebuilt_times) == set(full_times)
    # what v3's layer did is there (the comparison would pass on two equally wrong disks otherwise)
    assert "etc/fixture-release" not in rebuilt and "will-vanish" not in rebuilt and "var" not in rebuilt
    assert sorted(p for p in rebuilt if p.startswith("opq-dir")) == ["opq-dir", "opq-dir/sub", "opq-dir/sub/new"]
    assert (rebuilt["opq-dir/sub"].mode, rebuilt["opq-dir/sub"].uid, rebuilt["opq-dir/sub"].xattrs) == (0o755, 0, ())
    assert (rebuilt["data"].mode, rebuilt["data"].uid, rebuilt["data"].gid, rebuilt["data"].xattrs) == (0o775, 1, 2, ())
    assert rebuilt["redo"].mode == 0o755 and rebuilt["redo"].xattrs == () and "redo/old" not in rebuilt
    assert rebuilt["lnk-to-dir"].type == "dir" and rebuilt["will-be-symlink"].type == "symlink"
    assert rebuilt["will-be-dir"].type == "dir" and rebuilt["will-be-file"].type == "file"
    groups = hardlink_groups(rebuilt)
    assert groups["grp/a"] == ("grp/a", "grp/c") and "grp/b" not in groups
    assert groups["aa-link"] == ("aa-link", "zz/deeper/target")
    assert groups["app/message"] == ("app/message", "app/message.again", "app/message.link")
    assert rebuilt["setuid"].mode == 0o4755 and rebuilt["sticky"].mode == 0o1777
    assert (rebuilt["blockdev"].type, rebuilt["blockdev"].devmajor, rebuilt["blockdev"].devminor) == (
        "block", 259, 70_000 - 65_536)
    # (GNU tar writes a "%" of an xattr name as %25)
    assert dict(rebuilt["xattrs"].xattrs) == {"user.x": b"v", "user.per%25cent": b"p",
                                              "security.capability": CAP.encode("utf-8", "surrogateescape")}
    assert dict(rebuilt["acl"].xattrs) == {"system.posix_acl_access": ACL.encode("utf-8", "surrogateescape")}
    assert dict(rebuilt["xattr-odd"].xattrs) == {"user.empty": b"", "trusted.t": b"t"}
    assert rebuilt_times["time/frac"] == Decimal("1600000000.1234567")  # the layer's PAX text, as tar gives it
    assert rebuilt_times["time/huge"] == 3_000_000_000 and rebuilt_times["time/zero"] == 0


def test_an_opaque_marker_at_the_root_leaves_only_the_new_layer(trees: Trees) -> None:
    """Judged against the layer itself: nothing of the base image or of v2 and v3's layers is left, the base's
    directories made again have the new headers (xattrs, owners, times), and imgconv's files stay."""
    expected = {path: e for path, e in tree_from_tar(io.BytesIO(LAYER_WIPED)).items() if path != ".wh..wh..opq"}
    wiped = trees.tree("wiped", keep_root=False)
    ours = [".imgconv", "lost+found"]
    assert diff_trees(wiped, expected, ignore=ours) == []
    assert ".imgconv/origin.json" in wiped and ".imgconv/init" in wiped
    times, layer_times = trees.times("wiped"), _times(LAYER_WIPED)
    assert {p: times[p] for p in expected} == {p: layer_times[p] for p in expected}


def test_an_images_own_lost_found_whited_out_is_made_as_a_full_build_makes_it(trees: Trees) -> None:
    """A full build of an image without /lost+found has mke2fs's; the rebuild's base had the image's own there."""
    unlost, kernel, full = trees.tree("unlost"), trees.tree("kernel"), trees.tree("full")
    assert diff_trees(unlost, kernel, ignore=[".imgconv"]) == ["lost+found: mode a=0700 b=0755",
                                                               "only in b: lost+found/mine"]
    assert unlost["lost+found"] == full["lost+found"]
    assert trees.times("unlost")["lost+found"] == trees.times("full")["lost+found"]


def test_a_rebuild_from_a_docker_save_archive_keeps_no_manifest_of_its_base(versions: Versions,
                                                                          trees: Trees) -> None:
    """Such an archive has no manifest to keep (a full build writes none under /.imgconv); the base's is gone."""
    assert "launch-appliance" not in versions.archived.steps
    archived, v3 = trees.tree("archived"), trees.tree("v3")
    assert ".imgconv/manifest.json" in v3 and ".imgconv/manifest.json" not in archived
    assert diff_trees(archived, v3, ignore=[".imgconv"]) == ["only in a: archived"]
    config = tool("skopeo", "inspect", "--raw", "--config", versions.refs["archived"])
    assert archived[".imgconv/config.json"].sha256 == hashlib.sha256(config.encode()).hexdigest()


def test_rebuilt_filesystems_are_clean_for_e2fsck(versions: Versions, tmp_path: Path) -> None:
    for conversion in (versions.v2, versions.v3, versions.wiped, versions.unlost, versions.archived):
        raw = tmp_path / "disk.raw"
        tool("qemu-img", "convert", "-O", "raw", str(versions.store.object(conversion.sha256)), str(raw))
        checked = subprocess.run([shutil.which("e2fsck") or "/sbin/e2fsck", "-fn", f"{raw}?offset={ROOT_OFFSET}"],
                                 capture_output=True, text=True, check=False)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        raw.unlink()


def test_vm_to_oci_of_the_rebuilt_version_gives_back_the_image(versions: Versions, tmp_path: Path) -> None:
    """The image ID (config digest) and diff_ids of v3, judged by skopeo on both sides."""
    layout = tmp_path / "out"
    ran = versions.store.run("vm-to-oci", "--json", "store:app", f"oci:{layout}:back").ok()
    assert ran.json["original_layers"] is True

    def identity(ref: str) -> tuple[str, list[str]]:
        manifest = json.loads(tool("skopeo", "inspect", "--raw", ref))
        config = json.loads(tool("skopeo", "inspect", "--raw", "--config", ref))
        return manifest["config"]["digest"], config["rootfs"]["diff_ids"]

    assert identity(f"oci:{layout}:back") == identity(versions.refs["v3"])


def test_booting_the_rebuilt_version_runs_the_new_command_as_docker_run(versions: Versions,
                                                                        docker_world: DockerWorld) -> None:
    """The script prints the new layers' files, modes and owners, and exits 3. (It leaves out directories no
    layer names, such as /opq-dir/sub: the test world's dockerd makes those 0600, imgconv 0755 as GNU tar does.)"""
    tag = "imgconv-test/incremental:3"
    tool("skopeo", "copy", "--quiet", "--dest-daemon-host", docker_world.host, versions.refs["v3"],
         f"docker-daemon:{tag}")
    docker = docker_world.run(tag)
    booted = versions.store.run("boot", "--timeout", "240", "--network", "none", "store:app", timeout=300)
    assert booted.stdout.splitlines() == docker.out.splitlines(), booted.stderr[-3000:]
    assert booted.code == docker.exit_code == 3, booted.stderr[-3000:]
    lines = booted.stdout.splitlines()
    assert lines[:5] == ["greeting: v3", "hello from the new layer", "from the layer that changed the config",
                         "spaces", "a hard link shallower than its target"]
    assert "/data 775 1:2 directory" in lines and lines[-1] == "fixture-release: whited out"


# -- falling back to a full build --------------------------------------------------------------------------------


def test_layers_a_rebuild_does_not_apply_are_built_in_full(versions: Versions, trees: Trees) -> None:
    store = versions.store
    cases = ((versions.kernel, "a new layer changes /boot, where the kernel or its modules may live"),
             (versions.old_link, "a new layer refers to an older layer's file"))
    for conversion, why in cases:
        note = conversion.note("incremental: not possible")
        assert why in note and note.endswith("; building in full"), note
        assert "read-layers" in conversion.steps  # the full build, after the rebuild gave up
        assert "built_on" not in store.sidecar(conversion.sha256)
    kernel = trees.tree("kernel")
    assert kernel["boot/notes"].type == "file" and "time/frac" in kernel
    assert hardlink_groups(trees.tree("old-link"))["app/message.third"] == (
        "app/message", "app/message.again", "app/message.link", "app/message.third")


def _until_full_build(store: Store, source: str, dest: str, *flags: str) -> Conversion:
    """A conversion stopped with SIGINT (Ctrl-C) as soon as its full build starts (flattening every layer on the
    host, or starting the appliance where debugfs cannot write)."""
    proc = start("oci-to-qcow2", "--json", *flags, source, dest, env=store.env)
    assert proc.stderr is not None
    lines: list[bytes] = []
    for line in proc.stderr:
        lines.append(line)
        if b'"id": "launch-appliance"' in line or b'"id": "read-layers"' in line:
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    stderr = b"".join(lines) + err
    return Conversion.of(Ran(("oci-to-qcow2", source, dest), proc.returncode, out, stderr))


BAD = {
    "quote": (layer(f('a "quoted" name', "x")), "cannot be written by debugfs"),
    "newline": (layer(f("new\nline", "x")), "cannot be written by debugfs"),
    "latin-1": (layer(f("caf\udce9", "x")), "cannot be written by debugfs"),
    "quoted-symlink": (layer(sym("link", 'to "there"')), "the symlink /link points to a name debugfs cannot"),
    "xattr-space": (layer(f("x", "x", pax={"SCHILY.xattr.user.with space": "v"})),
                    "the xattr name 'user.with space' cannot be given to debugfs"),
    "negative-time": (layer(f("old", "x", mtime=-1)), "is outside what this rebuild sets"),
    "time-past-2106": (layer(f("late", "x", mtime=1 << 32)), "is outside what this rebuild sets"),
    "device-minor": (layer(dev("wide", tarfile.CHRTYPE, 1, 70_000)), "the device /wide is 1:70000"),
    "lost+found": (layer(f("lost+found/x", "x")), "where imgconv placed files of its own"),
    "modules": (layer(f("lib/modules/extra/readme", "x")), "a new layer changes /lib/modules/extra/readme"),
}


def test_what_debugfs_cannot_be_given_and_other_options_are_built_in_full(versions: Versions) -> None:
    """Each case on v3 (and v3 itself with another --hostname), stopped once the full build starts: the note says
    why, and the store is left as it was."""
    store = versions.store
    before = store.tags()
    runs = [(store.derive(f"bad{i}", "v3", [tar]), ()) for i, (tar, _) in enumerate(BAD.values())]
    runs.append((versions.refs["v3"], ("--hostname", "other")))
    with ThreadPoolExecutor(4) as pool:
        stopped = list(pool.map(lambda i: _until_full_build(store, runs[i][0], f"store:bad{i}", *runs[i][1]),
                                range(len(runs))))
    cases = {**BAD, "options": (b"", "the versions built from the image's older layers were made with other options")}
    ran = dict(zip(cases, stopped, strict=True))
    wrong = {}
    for name, (_, why) in cases.items():
        conversion = ran[name]
        notes = [note for note in conversion.notes if note.startswith("incremental: not possible")]
        if len(notes) != 1 or why not in notes[0] or not {"launch-appliance", "read-layers"} & set(conversion.steps) \
                or conversion.ran.code != 130:
            wrong[name] = conversion.ran.stderr[-2000:]
    assert wrong == {}
    assert store.tags() == before
    assert list((store.root / "tmp").iterdir()) == []
