"""`imgconv vm-to-oci` on disks imgconv never saw: built with libguestfs (tests/integration/foreign.py).

Each disk is converted to every destination transport, and each result is judged by others: `umoci unpack`
gives the file tree (owners, modes, setuid bits, xattrs, hard links) that must equal what guestfs reads on the
disk, `skopeo inspect` must accept it in its own transport, and the test world's dockerd must run it and
print what the disk holds. Some conversions read the disk rewritten by qemu-img as raw, vmdk, vhdx, vpc or vdi,
so every input format is exercised without an appliance launch of its own. Then: the registry round trip,
reproducible digests, zstd, an interruption, and disks that must be refused with one line and no output.

The conversions the selected tests need are started at once by the `exports` fixture and run two at a time
(see `Jobs`); the slowest first.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from fixtures import cache_root
from tests.cli import Ran, assert_one_line_error, imgconv, start
from tests.integration.foreign import (
    CAP_NET_RAW,
    KERNEL,
    LEGACY_DIR,
    LEGACY_NAME,
    ForeignDisk,
    expected_export,
    foreign_disks,
)
from tests.integration.judge import (
    Jobs,
    layer_tar,
    listing,
    manifest_of,
    selected,
    sha256_file,
    skopeo_inspect,
    tar_names,
    tool,
    umoci_tree,
)
from tests.treecmp import Entry, diff_trees, docker_runtime_paths, tree_from_tar
from tests.world import DockerWorld, Registry

pytestmark = [pytest.mark.appliance, pytest.mark.docker, pytest.mark.registry]

EPOCH = 1700000000  # 2023-11-14T22:13:20Z
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LABEL = "io.imgconv.source"


@dataclass(frozen=True)
class Conversion:
    key: str
    disk: str  # foreign disk name
    transport: str  # oci | archive | daemon | registry
    args: tuple[str, ...] = ()  # config flags
    epoch: int | None = None
    keep_boot: bool = False
    compression: str = "gzip"
    fmt: str = "qcow2"  # the disk is first rewritten by qemu-img in this format




CONVERSIONS = {c.key: c for c in (
    # the layered disk first: it takes longest
    Conversion("layered-oci", "layered", "oci"),
    Conversion("layered-archive", "layered", "archive", keep_boot=True, fmt="vmdk"),
    Conversion("layered-daemon", "layered", "daemon", args=(
        "--entrypoint", '["/bin/cat"]', "--cmd", '["/home/alice/notes.txt", "/etc/debian_version"]',
        "--user", "1000:1000"), fmt="raw"),
    Conversion("plain-oci", "plain", "oci", epoch=EPOCH),
    Conversion("plain-registry", "plain", "registry", epoch=EPOCH),
    Conversion("plain-archive", "plain", "archive", epoch=EPOCH),
    Conversion("plain-daemon", "plain", "daemon", args=(
        "--cmd", '["/bin/cat","/etc/os-release"]', "--env", "GREETING=hello there", "--workdir", "/srv",
        "--user", "65534:65534", "--label", "team=qa", "--label", "note=a \"quoted\" value", "--expose", "8080"),
        fmt="vhdx"),
    Conversion("plain-zstd", "plain", "oci", epoch=EPOCH, compression="zstd", fmt="vpc"),
)}
TRANSPORT_KEYS = [k for k, c in CONVERSIONS.items() if c.compression == "gzip"]


class Exports:
    """The conversions (run in the background) and, made on demand and kept, their other forms."""

    def __init__(self, disks: dict[str, ForeignDisk], docker: DockerWorld, registry: Registry, root: Path) -> None:
        self.disks, self.docker, self.registry, self.root = disks, docker, registry, root
        self.jobs = Jobs()
        self._layouts: dict[str, Path] = {}
        self._images: dict[str, str] = {}
        self._trees: dict[str, dict[str, Entry]] = {}

    # -- where each conversion goes
    def dest(self, c: Conversion) -> str:
        return {
            "oci": f"oci:{self.root / c.key}:v1",
            "archive": f"docker-archive:{self.root / (c.key + '.tar')}:imgconv-test/{c.key}:v1",
            "daemon": f"docker-daemon:imgconv-test/{c.key}:v1",
            "registry": self.registry.ref(f"foreign/{c.key}", "v1"),
        }[c.transport]

    def source(self, key: str) -> Path:
        """The disk file a conversion reads: the qcow2 foreign.py built, or its copy in another format."""
        c = CONVERSIONS[key]
        return self.disks[c.disk].path if c.fmt == "qcow2" else self.root / f"{c.key}.{c.fmt}"

    def disk_sha(self, key: str) -> str:
        c = CONVERSIONS[key]
        return self.disks[c.disk].sha256 if c.fmt == "qcow2" else sha256_file(self.source(key))

    def define(self, c: Conversion) -> None:
        argv = ["vm-to-oci", str(self.source(c.key)), self.dest(c), "--json", "--no-tls-verify",
                "--compression", c.compression, *c.args]
        if c.keep_boot:
            argv.append("--keep-boot")
        self.jobs.define(c.key, _reformat_then, self.disks[c.disk].path, self.source(c.key), c.fmt, imgconv, *argv,
                         env=self.docker.env, epoch=c.epoch)

    def ran(self, key: str) -> Ran:
        return self.jobs[key]  # type: ignore[no-any-return]

    def result(self, key: str) -> dict[str, Any]:
        return self.ran(key).ok().json  # type: ignore[no-any-return]

    # -- the same image as an OCI layout (tag v1), copied by skopeo where imgconv wrote something else
    def layout(self, key: str) -> Path:
        c = CONVERSIONS[key]
        self.result(key)
        if key not in self._layouts:
            if c.transport == "oci":
                self._layouts[key] = self.root / key
            else:
                copy = self.root / f"{key}-as-oci"
                src = {"archive": (f"docker-archive:{self.root / (key + '.tar')}",),
                       "daemon": ("--src-daemon-host", self.docker.host, f"docker-daemon:imgconv-test/{key}:v1"),
                       "registry": ("--src-tls-verify=false", self.dest(c))}[c.transport]
                tool("skopeo", "copy", "--quiet", *src, f"oci:{copy}:v1")
                self._layouts[key] = copy
        return self._layouts[key]

    # -- the same image in the test world's dockerd
    def image(self, key: str) -> str:
        c = CONVERSIONS[key]
        self.result(key)
        if key not in self._images:
            name = f"imgconv-test/{key}:v1"
            if c.transport == "archive":
                assert self.docker.load(self.root / f"{key}.tar") == name
            elif c.transport in ("oci", "registry"):
                src = (f"oci:{self.root / key}:v1",) if c.transport == "oci" else ("--src-tls-verify=false",
                                                                                    self.dest(c))
                tool("skopeo", "copy", "--quiet", "--dest-daemon-host", self.docker.host, *src,
                     f"docker-daemon:{name}")
            self._images[key] = name
        return self._images[key]

    def tree(self, key: str) -> dict[str, Entry]:
        if key not in self._trees:
            self._trees[key] = umoci_tree(self.layout(key), "v1", self.root)
        return self._trees[key]

    def config(self, key: str) -> dict[str, Any]:
        return manifest_of(self.layout(key), "v1")[2]

    def expected(self, key: str) -> dict[str, Entry]:
        c = CONVERSIONS[key]
        return expected_export(self.disks[c.disk], keep_boot=c.keep_boot)


@pytest.fixture(scope="module")
def disks() -> dict[str, ForeignDisk]:
    return foreign_disks(cache_root())


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bad-disks")


def _reformat_then(qcow2: Path, disk: Path, fmt: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """qemu-img rewrites the qcow2 in `fmt` (unless it is qcow2), then `fn` runs: one job, so that the other disk
    formats cost no appliance launch of their own."""
    if fmt != "qcow2":
        tool("qemu-img", "convert", "-f", "qcow2", "-O", fmt, str(qcow2), str(disk))
    return fn(*args, **kwargs)


# Which jobs each test reads (the rest are started on demand): saves work when only some tests are selected.
NEEDS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "test_umoci_unpacks_what_the_disk_holds": lambda p: [p["key"]],
    "test_skopeo_inspects_it_where_it_was_written": lambda p: [p["key"]],
    "test_config_labels_and_flags": lambda p: [p["key"]],
    "test_docker_runs_it_and_sees_the_disk": lambda p: [p["key"]],
    "test_plain_disk_details": lambda p: ["plain-oci"],
    "test_layered_disk_mounts_boot_lvm_and_xfs_home": lambda p: ["layered-oci", "layered-archive"],
    "test_registry_push_and_pull_keep_the_digest": lambda p: ["plain-registry"],
    "test_source_date_epoch_gives_identical_digests": lambda p: ["plain-oci", "plain-registry", "plain-archive"],
    "test_zstd_layers": lambda p: ["plain-zstd", "plain-oci"],
    "test_disk_formats": lambda p: [p["key"]],
    "test_broken_imgconv_origin_record": lambda p: ["fakeimgconv"],
    "test_disk_without_an_operating_system": lambda p: ["noos"],
    "test_two_operating_systems_are_listed": lambda p: ["twoos"],
    "test_root_chooses_one_of_them": lambda p: ["twoos-root"],
}


@pytest.fixture(scope="module")
def exports(request: pytest.FixtureRequest, disks: dict[str, ForeignDisk], docker_world: DockerWorld,
            registry: Registry, bad_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exports]:
    ex = Exports(disks, docker_world, registry, tmp_path_factory.mktemp("vm-to-oci"))
    try:
        for conversion in CONVERSIONS.values():
            ex.define(conversion)
        # the disks that must fail inside the appliance, and the one that works with --root
        for name in ("noos", "twoos", "fakeimgconv"):
            (bad_dir / name).mkdir()
        twoos = str(disks["twoos"].path)
        ex.jobs.define("noos", imgconv, "vm-to-oci", str(disks["noos"].path), f"oci:{bad_dir / 'noos' / 'out'}")
        ex.jobs.define("twoos", imgconv, "vm-to-oci", twoos, f"docker-archive:{bad_dir / 'twoos' / 'out.tar'}")
        ex.jobs.define("fakeimgconv", imgconv, "vm-to-oci", str(disks["fakeimgconv"].path),
                       f"oci:{bad_dir / 'fakeimgconv' / 'out'}")
        twoos_vdi = ex.root / "twoos.vdi"
        ex.jobs.define("twoos-root", _reformat_then, disks["twoos"].path, twoos_vdi, "vdi", imgconv, "vm-to-oci",
                       str(twoos_vdi), f"oci:{ex.root / 'twoos-root'}:v1", "--root", "/dev/sda2", "--json")
        needed = {key for name, params in selected(request) if name in NEEDS for key in NEEDS[name](params)}
        order = [*CONVERSIONS, "twoos", "noos", "fakeimgconv", "twoos-root"]  # the slowest first
        ex.jobs.start(*(key for key in order if key in needed))
        yield ex
    finally:
        ex.jobs.close()


# -- the file tree ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", TRANSPORT_KEYS)
def test_umoci_unpacks_what_the_disk_holds(key: str, exports: Exports) -> None:
    """Path by path: type, mode (setuid/setgid/sticky), owner, size, content, link target, xattrs, hard links."""
    assert diff_trees(exports.expected(key), exports.tree(key), hardlinks=True) == []


def test_plain_disk_details(exports: Exports, disks: dict[str, ForeignDisk]) -> None:
    """The same equality, spelled out for what the issue names (a failure here reads better)."""
    tree = exports.tree("plain-oci")
    assert tree["usr/bin/suid-busybox"].mode == 0o4755
    assert (tree["usr/bin/setgid-tool"].mode, tree["usr/bin/setgid-tool"].gid) == (0o2755, 50)
    assert tree["srv/sticky"].mode == 0o1777 and tree["srv/setgid-dir"].mode == 0o2775
    assert (tree["srv/owned"].uid, tree["srv/owned"].gid, tree["srv/owned"].mode) == (1234, 5678, 0o750)
    assert (tree["srv/owned/big-ids"].uid, tree["srv/owned/big-ids"].gid) == (3000000, 3000001)
    assert dict(tree["srv/xattr-file"].xattrs) == {"user.imgconv.comment": b"on the disk",
                                                   "user.imgconv.unicode": "ünïcødé value".encode()}
    assert dict(tree["srv/xattr-dir"].xattrs) == {"user.imgconv.dir": b"a directory's xattr"}
    assert {tree[p].hardlink or p for p in ("srv/hard-a", "srv/hard-b", "srv/sub/hard-c")} == {"srv/hard-a"}
    assert tree["srv/sym-abs"].linkname == "/etc/os-release" and tree["srv/sym-dangling"].type == "symlink"
    assert tree["srv/fifo"].type == "fifo" and (tree["srv/zero-device"].devmajor, tree["srv/zero-device"].devminor) \
        == (1, 5)
    assert tree["srv/big.bin"].size == disks["plain"].truth["srv/big.bin"].size > 3 << 20
    assert dict(tree["usr/bin/ping"].xattrs) == {"security.capability": CAP_NET_RAW}  # file capabilities
    assert "system.posix_acl_access" in dict(tree["srv/acl-file"].xattrs)
    assert tree[f"{LEGACY_DIR}/{LEGACY_NAME.decode('utf-8', 'surrogateescape')}"].uid == 1000  # not UTF-8
    # runtime directories and /boot and the modules: kept as directories, emptied
    for emptied in ("tmp", "proc", "run", "sys", "dev", "boot", "lib/modules"):
        assert tree[emptied].type == "dir", emptied
        assert not [p for p in tree if p.startswith(emptied + "/")], emptied
    assert tree["tmp"].mode == 0o1777 and tree["var/tmp/kept"].type == "file"
    assert "lost+found" not in tree and "lost+found" in disks["plain"].truth


def test_layered_disk_mounts_boot_lvm_and_xfs_home(exports: Exports, disks: dict[str, ForeignDisk]) -> None:
    """fstab by UUID= and LABEL=: the LVM root, /home from the xfs partition (its root's mode, not the
    mountpoint's), /boot from its own partition left out; what the mounts hide on the root is never exported."""
    disk = disks["layered"]
    tree = exports.tree("layered-oci")
    assert f"UUID={disk.notes['home_uuid']}" in disk.file_text("etc/fstab") and "LABEL=BOOT" in \
        disk.file_text("etc/fstab")
    assert tree["home"].mode == 0o755  # the xfs root; the root filesystem's mountpoint is 0700
    assert (tree["home/alice"].uid, tree["home/alice"].mode) == (1000, 0o700)
    assert dict(tree["home/alice/notes.txt"].xattrs) == {"user.imgconv.note": b"xattr on xfs"}
    assert tree["home/bob/script.sh"].mode == 0o4750 and tree["home/shared"].mode == 0o2770
    assert tree["usr/bin/su"].mode == 0o4755 and tree["bin"].linkname == "usr/bin"
    assert dict(tree["var/lib/app/state.json"].xattrs) == {"user.imgconv.origin": b"root LV"}
    for hidden in disk.notes["hidden"]:
        assert hidden not in tree, hidden
    assert tree["boot"].type == "dir" and not [p for p in tree if p.startswith(("boot/", "usr/lib/modules/"))]
    kept = exports.tree("layered-archive")  # --keep-boot
    assert kept[f"boot/vmlinuz-{KERNEL}"].sha256 == disk.truth[f"boot/vmlinuz-{KERNEL}"].sha256
    assert kept["boot/grub/grub.cfg"].mode == 0o600
    assert kept[f"usr/lib/modules/{KERNEL}/modules.dep"].type == "file"
    assert "boot/lost+found" not in kept and "boot/HIDDEN-under-boot-mount" not in kept


# -- skopeo and the config ------------------------------------------------------------------------------------


def _skopeo_ref(exports: Exports, key: str) -> tuple[str, ...]:
    c = CONVERSIONS[key]
    dest = exports.dest(c)
    if c.transport == "archive":
        return (dest.rsplit(":", 2)[0],)
    if c.transport == "daemon":
        return ("--daemon-host", exports.docker.host, dest)
    if c.transport == "registry":
        return ("--tls-verify=false", dest)
    return (dest,)


@pytest.mark.parametrize("key", TRANSPORT_KEYS)
def test_skopeo_inspects_it_where_it_was_written(key: str, exports: Exports) -> None:
    result = exports.result(key)
    *flags, ref = _skopeo_ref(exports, key)
    seen = skopeo_inspect(ref, *flags)
    assert (seen["Os"], seen["Architecture"]) == ("linux", "amd64")
    assert len(seen["Layers"]) == 1
    assert seen["Labels"][f"{LABEL}.disk.sha256"] == exports.disk_sha(key)
    if CONVERSIONS[key].transport in ("oci", "registry"):
        assert seen["Digest"] == result["manifest_digest"]
        assert seen["Layers"] == [result["new_layer"]["digest"]]


@pytest.mark.parametrize("key", TRANSPORT_KEYS)
def test_config_labels_and_flags(key: str, exports: Exports) -> None:
    c = CONVERSIONS[key]
    disk = exports.disks[c.disk]
    result = exports.result(key)
    config = exports.config(key)
    assert (config["os"], config["architecture"]) == ("linux", "amd64")
    assert config["rootfs"] == {"type": "layers", "diff_ids": [result["new_layer"]["diff_id"]]}
    sha = exports.disk_sha(key)
    assert result["source"]["sha256"] == sha and result["source"]["made_by_imgconv"] is False
    assert result["source"]["os"] == {"distro": disk.os.distro, "version": disk.os.version,
                                      "product": disk.os.product, "root": disk.os.root}
    cfg = config["config"]
    labels = {f"{LABEL}.disk.sha256": sha, f"{LABEL}.os.distro": disk.os.distro,
              f"{LABEL}.os.version": disk.os.version, f"{LABEL}.os.product": disk.os.product}
    if c.epoch is not None:
        assert config["created"] == datetime.fromtimestamp(c.epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        assert config["history"][-1]["created"] == config["created"]
    assert sha in config["history"][-1]["comment"]
    if key == "plain-daemon":
        assert cfg["Cmd"] == ["/bin/cat", "/etc/os-release"] and not cfg.get("Entrypoint")
        assert cfg["Env"] == [DEFAULT_PATH, "GREETING=hello there"]
        assert (cfg["WorkingDir"], cfg["User"]) == ("/srv", "65534:65534")
        assert cfg["ExposedPorts"] == {"8080/tcp": {}}
        assert cfg["Labels"] == {**labels, "team": "qa", "note": 'a "quoted" value'}
    elif key == "layered-daemon":
        assert (cfg["Entrypoint"], cfg["Cmd"]) == (["/bin/cat"], ["/home/alice/notes.txt", "/etc/debian_version"])
        assert cfg["User"] == "1000:1000" and cfg["Labels"] == labels
    else:
        assert cfg == {"Env": [DEFAULT_PATH], "Cmd": ["/bin/sh"], "Labels": labels}


# -- docker ------------------------------------------------------------------------------------------------------

STAT_PATHS = {
    "plain": ("usr/bin/suid-busybox", "usr/bin/setgid-tool", "srv/owned", "srv/owned/nobody", "srv/owned/big-ids",
              "srv/setgid-dir", "srv/sticky", "srv/hard-b", "srv/sym-rel", "srv/fifo", "srv/zero-device",
              "home/alice", "etc/shadow", "srv/xattr-file"),
    "layered": ("usr/bin/su", "usr/bin/wall", "var/lib/app", "var/lib/app/state.json", "var/lib/app/control",
                "home", "home/alice", "home/alice/notes.txt", "home/bob/script.sh", "home/shared", "etc/hard-two"),
}
KINDS = {"file": "regular file", "dir": "directory", "symlink": "symbolic link", "fifo": "fifo",
         "char": "character special file"}


@pytest.mark.parametrize("key", TRANSPORT_KEYS)
def test_docker_runs_it_and_sees_the_disk(key: str, exports: Exports) -> None:
    c = CONVERSIONS[key]
    disk = exports.disks[c.disk]
    image = exports.image(key)
    assert exports.docker.image_id(image) == exports.result(key)["image_id"]  # Docker kept our config bytes
    run = exports.docker.run
    if key == "plain-daemon":
        shown = run(image)
        assert (shown.out, shown.err, shown.exit_code) == (disk.file_text("etc/os-release"), "", 0)
        env = run(image, entrypoint=["/bin/sh", "-c", 'pwd; echo "$GREETING"; id -u; id -g'])
        assert env.out == "/srv\nhello there\n65534\n65534\n"
    elif key == "layered-daemon":
        shown = run(image)
        assert (shown.out, shown.exit_code) == (disk.file_text("home/alice/notes.txt") + "12.4\n", 0), shown.err
    else:
        shown = run(image, ["/bin/cat", "/etc/os-release"])
        assert (shown.out, shown.exit_code) == (disk.file_text("etc/os-release"), 0), shown.err
    paths = STAT_PATHS[c.disk]
    script = "for p in \"$@\"; do stat -c '%a %u %g %F %n' \"/$p\"; done; ls -A /tmp /run /boot"
    seen = run(image, ["-c", script, "sh", *paths], entrypoint="/bin/sh", user="0:0")
    truth = disk.truth
    listed = "\n".join(sorted(p.removeprefix("boot/") for p in truth if p.startswith("boot/") and "/" not in
                              p.removeprefix("boot/") and p != "boot/lost+found")) if c.keep_boot else ""
    expected = "".join(f"{truth[p].mode:o} {truth[p].uid} {truth[p].gid} {KINDS[truth[p].type]} /{p}\n"
                       for p in paths)
    assert seen.exit_code == 0, seen.err
    assert seen.out == expected + f"/boot:\n{listed + chr(10) if listed else ''}\n/run:\n\n/tmp:\n", seen.out
    # and the container's whole filesystem, as `docker export` writes it (Docker keeps file capabilities, and
    # no other xattr)
    exported = tree_from_tar(exports.docker.export(image))
    assert diff_trees(exports.expected(key), exported, ignore=docker_runtime_paths, ignore_fields=("xattrs",),
                      hardlinks=True) == []
    if c.disk == "plain":
        assert dict(exported["usr/bin/ping"].xattrs) == {"security.capability": CAP_NET_RAW}


# -- registry, reproducibility, zstd --------------------------------------------------------------------------------


def test_registry_push_and_pull_keep_the_digest(exports: Exports, tmp_path: Path) -> None:
    pushed = exports.result("plain-registry")
    ref = exports.dest(CONVERSIONS["plain-registry"])
    assert ref.startswith(f"docker://{exports.registry.addr}/")
    assert skopeo_inspect(ref, "--tls-verify=false")["Digest"] == pushed["manifest_digest"]
    tool("skopeo", "copy", "--quiet", "--src-tls-verify=false", ref, f"oci:{tmp_path / 'pulled'}:p")
    digest, manifest, _config = manifest_of(tmp_path / "pulled", "p")
    assert digest == pushed["manifest_digest"]
    assert [d["digest"] for d in manifest["layers"]] == [d["digest"] for d in pushed["layers"]]
    assert diff_trees(exports.expected("plain-registry"), exports.tree("plain-registry"), hardlinks=True) == []


def test_source_date_epoch_gives_identical_digests(exports: Exports) -> None:
    """Three runs on one disk with the same SOURCE_DATE_EPOCH: the same manifest, config and layer, whatever
    the destination."""
    local, pushed, archived = (exports.result(k) for k in ("plain-oci", "plain-registry", "plain-archive"))
    assert local["manifest_digest"] == pushed["manifest_digest"]
    assert local["image_id"] == pushed["image_id"] == archived["image_id"]
    assert local["layers"] == pushed["layers"] == archived["layers"]
    assert exports.docker.image_id(exports.image("plain-archive")) == local["image_id"]
    mtimes = {m.mtime for m in _members(exports.layout("plain-oci"), "v1")}
    assert max(mtimes) <= EPOCH


def _members(layout: Path, tag: str) -> list[tarfile.TarInfo]:
    _digest, manifest, _config = manifest_of(layout, tag)
    with tarfile.open(fileobj=io.BytesIO(layer_tar(layout, manifest["layers"][-1])), mode="r:") as tar:
        return tar.getmembers()


def test_zstd_layers(exports: Exports, tmp_path: Path) -> None:
    result = exports.result("plain-zstd")
    layout = exports.root / "plain-zstd"
    _digest, manifest, config = manifest_of(layout, "v1")
    assert [d["mediaType"] for d in manifest["layers"]] == ["application/vnd.oci.image.layer.v1.tar+zstd"]
    assert (layout / "blobs" / "sha256" / manifest["layers"][0]["digest"][7:]).read_bytes()[:4] == \
        b"\x28\xb5\x2f\xfd"
    # the same tar as the gzip run: equal diff_ids
    assert config["rootfs"]["diff_ids"] == [exports.result("plain-oci")["new_layer"]["diff_id"]]
    assert skopeo_inspect(f"oci:{layout}:v1")["Layers"] == [result["new_layer"]["digest"]]
    # umoci 0.4 reads no zstd: skopeo (containers/image's own zstd reader) recompresses, umoci unpacks
    tool("skopeo", "copy", "--quiet", "--dest-compress", "--dest-compress-format", "gzip",
         f"oci:{layout}:v1", f"oci:{tmp_path / 'gz'}:v1")
    assert diff_trees(exports.expected("plain-zstd"), umoci_tree(tmp_path / "gz", "v1", tmp_path),
                      hardlinks=True) == []


FORMATS = {**{k: c.fmt for k, c in CONVERSIONS.items() if c.fmt != "qcow2"}, "twoos-root": "vdi"}


@pytest.mark.parametrize("key", sorted(FORMATS))
def test_disk_formats(key: str, exports: Exports) -> None:
    """raw, vmdk, vhdx, vpc and vdi (besides qcow2): the format is found from the file's own magic (vpc's is in
    its footer, vdi's at 0x40, raw has none) and the conversions above judge what came out of each."""
    result = exports.result(key)
    assert result["source"]["format"] == FORMATS[key]
    info = json.loads(tool("qemu-img", "info", "--output=json", "-f", FORMATS[key], result["source"]["disk"]))
    assert info["format"] == FORMATS[key] and result["source"]["virtual_size"] == info["virtual-size"]


# -- disks that must be refused -----------------------------------------------------------------------------------


def _bad_disk(kind: str, disks: dict[str, ForeignDisk], where: Path) -> Path:
    plain = disks["plain"].path
    if kind == "backing-file":
        path = where / "overlay.qcow2"
        tool("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(plain), "-F", "qcow2", str(path))
    elif kind == "missing-backing-file":
        path = where / "dangling.qcow2"
        tool("qemu-img", "create", "-q", "-u", "-f", "qcow2", "-b", "/nonexistent/base.qcow2", "-F", "qcow2",
             str(path), "64M")
    elif kind == "external-data-file":
        path = where / "split.qcow2"
        tool("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={where / 'data.raw'}", str(path), "64M")
    elif kind == "truncated":
        path = where / "truncated.qcow2"
        data = plain.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "vmdk-extent":
        (where / "elsewhere.raw").write_bytes(b"\0" * (1 << 20))
        path = where / "descriptor.vmdk"
        path.write_text('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                        'createType="monolithicFlat"\n\n# Extent description\nRW 2048 FLAT "elsewhere.raw" 0\n\n'
                        '# The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = "4"\n')
    else:
        raise AssertionError(kind)
    return path


@pytest.mark.parametrize(("kind", "needle"), [
    ("backing-file", "has a backing file"),
    ("missing-backing-file", 'has a backing file ("/nonexistent/base.qcow2")'),
    ("external-data-file", "keeps its data in an external file"),
    ("truncated", "truncated or corrupt"),
    ("vmdk-extent", "extent in another file"),
])
@pytest.mark.parametrize("transport", ["oci", "archive"])
def test_unsafe_disks_are_refused_before_any_work(kind: str, needle: str, transport: str, tmp_path: Path,
                                                  disks: dict[str, ForeignDisk]) -> None:
    source = tmp_path / "source"
    source.mkdir()
    disk = _bad_disk(kind, disks, source)
    out = tmp_path / "out"
    out.mkdir()
    dest = f"oci:{out / 'image'}" if transport == "oci" else f"docker-archive:{out / 'image.tar'}"
    before = sorted(p.name for p in source.iterdir())
    line = assert_one_line_error(imgconv("vm-to-oci", str(disk), dest), code=None)
    assert needle in line, line
    if kind == "backing-file":
        assert str(disks["plain"].path) in line
    if kind == "vmdk-extent":
        assert "elsewhere.raw" in line
    assert listing(out) == []
    assert sorted(p.name for p in source.iterdir()) == before


def test_interrupted_export_leaves_nothing(disks: dict[str, ForeignDisk], tmp_path: Path) -> None:
    """SIGTERM while the appliance is inspecting the disk: exit 130 with one line, nothing at DEST, imgconv's
    scratch directory removed, and the appliance gone (libguestfs' recovery process kills it)."""
    disk = tmp_path / "mine.qcow2"  # a private copy: the appliance is found by its path afterwards
    shutil.copyfile(disks["plain"].path, disk)
    scratch, out = tmp_path / "tmp", tmp_path / "out"
    scratch.mkdir()
    out.mkdir()
    env = {"TMPDIR": str(scratch), "LIBGUESTFS_CACHEDIR": os.environ.get("LIBGUESTFS_CACHEDIR", "/var/tmp")}
    proc = start("vm-to-oci", "--json", str(disk), f"oci:{out / 'image'}:v1", env=env)
    assert proc.stderr is not None
    seen = []
    for raw in proc.stderr:
        seen.append(raw)
        if b'"step": "finding the operating system"' in raw:
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    stdout, rest = proc.communicate(timeout=60)
    stderr = b"".join(seen) + rest
    last = stderr.decode().strip().splitlines()[-1]
    assert proc.returncode == 130 and last.startswith("imgconv: error: interrupted"), stderr.decode()
    assert b"Traceback" not in stderr and stdout == b""
    assert listing(out) == []
    assert [p for p in listing(scratch) if p.startswith("imgconv-")] == []
    deadline = time.monotonic() + 30
    while subprocess.run(["pgrep", "-f", str(disk)], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "the appliance outlived imgconv"
        time.sleep(0.5)


def test_disk_without_an_operating_system(exports: Exports, bad_dir: Path, disks: dict[str, ForeignDisk]) -> None:
    line = assert_one_line_error(exports.ran("noos"), code=None)
    assert line == f"imgconv: error: no operating system found on {disks['noos'].path}"
    assert listing(bad_dir / "noos") == []


def test_broken_imgconv_origin_record(exports: Exports, bad_dir: Path) -> None:
    """A disk that looks like oci-to-qcow2's (root labelled imgconv-root, /.imgconv) but whose origin record is
    not JSON: its strings are untrusted like any other disk's."""
    line = assert_one_line_error(exports.ran("fakeimgconv"), code=None)
    assert "/.imgconv/origin.json" in line and "not valid JSON" in line, line
    assert listing(bad_dir / "fakeimgconv") == []


def test_two_operating_systems_are_listed(exports: Exports, bad_dir: Path) -> None:
    line = assert_one_line_error(exports.ran("twoos"), code=None)
    assert "2 operating systems" in line and "--root" in line, line
    assert '/dev/sda1 ("Alpine Linux v3.19 (imgconv test disk)")' in line, line
    assert '/dev/sda2 ("Debian GNU/Linux 12 (bookworm) (imgconv test disk)")' in line, line
    assert listing(bad_dir / "twoos") == []


def test_root_chooses_one_of_them(exports: Exports, disks: dict[str, ForeignDisk]) -> None:
    result = exports.result("twoos-root")
    debian = disks["twoos"].inspected[1]
    assert result["source"]["os"] == {"distro": debian.distro, "version": debian.version, "product": debian.product,
                                      "root": "/dev/sda2"}
    layout = exports.root / "twoos-root"
    _digest, manifest, config = manifest_of(layout, "v1")
    data = layer_tar(layout, manifest["layers"][0])
    assert "etc/which-root" in tar_names(data)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        member = tar.extractfile("etc/which-root")
        assert member is not None and member.read() == b"second\n"
    assert config["config"]["Labels"][f"{LABEL}.os.distro"] == "debian"


def test_the_judge_sees_what_the_builder_wrote(disks: dict[str, ForeignDisk]) -> None:
    """The truth the tests compare against is itself right: read through guestfs, it has what foreign.py made."""
    truth = disks["plain"].truth
    assert truth["usr/bin/suid-busybox"].mode == 0o4755
    assert truth["srv/hard-b"].hardlink == "srv/hard-a"
    assert dict(truth["srv/xattr-file"].xattrs)["user.imgconv.comment"] == b"on the disk"
    assert truth["srv/with space.txt"].sha256 == hashlib.sha256(b"a name with a space\n").hexdigest()
    assert truth["tmp/junk-dir/deeper/x"].uid == 1000 and truth["dev/null"].type == "char"
    assert dict(truth["usr/bin/ping"].xattrs) == {"security.capability": CAP_NET_RAW}
    assert truth[f"{LEGACY_DIR}/{LEGACY_NAME.decode('utf-8', 'surrogateescape')}"].size == 14
    layered = disks["layered"].truth
    assert "home/HIDDEN-dir" not in layered and layered["home/alice/notes.txt"].uid == 1000
    assert f"boot/vmlinuz-{KERNEL}" in layered and "boot/HIDDEN-under-boot-mount" not in layered
    assert disks["layered"].notes["root_device"] == "/dev/legacyvg/root"
