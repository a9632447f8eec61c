"""`make bench`: imgconv against its peers, measured in the same run on the same inputs, printed as ratios.

    .venv/bin/python bench/run.py [--repeat N | --quick] [--images busybox,debian,lvm] [--groups build,export,...]
                                  [--json PATH] [--write-readme] [--keep]

Each number is the median of N runs (default 3) of a whole command as a subprocess: wall time, and the peak
resident memory of its whole process tree (the sum of RSS over the process and all its descendants, sampled
every 50 ms from /proc; the appliance's qemu included), plus imgconv's own process peak (VmHWM). Rows and
why each peer was chosen: bench/README.md. Only ratios are meant to be compared across machines.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import inspect
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # fixtures/ and converter/ (the latter is also installed editable)

PY = sys.executable
IMGCONV = str(Path(PY).parent / "imgconv")
HELPERS = str(ROOT / "bench" / "helpers.py")
PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 1 << 20
SAMPLE_EVERY = 0.05
RUN_TIMEOUT = 900.0
GROUPS = ("build", "export", "boot", "read", "memory", "size")
DEFAULT_IMAGES = ("busybox", "debian", "lvm", "large")
# Foreign VM disks (no OCI image), which only the export group reads: `lvm` is the layered disk of
# tests/integration/foreign.py (built with libguestfs, never imgconv) with LVM_CONTENT's tree on its root LV.
FOREIGN_IMAGES = ("lvm",)
LVM_CONTENT = "debian"
# Images only the memory group runs on (one oci-to-qcow2 and one vm-to-oci each): `large` is about 1 GB, where
# the peers' comparisons would add an hour and say nothing the smaller fixtures do not.
MEMORY_ONLY_IMAGES = ("large",)
MEMORY_ONLY = "(memory only)"  # the peer of a memory group row: there is none
OWN_RSS_GOAL = 150 * (1 << 20)  # issue 13: imgconv's own peak RSS, whatever the image size
INCREMENTAL = "incremental oci-to-qcow2 (one small layer added)"
FULL_BUILD = "full build (--no-incremental)"
# Issue 13's goals (and issue 12's), as the largest ratio (imgconv / peer) that meets them: (task, peer, image or
# None for all).
GOALS: dict[tuple[str, str, str | None], float] = {
    ("oci-to-qcow2", "virt-make-fs", None): 0.8,
    ("oci-to-qcow2", "no-VM floor", "debian"): 3.0,
    # issue 12: an incremental rebuild after a one-small-layer change, against a full build of the same image
    (INCREMENTAL, FULL_BUILD, None): 0.3,
    ("vm-to-oci", "guestfish tar-out", None): 0.8,
    ("boot (to the workload's exit)", "direct kernel boot", None): 1.0,
    ("boot (to the workload's exit)", "Debian initramfs boot", None): 0.5,
}
# What Debian's initramfs-tools needs added to boot imgconv's init (the stock /boot/initrd.img-R lacks them, and a
# container's root has no modules tree to load them from): the host channels of `imgconv boot`.
DEBIAN_INITRAMFS_MODULES = ("virtio_console", "virtiofs")
# initramfs-tools moves these onto the root before it runs init=, and opens ROOT/dev/console: an image without
# them cannot be booted by it (a container image need not have them; docker and imgconv's init make them).
MOUNT_POINTS = (("/dev", "0755"), ("/proc", "0555"), ("/sys", "0555"), ("/run", "0755"))
# vm-to-oci leaves out what oci-to-qcow2 injected; the peer is told the same with tar excludes. The fixtures have
# no kernel of their own, so the host modules tree imgconv adds is the only thing under lib/modules.
TAR_OUT_EXCLUDES = "./.imgconv ./lost+found ./lib/modules ./usr/lib/modules"
# On a foreign disk vm-to-oci keeps the runtime directories, /boot and the modules trees, but not what is in them,
# nor the filesystems' lost+found (/boot's is under ./boot/*; /home is xfs, which has none).
FOREIGN_TAR_OUT_EXCLUDES = ("./lost+found ./boot/* ./lib/modules/* ./usr/lib/modules/* ./tmp/* ./proc/* ./sys/* "
                            "./dev/* ./run/*")
# Issue 13's disk-size goals: a 2 MB image (busybox) gives at most 32 MiB on the host, and any disk at most 1.1x its
# content plus kernel and initramfs.
SMALL_DISK_GOALS = {"busybox": 32 * MiB}
DISK_RATIO_GOAL = 1.1
# The --kernel-modules row (what the host modules tree costs; the default leaves it out for containers) costs N
# more conversions: only where the image's own content is large enough for that comparison to matter.
NO_MODULES_ROW = ("debian",)
# The incremental row's small layer deletes the first of these the image has (a whiteout).
WHITEOUT_CANDIDATES = ("etc/motd", "etc/fixture-release", "etc/issue", "etc/hostname")
FS_OPTIONS = ("-b", "4096", "-i", "8192", "-m", "1", "-L", "imgconv-root")  # as converter/disk/build.py's mke2fs

PEERS = {
    "virt-make-fs": "`virt-make-fs --format=qcow2 --type=ext4 --partition=mbr` gets the image's root filesystem as a "
                    "ready tar (flattening it is not timed) and builds a partitioned ext4 qcow2 in one libguestfs "
                    "appliance (imgconv starts none for these images: debugfs writes on the host), but adds no "
                    "kernel, initramfs, init or bootloader and checks no digests.",
    "no-VM floor": "the host-only minimum: `umoci unpack` (verify, decompress and apply the layers onto the host "
                   "filesystem) then `mkfs.ext4 -d` into a raw file of imgconv's disk size: no VM, no partition "
                   "table, no boot files, and it applies the entries (owners, modes, devices) onto the host, which "
                   "imgconv never does (it spools only file contents for debugfs).",
    FULL_BUILD: "the same image (the fixture plus one small layer: three new files, a changed /etc/group, a "
                "whiteout of one of the fixture's files) converted into the same store by the same imgconv with "
                "`--no-incremental`: every layer flattened and the whole tree written by debugfs into a new "
                "filesystem, where the incremental rebuild copies the disk of the fixture's stored version and "
                "applies the new layer (both on the host, no appliance).",
    "guestfish tar-out": "`guestfish --ro -i tar-out / - | gzip` (same disk, same excludes, inspection included) "
                         "streams the files out and compresses them, but writes no OCI layout, computes no "
                         "digests and does not normalise or filter entries.",
    "direct kernel boot": "qemu `-kernel -initrd -append` with the same kernel, initramfs, command line and disk, "
                          "run by the same `converter.boot.qemu.boot`: no bootloader, no kernel read through the "
                          "BIOS; the gap is what SeaBIOS plus extlinux cost.",
    "Debian initramfs boot": "the same direct kernel boot (kernel, command line, disk, `converter.boot.qemu.boot`) "
                             "with Debian's generic initramfs instead of imgconv's: `mkinitramfs` with the host's "
                             "/etc/initramfs-tools (MODULES=most, as /boot/initrd.img-R) plus virtio_console and "
                             "virtiofs, the host channels imgconv's init needs, which the stock one lacks; "
                             "imgconv's init then runs as the root's init=. An image without /dev, /proc, /sys or "
                             "/run boots from a copy that has them (initramfs-tools moves its mounts there).",
    "SeaBIOS boot": "the same `--firmware both` disk booted by the same `converter.boot.qemu.boot` under SeaBIOS "
                    "(extlinux) instead of OVMF (the unified kernel image): same kernel, initramfs, command line "
                    "and output; the gap is what OVMF's start-up costs under this accelerator.",
    "skopeo inspect": "`skopeo inspect oci:DIR:1` reads the index, manifest and config only: it verifies no layer, "
                      "where `imgconv inspect` hashes and decompresses every blob.",
    "umoci unpack": "`umoci unpack --rootless` verifies, decompresses and applies every layer and writes the files "
                    "to the host; imgconv's flattener (`converter.oci.flatten`) verifies and decompresses the same "
                    "layers and writes one tar stream to /dev/null.",
}


class BenchError(RuntimeError):
    def __init__(self, message: str, stderr: str = "") -> None:
        super().__init__(message)
        self.stderr = stderr  # the failed command's whole stderr


# -- measuring one command --------------------------------------------------------------------------------


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, rss bytes, comm) for every process that can be read."""
    table: dict[int, tuple[int, int, str]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        close = data.rfind(b")")
        comm = data[data.find(b"(") + 1 : close].decode(errors="replace")
        fields = data[close + 2 :].split()
        try:
            table[int(entry.name)] = (int(fields[1]), int(fields[21]) * PAGE, comm)
        except (IndexError, ValueError):
            continue
    return table


def _tree(root: int, table: dict[int, tuple[int, int, str]]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _rss, _comm) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, pending = [], [root]
    while pending:
        pid = pending.pop()
        if pid in table:
            found.append(pid)
        pending.extend(children.get(pid, ()))
    return found


def _hwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class TreeSampler(threading.Thread):
    """Peak RSS of a process tree: the sum over all live descendants, sampled; and the root's own VmHWM."""

    def __init__(self, root: int) -> None:
        super().__init__(name="bench-sampler", daemon=True)
        self.root = root
        self.peak_tree = 0
        self.peak_root = 0
        self.by_comm: dict[str, int] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(SAMPLE_EVERY)

    def sample(self) -> None:
        table = _proc_table()
        pids = _tree(self.root, table)
        total = 0
        per_comm: dict[str, int] = {}
        for pid in pids:
            _ppid, rss, comm = table[pid]
            total += rss
            per_comm[comm] = per_comm.get(comm, 0) + rss
        self.peak_tree = max(self.peak_tree, total)
        for comm, rss in per_comm.items():
            self.by_comm[comm] = max(self.by_comm.get(comm, 0), rss)
        self.peak_root = max(self.peak_root, _hwm(self.root))

    def stop(self) -> None:
        self._halt.set()
        self.join()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rfind(b")") + 2 : data.rfind(b")") + 3] != b"Z"


def stop_tree(root: int, grace: float = 15.0, reap: Callable[[], object] | None = None) -> None:
    """End a command we started and everything it started: SIGTERM to it first (imgconv then stops its
    appliance or VM itself), SIGKILL to whatever of its tree is still running after *grace* seconds.

    The root must be reaped as soon as it exits (by *reap*, or by a wait4 in another thread): libguestfs'
    recovery process kills the appliance only once its parent is gone, and a zombie parent still counts.
    """
    table = _proc_table()
    tree = {pid: table[pid][2] for pid in _tree(root, table)}
    with suppress(ProcessLookupError, PermissionError):
        os.kill(root, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(_alive(pid) for pid in tree) and time.monotonic() < deadline:
        if reap is not None:
            reap()
        time.sleep(0.1)
    now = _proc_table()
    for pid, comm in tree.items():
        if pid in now and now[pid][2] == comm and _alive(pid):  # the same process, not a reused pid
            with suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def become_subreaper() -> None:
    """Orphans of the commands we run (libguestfs' recovery process, a killed qemu) become our children,
    so they can be reaped instead of lingering as zombies under a pid 1 that does not reap."""
    with suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def reap_orphans() -> None:
    """Reap the orphans that became ours. Only called when no command of ours is left to wait for."""
    with suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def reap_at_exit(patience: float = 10.0) -> None:
    """Wait (a little) for orphans still running, e.g. a recovery process killing its appliance."""
    deadline = time.monotonic() + patience
    while True:
        reap_orphans()
        mine = [pid for pid, (ppid, _rss, _comm) in _proc_table().items() if ppid == os.getpid() and _alive(pid)]
        if not mine or time.monotonic() > deadline:
            return
        time.sleep(0.1)


@dataclass(frozen=True)
class Sample:
    seconds: float
    tree_rss: int  # peak of the summed RSS of the whole process tree
    own_rss: int  # the root process's own peak (VmHWM): imgconv's Python when the root is imgconv
    max_rss: int  # the largest single process (wait4's ru_maxrss), a cross-check of the sampling
    cpu: float  # user + system seconds of the whole tree (wait4): less sensitive to a busy machine than wall time
    by_comm: dict[str, int]
    steps: dict[str, float]  # imgconv --json step timings, when the command printed them


def parse_steps(stderr_text: str) -> dict[str, float]:
    steps: dict[str, float] = {}
    for line in stderr_text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "step-done" and "id" in event:
            name = str(event["id"])  # stable step ids (converter/pipeline.py), never the titles
            steps[name] = steps.get(name, 0.0) + float(event.get("seconds", 0.0))
    return steps


def measure(argv: Sequence[str], *, env: dict[str, str], logs: Path, stdout: Path | None = None,
            ok: Callable[[int, str], bool] = lambda rc, _err: rc == 0) -> Sample:
    """Run *argv* once; stdout to *stdout* (or /dev/null), stderr to a log. Raises BenchError if not *ok*."""
    logs.mkdir(parents=True, exist_ok=True)
    err_path = logs / f"{len(list(logs.iterdir())):03d}-{Path(argv[0]).name}.stderr"
    with open(stdout or os.devnull, "wb") as out, open(err_path, "wb") as err:
        started = time.monotonic()
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env,
                                start_new_session=True)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        timer = threading.Timer(RUN_TIMEOUT, stop_tree, args=(proc.pid,))
        timer.start()
        try:
            _pid, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            stop_tree(proc.pid, reap=proc.poll)
            proc.wait()
            raise
        finally:
            timer.cancel()
            sampler.stop()
            reap_orphans()
        seconds = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
    err_text = err_path.read_text(errors="replace")
    if not ok(proc.returncode, err_text):
        tail = " | ".join(line for line in err_text.strip().splitlines()[-6:] if not line.startswith("{"))
        raise BenchError(f"{Path(argv[0]).name} {' '.join(argv[1:3])}... exited {proc.returncode}: {tail[-600:]}",
                         err_text)
    # The root's VmHWM is exact where sampling can miss a short peak: the tree's peak is at least that.
    return Sample(seconds, max(sampler.peak_tree, sampler.peak_root), sampler.peak_root, usage.ru_maxrss * 1024,
                  usage.ru_utime + usage.ru_stime, sampler.by_comm, parse_steps(err_text))


# -- inputs -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fixture:
    name: str
    oci_dir: Path
    layers: int
    compressed: int
    uncompressed: int
    largest_compressed: int
    largest_uncompressed: int

    @property
    def ref(self) -> str:
        return f"oci:{self.oci_dir}:1"


def load_fixture(name: str) -> Fixture:
    from converter.disk.plan import uncompressed_estimate
    from converter.oci.reference import parse_reference
    from converter.oci.transport import open_image
    from fixtures import cache_key, cache_root, cached
    from fixtures.dockerd import dockerd_unavailable

    entry = cache_root() / "fixtures" / f"{name}-{cache_key(name)}"
    if name == "debian" and not (entry / "fixture.json").exists():
        reason = dockerd_unavailable()
        if reason is not None:
            raise BenchError(f"the debian fixture is not cached and cannot be built here: {reason}")
        say("building the debian fixture (cache is cold: a private dockerd is started and stopped, ~2 min)")
    if name == "large" and not (entry / "fixture.json").exists():
        say("building the large fixture (cache is cold: mmdebstrap downloads and installs about 1 GB of packages, "
            "then it is gzipped; several minutes, once)")
    built = cached(name)
    with open_image(parse_reference(f"oci:{built.oci_dir}:1")) as image:
        packed = [layer.descriptor.size for layer in image.layers]
        unpacked = [uncompressed_estimate(image, layer) for layer in image.layers]
    return Fixture(name, built.oci_dir, len(packed), sum(packed), sum(unpacked), max(packed), max(unpacked))


def bench_env() -> tuple[dict[str, str], str]:
    """The environment for every command: libguestfs' direct backend, and TCG forced when KVM does not work."""
    from converter.boot.accel import choose_accel

    accel = choose_accel()
    env = {**os.environ, "LIBGUESTFS_BACKEND": "direct"}
    env.pop("LIBGUESTFS_DEBUG", None)
    env.pop("LIBGUESTFS_TRACE", None)
    settings = [s for s in env.get("LIBGUESTFS_BACKEND_SETTINGS", "").split(":") if s and s != "force_tcg"]
    if accel == "tcg":
        settings.append("force_tcg")
    env["LIBGUESTFS_BACKEND_SETTINGS"] = ":".join(settings)
    return env, accel


def require_tools() -> None:
    needed = {"virt-make-fs": "libguestfs-tools", "guestfish": "libguestfs-tools", "umoci": "umoci",
              "skopeo": "skopeo", "mkfs.ext4": "e2fsprogs", "gzip": "gzip", "tar": "tar",
              "qemu-system-x86_64": "qemu-system-x86", "qemu-img": "qemu-utils"}
    missing = sorted({pkg for tool, pkg in needed.items() if shutil.which(tool) is None})
    if missing:
        raise BenchError(f"missing Debian packages: {' '.join(missing)} (make setup installs them)")
    if not os.access(IMGCONV, os.X_OK):
        raise BenchError(f"{IMGCONV} is missing: run make setup")


def unpack_cmd(fixture: Fixture, bundle: Path, rootless: bool) -> list[str]:
    return ["umoci", "unpack", *(["--rootless"] if rootless else []), "--image", f"{fixture.oci_dir}:1", str(bundle)]


def rootfs_tar(fixture: Fixture, work: Path, env: dict[str, str]) -> Path:
    """The image's final root filesystem as one tar, flattened by umoci (an independent implementation)."""
    bundle = work / f"rootfs-{fixture.name}"
    tar = work / f"rootfs-{fixture.name}.tar"
    try:
        subprocess.run(unpack_cmd(fixture, bundle, os.geteuid() != 0), env=env, check=True, capture_output=True)
        subprocess.run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C", str(bundle / "rootfs"),
                        "-cf", str(tar), "."], check=True, capture_output=True)
    except subprocess.CalledProcessError as exc:
        raise BenchError(f"preparing the root filesystem tar failed: {exc.stderr.decode(errors='replace')}") from None
    finally:
        remove(bundle)
    return tar


def artifact_files(disk: Path) -> tuple[Path, Path, Path]:
    """What oci-to-qcow2 writes: the disk, its sidecar and its provenance statement (a leftover of either makes the
    next conversion to that name refuse)."""
    return disk, Path(f"{disk}.json"), Path(f"{disk}.intoto.json")


def remove(*paths: Path) -> None:
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


@dataclass(frozen=True)
class ForeignImage:
    """A foreign VM disk the export group reads (FOREIGN_IMAGES): no OCI image, made by libguestfs."""

    name: str
    path: Path
    tar_bytes: int  # the content's tar, as the fixtures' "uncompressed" (layer tar) bytes
    content_bytes: int  # the regular files' bytes in it (hard links once)
    disk_bytes: int  # the qcow2 file's size

    def describe(self) -> str:
        return (f"{self.name}: a foreign disk built with libguestfs (MBR; /boot ext4; an LVM PV whose root LV, ext4, "
                "holds a merged-/usr busybox root with /etc/fstab by UUID= and LABEL=, and the "
                f"{LVM_CONTENT} fixture's flattened tree under /srv/content; /home xfs), "
                f"{self.tar_bytes / MiB:.1f} MiB of tar ({self.content_bytes / MiB:.1f} MiB of files), "
                f"qcow2 {self.disk_bytes / MiB:.0f} MiB")


def regular_bytes(tar: Path) -> int:
    """The bytes of the regular files in *tar* (a hard link's entry carries none: each inode counts once)."""
    with tarfile.open(tar, mode="r|*") as archive:
        return sum(member.size for member in archive if member.isreg())


def root_lv_mib(tar_bytes: int) -> int:
    """A root LV that holds *tar_bytes* of content with room for ext4's metadata and a block per small file (the
    layered disk's own files need a few MiB), in whole 4 MiB extents."""
    wanted = tar_bytes * 13 // 10 + 64 * MiB
    return -(-wanted // (4 * MiB)) * 4


def _make_lvm(directory: Path, env: dict[str, str]) -> None:
    """The lvm disk into *directory* (lvm.qcow2, disk.json): LVM_CONTENT's root filesystem flattened by umoci, put
    on the layered disk's root LV by tests/integration/foreign.py's builder (libguestfs only, no imgconv)."""
    from tests.integration.foreign import build_layered_disk

    tar = rootfs_tar(load_fixture(LVM_CONTENT), directory, env)
    lv = root_lv_mib(tar.stat().st_size)
    say(f"building the lvm disk with libguestfs (once, cached: about a minute under TCG; root LV {lv} MiB)")
    try:
        build_layered_disk(directory / "lvm.qcow2", tar, lv)
    except RuntimeError as exc:  # guestfs' errors
        raise BenchError(f"building the lvm disk failed: {exc}") from None
    (directory / "lvm.qcow2").chmod(0o444)
    doc = {"tar_bytes": tar.stat().st_size, "content_bytes": regular_bytes(tar), "root_lv_mib": lv}
    remove(tar)
    (directory / "disk.json").write_text(json.dumps(doc))


def lvm_image(env: dict[str, str]) -> ForeignImage:
    """The lvm disk, from the cache (IMGCONV_TEST_CACHE/bench/lvm-KEY, built first under a lock if missing); KEY
    hashes what it is made of: the foreign disks' recipe and tools, the content fixture's key, _make_lvm itself."""
    from fixtures import cache_key, cache_root
    from tests.integration import foreign

    recipe = f"{foreign.cache_key()} {cache_key(LVM_CONTENT)}\n{inspect.getsource(_make_lvm)}"
    key = hashlib.sha256(recipe.encode()).hexdigest()[:20]
    entry = cache_root() / "bench" / f"lvm-{key}"
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.parent / f".lvm-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (entry / "disk.json").exists():
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-lvm-", dir=entry.parent))
            try:
                _make_lvm(tmp, env)
                os.rename(tmp, entry)
            finally:
                remove(tmp)
            for other in entry.parent.glob("lvm-*"):  # other recipes' disks
                if other != entry:
                    remove(other)
    doc = json.loads((entry / "disk.json").read_text())
    disk = entry / "lvm.qcow2"
    return ForeignImage("lvm", disk, doc["tar_bytes"], doc["content_bytes"], disk.stat().st_size)


# -- rows -------------------------------------------------------------------------------------------------


@dataclass
class Row:
    task: str
    image: str
    peer: str
    image_bytes: int
    mine: list[Sample] = field(default_factory=list)
    theirs: list[Sample] = field(default_factory=list)
    note: str = ""
    error: str = ""

    @property
    def goal(self) -> float | None:
        """Issue 13's goal for this row: the largest ratio that meets it (None: the row has none)."""
        return GOALS.get((self.task, self.peer, self.image), GOALS.get((self.task, self.peer, None)))


@dataclass(frozen=True)
class DiskSize:
    """One row of the disk-size table: an oci-to-qcow2 disk against what it must hold."""

    image: str
    content: int  # the flattened tree's regular-file bytes (hard links once)
    kernel: int  # the kernel and the initramfs the disk boots
    initramfs: int
    qcow2: int  # the disk file's size on the host (st_size)

    @property
    def ratio(self) -> float:
        return self.qcow2 / (self.content + self.kernel + self.initramfs)

    def goal(self) -> str:
        """Issue 13's goals for this disk and whether it met them."""
        cells = []
        if (bound := SMALL_DISK_GOALS.get(self.image)) is not None:
            cells.append(f"≤ {bound // MiB} MiB: {'met' if self.qcow2 <= bound else 'missed'}")
        cells.append(f"≤ {DISK_RATIO_GOAL:.2f}×: {'met' if self.ratio <= DISK_RATIO_GOAL else 'missed'}")
        return "; ".join(cells)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


class Bench:
    def __init__(self, work: Path, repeat: int, env: dict[str, str]) -> None:
        self.work, self.repeat, self.env = work, repeat, env
        self.logs = work / "logs"
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.foreign: list[ForeignImage] = []
        self.sizes: list[DiskSize] = []
        self.failed = False

    def run(self, row: Row, who: str, argv: Sequence[str], env: dict[str, str] | None = None,
            **kwargs: Any) -> Sample:
        sample = measure(argv, env=self.env if env is None else env, logs=self.logs, **kwargs)
        (row.mine if who == "imgconv" else row.theirs).append(sample)
        say(f"  {row.task} [{row.image}] {who if who == 'imgconv' else row.peer}: {sample.seconds:.1f}s, "
            f"peak RSS {sample.tree_rss / MiB:.0f} MiB")
        return sample

    @contextmanager
    def guarded(self, *rows: Row) -> Iterator[None]:
        """A failure ends these rows (recorded, shown in the table) and the rest of the bench goes on."""
        try:
            yield
        except BenchError as exc:
            self.failed = True
            say(f"FAILED: {exc}")
            for row in rows:
                row.error = row.error or str(exc)

    def image(self, fx: Fixture, groups: Sequence[str]) -> None:
        """The rows of *groups* on one fixture: the disk the build group makes (or, without it, one made untimed)
        serves the export, boot and size rows; `large` runs the memory group only (and the size of its disk)."""
        say(f"{fx.name}: {fx.layers} layers, {fx.compressed / MiB:.1f} MiB compressed, "
            f"{fx.uncompressed / MiB:.1f} MiB uncompressed")
        disk = self.work / f"{fx.name}.qcow2"
        sidecar = None
        if fx.name in MEMORY_ONLY_IMAGES:
            groups = [g for g in groups if g in ("memory", "size")]
        elif {"build", "export", "boot", "size"} & set(groups):
            if "build" in groups:
                sidecar = self.build(fx, disk)
                self.incremental(fx)
            else:  # the other rows still need a disk made by imgconv: made once, untimed
                subprocess.run([IMGCONV, "oci-to-qcow2", "--quiet", fx.ref, str(disk)], env=self.env, check=True)
                sidecar = json.loads(Path(f"{disk}.json").read_text())
        if sidecar is not None and disk.exists():
            if "export" in groups:
                self.export(fx.name, fx.uncompressed, disk)
            if "boot" in groups:
                self.boot(fx, disk, sidecar)
                self.boot_firmware(fx)
        if "read" in groups:
            self.read(fx)
        if "memory" in groups:
            self.memory(fx, disk)
        if "size" in groups and disk.exists():
            self.disk_size(fx, disk)
        remove(*artifact_files(disk))

    # -- 1 and 2: oci-to-qcow2 ---------------------------------------------------------------------------

    def build(self, fx: Fixture, keep_disk: Path) -> dict[str, Any] | None:
        vmf = Row("oci-to-qcow2", fx.name, "virt-make-fs", fx.uncompressed)
        nomod = Row("oci-to-qcow2 --kernel-modules", fx.name, "virt-make-fs", fx.uncompressed)
        floor = Row("oci-to-qcow2", fx.name, "no-VM floor", fx.uncompressed)
        with_nomod = fx.name in NO_MODULES_ROW
        self.rows += [vmf, nomod, floor] if with_nomod else [vmf, floor]
        sidecar: dict[str, Any] | None = None
        rootless = os.geteuid() != 0
        with self.guarded(vmf, nomod, floor):
            tar = rootfs_tar(fx, self.work, self.env)
            out, out_nomod, peer_out = self.work / "out.qcow2", self.work / "out-nomod.qcow2", self.work / "vmf.qcow2"
            bundle, raw = self.work / "floor-bundle", self.work / "floor.raw"
            for i in range(self.repeat):
                say(f"oci-to-qcow2 [{fx.name}] run {i + 1}/{self.repeat}")
                self.run(vmf, "imgconv", [IMGCONV, "oci-to-qcow2", "--json", fx.ref, str(out)])
                if sidecar is None:
                    sidecar = json.loads(Path(f"{out}.json").read_text())
                if i == self.repeat - 1:
                    for made, kept in zip(artifact_files(out), artifact_files(keep_disk), strict=True):
                        os.replace(made, kept)
                remove(*artifact_files(out))
                floor.mine.append(vmf.mine[-1])  # one imgconv run serves both rows
                if with_nomod:
                    with self.guarded(nomod):
                        self.run(nomod, "imgconv", [IMGCONV, "oci-to-qcow2", "--json", "--kernel-modules",
                                                    fx.ref, str(out_nomod)])
                    remove(*artifact_files(out_nomod))
                with self.guarded(vmf, nomod):
                    sample = self.run(vmf, "peer", ["virt-make-fs", "--format=qcow2", "--type=ext4",
                                                    "--partition=mbr", str(tar), str(peer_out)])
                    nomod.theirs.append(sample)
                remove(peer_out)
                size = str(sidecar["virtual_size"])
                script = ('set -e; umoci unpack $4 --image "$1" "$2" >/dev/null; truncate -s "$5" "$3"; '
                          'shift 5; exec mkfs.ext4 -q -F "$@"')
                with self.guarded(floor):
                    self.run(floor, "peer", ["bash", "-c", script, "floor", f"{fx.oci_dir}:1", str(bundle), str(raw),
                                             "--rootless" if rootless else "", size, *FS_OPTIONS, "-d",
                                             str(bundle / "rootfs"), str(raw)])
                remove(bundle, raw)
            remove(tar)
        vmf.note = "peer gets the flattened tar for free; builds no boot files"
        floor.note = "host-only: extracts onto the host"
        return sidecar

    # -- 2b: an incremental rebuild into the store --------------------------------------------------------

    def incremental(self, fx: Fixture) -> None:
        """`oci-to-qcow2 DERIVED store:NAME:v2` on a store holding the fixture's version (v1), DERIVED being the
        fixture plus one small layer, against a full build of DERIVED into the same store (--no-incremental).

        Each repeat builds on v1 again: a version of DERIVED itself (v2, or the full build's tag) holds all its
        layers, not a strict prefix of them, so it is never a base. The store, v1 and DERIVED are made untimed.
        """
        row = Row(INCREMENTAL, fx.name, FULL_BUILD, fx.uncompressed)
        self.rows.append(row)
        store, layout = self.work / f"store-{fx.name}", self.work / f"derived-{fx.name}"
        env = {**self.env, "IMGCONV_STORE": str(store)}
        name = f"bench-{fx.name}"
        with self.guarded(row):
            say(f"oci-to-qcow2 [{fx.name}] into a fresh store as store:{name}:v1, and the image plus one small "
                "layer (untimed)")
            made = subprocess.run([IMGCONV, "oci-to-qcow2", "--quiet", fx.ref, f"store:{name}:v1"], env=env,
                                  capture_output=True, text=True, check=False)
            if made.returncode != 0:
                raise BenchError(f"oci-to-qcow2 into the store exited {made.returncode}: {made.stderr[-600:]}",
                                 made.stderr)
            changes = derive_small(fx, layout)
            derived_ref = f"oci:{layout}:1"
            for i in range(self.repeat):
                say(f"incremental oci-to-qcow2 and full build [{fx.name}] run {i + 1}/{self.repeat}")
                self.run(row, "imgconv", [IMGCONV, "oci-to-qcow2", "--json", derived_ref, f"store:{name}:v2"],
                         env=env, ok=built_incrementally)
                self.run(row, "peer", [IMGCONV, "oci-to-qcow2", "--json", "--no-incremental", derived_ref,
                                       f"store:{name}:full"], env=env)
            listed = subprocess.run([IMGCONV, "store", "list", "--json"], env=env, capture_output=True, text=True,
                                    check=False)
            shas = {entry["tag"]: entry["sha256"] for entry in json.loads(listed.stdout or "[]")
                    if entry.get("name") == name}
            same = shas.get("v2") is not None and shas.get("v2") == shas.get("full")
            row.note = (f"on store:{name}:v1; the layer: {changes}; the two disks' sha256 "
                        + ("are the same" if same else "differ (a rebuild promises a full build's files, not bytes)"))
        remove(store, layout)

    # -- 3: vm-to-oci ------------------------------------------------------------------------------------

    def export(self, name: str, image_bytes: int, disk: Path, excludes: str = TAR_OUT_EXCLUDES) -> None:
        row = Row("vm-to-oci", name, "guestfish tar-out", image_bytes)
        self.rows.append(row)
        layout, peer_out = self.work / "vm-to-oci", self.work / "tar-out.tar.gz"
        mount = ["-i"]
        with self.guarded(row):
            for i in range(self.repeat):
                say(f"vm-to-oci [{name}] run {i + 1}/{self.repeat}")
                self.run(row, "imgconv", [IMGCONV, "vm-to-oci", "--json", str(disk), f"oci:{layout}:1"])
                remove(layout)

                def peer(how: list[str]) -> list[str]:
                    return ["bash", "-o", "pipefail", "-c",
                            'guestfish --ro --format=qcow2 -a "$1" "${@:3}" tar-out / - numericowner:true '
                            'xattrs:true excludes:"$2" | gzip > "$0"',
                            str(peer_out), str(disk), excludes, *how]

                try:
                    self.run(row, "peer", peer(mount))
                except BenchError as exc:
                    if i > 0 or "no operating system" not in exc.stderr:
                        raise
                    # inspection needs an /etc/os-release (or the like): mount the root by hand instead
                    mount = ["-m", "/dev/sda1"]
                    row.note = "peer mounts with -m: inspection finds no OS in this image"
                    self.run(row, "peer", peer(mount))
                remove(peer_out)

    def export_foreign(self, name: str) -> None:
        """vm-to-oci of a foreign disk (FOREIGN_IMAGES), made untimed (and cached) before its rows."""
        try:
            image = lvm_image(self.env)
        except BenchError as exc:
            self.failed = True
            say(f"FAILED: {exc}")
            self.rows.append(Row("vm-to-oci", name, "guestfish tar-out", 0, error=str(exc)))
            return
        self.foreign.append(image)
        self.export(name, image.tar_bytes, image.path, FOREIGN_TAR_OUT_EXCLUDES)

    # -- 4: boot -----------------------------------------------------------------------------------------

    def boot(self, fx: Fixture, disk: Path, sidecar: dict[str, Any]) -> None:
        row = Row("boot (to the workload's exit)", fx.name, "direct kernel boot", fx.uncompressed)
        # What a distribution's generic initramfs would cost instead of imgconv's small one.
        deb = Row("boot (to the workload's exit)", fx.name, "Debian initramfs boot", fx.uncompressed)
        # What the default network (a NIC on QEMU's user network, configured by the init) costs a boot.
        net = Row("boot with the default network", fx.name, "boot --network none", fx.uncompressed)
        self.rows += [row, deb, net]
        mine_out, peer_out = self.work / "boot.out", self.work / "direct.out"
        scratch = [mine_out, peer_out, self.work / "debian-initramfs", self.work / "mount-points.qcow2"]
        with self.guarded(row, deb, net):
            kernel, initrd, append = direct_kernel_parts(fx, disk, sidecar, self.work, self.env)
            scratch.append(initrd)
            debian: tuple[Path, Path] | None = None  # (initrd, disk) of the Debian initramfs peer
            with self.guarded(deb):
                say(f"Debian's initramfs and a disk it can boot [{fx.name}] (untimed)")
                debian_initrd = debian_initramfs(sidecar, self.work)
                debian_disk, added = disk_with_mount_points(disk, self.work, self.env)
                debian = (debian_initrd, debian_disk)
                deb.note = ("same kernel, command line and output; Debian's initramfs"
                            + (f"; the peer's disk copy has {', '.join(added)} added" if added else ", same disk"))
            for i in range(self.repeat):
                say(f"boot [{fx.name}] run {i + 1}/{self.repeat}")
                self.run(row, "imgconv", [IMGCONV, "boot", str(disk)], stdout=mine_out)
                self.run(row, "peer", [PY, HELPERS, "direct-boot", str(disk), str(kernel), str(initrd), append],
                         stdout=peer_out)
                if mine_out.read_bytes() != peer_out.read_bytes():
                    raise BenchError("the direct kernel boot printed something else than imgconv boot")
                if debian is not None:
                    deb.mine.append(row.mine[-1])
                    with self.guarded(deb):
                        try:
                            self.run(deb, "peer", [PY, HELPERS, "direct-boot", str(debian[1]), str(kernel),
                                                   str(debian[0]), append], stdout=peer_out)
                            if mine_out.read_bytes() != peer_out.read_bytes():
                                raise BenchError("the boot with Debian's initramfs printed something else than "
                                                 "imgconv boot")
                        except BenchError:
                            debian = None  # no more tries: each failure is a long boot to its panic
                            raise
                net.mine.append(row.mine[-1])
                self.run(net, "peer", [IMGCONV, "boot", "--network", "none", str(disk)], stdout=peer_out)
            row.note = "same kernel, initramfs, disk and output"
            net.note = "the same disk and command; the ratio is what the NIC and its set-up cost"
        remove(*scratch)

    # -- 7: disk sizes ------------------------------------------------------------------------------------

    def disk_size(self, fx: Fixture, disk: Path) -> None:
        """The size of a disk the rows above made (not converted again) against its content (imgconv's flattener
        over the image, to /dev/null) plus the kernel and initramfs it boots (direct_kernel_parts)."""
        sidecar = json.loads(Path(f"{disk}.json").read_text())
        try:
            flat = subprocess.run([PY, HELPERS, "flatten", fx.ref], env=self.env, capture_output=True, text=True,
                                  check=True)
            kernel, initrd, _append = direct_kernel_parts(fx, disk, sidecar, self.work, self.env)
        except (BenchError, subprocess.CalledProcessError) as exc:
            self.failed = True
            say(f"FAILED: the disk size of {fx.name}: {exc}")
            self.notes.append(f"disk size [{fx.name}]: failed: {exc}")
            return
        size = DiskSize(fx.name, int(json.loads(flat.stdout)["content_bytes"]), kernel.stat().st_size,
                        initrd.stat().st_size, disk.stat().st_size)
        remove(*(path for path in (kernel, initrd) if path.is_relative_to(self.work)))
        self.sizes.append(size)
        say(f"  disk size [{fx.name}]: {size.qcow2 / MiB:.1f} MiB, {size.ratio:.2f}× content + kernel + initramfs")

    # -- 6: memory ---------------------------------------------------------------------------------------

    def memory(self, fx: Fixture, disk: Path) -> None:
        """imgconv's own peak RSS (and its tree's) for oci-to-qcow2 and vm-to-oci, where no other row measured
        them: one run each, as the peak barely varies from run to run and a 1 GB conversion takes minutes."""
        done = {r.task for r in self.rows if r.image == fx.name and r.mine}
        build = Row("oci-to-qcow2", fx.name, MEMORY_ONLY, fx.uncompressed)
        export = Row("vm-to-oci", fx.name, MEMORY_ONLY, fx.uncompressed)
        layout = self.work / "vm-to-oci"
        if "oci-to-qcow2" not in done or not disk.exists():
            self.rows.append(build)
            with self.guarded(build, export):
                say(f"oci-to-qcow2 [{fx.name}] (memory)")
                remove(*artifact_files(disk))
                self.run(build, "imgconv", [IMGCONV, "oci-to-qcow2", "--json", fx.ref, str(disk)])
        if "vm-to-oci" not in done and disk.exists():
            self.rows.append(export)
            with self.guarded(export):
                say(f"vm-to-oci [{fx.name}] (memory)")
                self.run(export, "imgconv", [IMGCONV, "vm-to-oci", "--json", str(disk), f"oci:{layout}:1"])
            remove(layout)

    def boot_firmware(self, fx: Fixture) -> None:
        """One `--firmware both` disk (made once, untimed) booted to the workload's exit under OVMF and under
        SeaBIOS: the same kernel, initramfs, command line and output, so the ratio is what UEFI costs a boot."""
        row = Row("boot under OVMF (UEFI)", fx.name, "SeaBIOS boot", fx.uncompressed)
        self.rows.append(row)
        disk, uefi_out, bios_out = self.work / "both.qcow2", self.work / "uefi.out", self.work / "bios.out"
        with self.guarded(row):
            say(f"oci-to-qcow2 --firmware both [{fx.name}] (untimed)")
            made = subprocess.run([IMGCONV, "oci-to-qcow2", "--quiet", "--firmware", "both", fx.ref, str(disk)],
                                  env=self.env, capture_output=True, text=True, check=False)
            if made.returncode != 0:
                raise BenchError(f"oci-to-qcow2 --firmware both exited {made.returncode}: {made.stderr[-600:]}",
                                 made.stderr)
            for i in range(self.repeat):
                say(f"boot under OVMF and SeaBIOS [{fx.name}] run {i + 1}/{self.repeat}")
                self.run(row, "imgconv", [PY, HELPERS, "firmware-boot", str(disk), "uefi"], stdout=uefi_out)
                self.run(row, "peer", [PY, HELPERS, "firmware-boot", str(disk), "bios"], stdout=bios_out)
                if uefi_out.read_bytes() != bios_out.read_bytes():
                    raise BenchError("the boot under OVMF printed something else than the boot under SeaBIOS")
            row.note = "one --firmware both disk; same kernel, initramfs and output"
        remove(*artifact_files(disk), uefi_out, bios_out)

    # -- 5: reading images -------------------------------------------------------------------------------

    def read(self, fx: Fixture) -> None:
        inspect = Row("inspect (verify every blob)", fx.name, "skopeo inspect", fx.uncompressed)
        flat = Row("flatten to /dev/null", fx.name, "umoci unpack", fx.uncompressed)
        self.rows += [inspect, flat]
        bundle = self.work / "umoci-bundle"
        with self.guarded(inspect, flat):
            for i in range(self.repeat):
                say(f"inspect and flatten [{fx.name}] run {i + 1}/{self.repeat}")
                self.run(inspect, "imgconv", [IMGCONV, "inspect", fx.ref])
                self.run(inspect, "peer", ["skopeo", "inspect", fx.ref])
                self.run(flat, "imgconv", [PY, HELPERS, "flatten", fx.ref])
                self.run(flat, "peer", unpack_cmd(fx, bundle, rootless=True))
                remove(bundle)
        inspect.note = "peer verifies nothing"
        flat.note = "peer writes the files to the host"
        if flat.mine and flat.theirs:
            mine, theirs = median([s.seconds for s in flat.mine]), median([s.seconds for s in flat.theirs])
            self.notes.append(f"flatten throughput [{fx.name}] over {fx.uncompressed / MiB:.1f} MiB of layer tar: "
                              f"imgconv {fx.uncompressed / MiB / mine:.0f} MiB/s, "
                              f"umoci unpack {fx.uncompressed / MiB / theirs:.0f} MiB/s (both incl. start-up)")
        if inspect.mine:
            own = median([s.own_rss for s in inspect.mine])
            self.notes.append(f"imgconv inspect [{fx.name}] peak RSS {own / MiB:.0f} MiB (own process) vs largest "
                              f"layer {fx.largest_compressed / MiB:.1f} MiB compressed / "
                              f"{fx.largest_uncompressed / MiB:.1f} MiB uncompressed")


def built_incrementally(returncode: int, stderr_text: str) -> bool:
    """measure's check of the incremental row: the conversion succeeded and its note says it built on a store
    version; a full build instead fails the row with the conversion's own reason."""
    if returncode != 0:
        return False
    notes = []
    for line in stderr_text.splitlines():
        with suppress(ValueError):
            event = json.loads(line) if line.startswith("{") else None
            if isinstance(event, dict) and event.get("event") == "note":
                notes.append(str(event.get("message", "")))
    if any(note.startswith("incremental: building on ") for note in notes):
        return True
    why = next((note for note in notes if note.startswith("incremental:")), "it printed no incremental note")
    raise BenchError(f"the rebuild into the store was not incremental: {why}", stderr_text)


def _top_down(fx: Fixture) -> Iterator[tarfile.TarFile]:
    """The fixture's layer tars, the last layer first (streamed: the fixtures' layers are gzip or plain tar)."""
    root = fx.oci_dir
    index = json.loads((root / "index.json").read_text())

    def blob(digest: str) -> Path:
        return root / "blobs" / "sha256" / digest.removeprefix("sha256:")

    manifest = json.loads(blob(index["manifests"][0]["digest"]).read_bytes())
    for desc in reversed(manifest["layers"]):
        with tarfile.open(blob(desc["digest"]), mode="r|*") as tar:
            yield tar


def derive_small(fx: Fixture, dest: Path) -> str:
    """An OCI layout at *dest* (tag 1): the fixture plus one small layer, as a small change to an application
    would add: three new files, the image's /etc/group with a line added, and a whiteout of one of the image's
    files. Returns what the layer does, for the row's note."""
    from tests.builders.derive import derived
    from tests.builders.layers import d, f, layer, wh

    wanted = {"etc/group", *WHITEOUT_CANDIDATES}
    found: dict[str, bytes | None] = {}  # path -> its final content (b"" for a non-file), None: deleted
    for tar in _top_down(fx):
        for member in tar:
            path = member.name.removeprefix("./").rstrip("/")
            head, _, base = path.rpartition("/")
            whiteout = base.startswith(".wh.") and base != ".wh..wh..opq"
            if whiteout:
                path = f"{head}/{base[4:]}" if head else base[4:]
            if path not in wanted or path in found:
                continue
            stream = None if whiteout or not member.isfile() else tar.extractfile(member)
            found[path] = None if whiteout else (stream.read() if stream is not None else b"")
        if wanted <= found.keys():
            break
    group = found.get("etc/group") or b"root:x:0:\n"
    gone = next((p for p in WHITEOUT_CANDIDATES if found.get(p) is not None), None)
    specs = [d("opt/bench-app"), f("opt/bench-app/app.conf", "listen = 8080\nworkers = 2\n"),
             f("opt/bench-app/run.sh", "#!/bin/sh\nexec echo bench app\n", mode=0o755),
             f("opt/bench-app/VERSION", "2\n"),
             f("etc/group", group.rstrip(b"\n") + b"\nbench:x:1000:\n")]
    if gone is not None:
        specs.append(wh(gone))
    derived(fx.oci_dir, dest, [layer(*specs)], tag="1")
    return ("3 new files, /etc/group changed" + (f", /{gone} deleted" if gone is not None else "")
            + f" ({len(layer(*specs))} bytes of tar)")


def direct_kernel_parts(fx: Fixture, disk: Path, sidecar: dict[str, Any], work: Path,
                        env: dict[str, str]) -> tuple[Path, Path, str]:
    """The kernel, initramfs and command line the disk boots with, as files on the host.

    The sidecar's boot entry names them. A host kernel is taken from /boot and its initramfs rebuilt
    (build_initramfs is byte-reproducible); any other kernel and initramfs are copied out of the disk.
    """
    from converter.boot.initbin import init_binary
    from converter.boot.initramfs import build_initramfs

    kernel = sidecar.get("kernel") or {}
    boot = sidecar.get("boot") or {}
    if not all(isinstance(boot.get(key), str) for key in ("kernel", "initrd", "cmdline")):
        raise BenchError(f"{disk}'s sidecar has no boot entry (kernel, initrd, cmdline)")
    release = str(kernel.get("release"))
    host = Path("/boot") / f"vmlinuz-{release}"
    if kernel.get("origin") == "host" and host.is_file() and (Path("/lib/modules") / release).is_dir():
        initrd = work / f"initramfs-{release}.img"
        initrd.write_bytes(build_initramfs(release, Path("/lib/modules") / release, init_binary()))
        return host, initrd, boot["cmdline"]
    out = work / "disk-boot"
    out.mkdir(exist_ok=True)
    for path in (boot["kernel"], boot["initrd"]):
        subprocess.run(["guestfish", "--ro", "--format=qcow2", "-a", str(disk), "-m", "/dev/sda1",
                        "copy-out", path, str(out)], env=env, check=True, capture_output=True)
    return out / Path(boot["kernel"]).name, out / Path(boot["initrd"]).name, boot["cmdline"]


def debian_initramfs(sidecar: dict[str, Any], work: Path) -> Path:
    """Debian's generic initramfs for the disk's (host) kernel: `mkinitramfs` with the host's own
    /etc/initramfs-tools (as /boot/initrd.img-R was made) plus DEBIAN_INITRAMFS_MODULES.

    The stock /boot/initrd.img-R cannot boot imgconv's init: the init needs virtio_console for the stream port
    `imgconv boot` gives it (and virtiofs for -v), which imgconv's own initramfs loads in its stage 1; under
    another initramfs the init starts at its stage 2 on the root, where a container image has no modules.
    """
    kernel = sidecar.get("kernel") or {}
    release = str(kernel.get("release"))
    if kernel.get("origin") != "host" or not (Path("/boot") / f"initrd.img-{release}").is_file():
        raise BenchError(f"the disk's kernel {release} is not the host's: there is no Debian initramfs for it here")
    if shutil.which("mkinitramfs") is None or not Path("/etc/initramfs-tools").is_dir():
        raise BenchError("Debian's initramfs needs initramfs-tools (mkinitramfs, /etc/initramfs-tools)")
    conf, out = work / "initramfs-tools", work / "debian-initramfs"
    remove(conf)
    shutil.copytree("/etc/initramfs-tools", conf, symlinks=True)
    with open(conf / "modules", "a") as modules:
        modules.write("".join(f"{name}\n" for name in DEBIAN_INITRAMFS_MODULES))
    made = subprocess.run(["mkinitramfs", "-d", str(conf), "-o", str(out), release], capture_output=True, text=True,
                          check=False)
    remove(conf)
    if made.returncode != 0:
        raise BenchError(f"mkinitramfs exited {made.returncode}: {made.stderr[-600:]}", made.stderr)
    return out


def disk_with_mount_points(disk: Path, work: Path, env: dict[str, str]) -> tuple[Path, list[str]]:
    """*disk* if its root has MOUNT_POINTS, else a copy with the missing ones added, and which they were.

    initramfs-tools moves /dev, /run, /sys and /proc onto the root and runs init= with ROOT/dev/console as its
    stdio: without them its /init exits and the kernel panics ("Attempted to kill init"). imgconv's own stage 1
    needs none of them (its stage 2 makes them), so an image such as busybox has none.
    """
    probe = subprocess.run(["guestfish", "--ro", "--format=qcow2", "-a", str(disk), "-m", "/dev/sda1", "--",
                            *[arg for path, _mode in MOUNT_POINTS for arg in ("is-dir", path, ":")][:-1]],
                           env=env, capture_output=True, text=True, check=False)
    answers = probe.stdout.split()
    if probe.returncode != 0 or len(answers) != len(MOUNT_POINTS):
        raise BenchError(f"guestfish could not look into {disk}: {probe.stderr[-600:]}", probe.stderr)
    missing = [(path, mode) for (path, mode), answer in zip(MOUNT_POINTS, answers, strict=True) if answer != "true"]
    if not missing:
        return disk, []
    copy = work / "mount-points.qcow2"
    shutil.copyfile(disk, copy)
    made = subprocess.run(["guestfish", "--format=qcow2", "-a", str(copy), "-m", "/dev/sda1", "--",
                           *[arg for path, mode in missing for arg in ("mkdir-mode", path, mode, ":")][:-1]],
                          env=env, capture_output=True, text=True, check=False)
    if made.returncode != 0:
        raise BenchError(f"guestfish could not add {' '.join(p for p, _m in missing)}: {made.stderr[-600:]}",
                         made.stderr)
    return copy, [path for path, _mode in missing]


# -- output -----------------------------------------------------------------------------------------------


def _mib(n: float) -> str:
    return f"{n / MiB:.0f} MiB"


def _cell_seconds(samples: list[Sample]) -> str:
    return f"{median([s.seconds for s in samples]):.2f} s" if samples else "–"


def _goal_cell(row: Row, ratio: float | None) -> str:
    if row.goal is None:
        return "–"
    if ratio is None:
        return f"≤ {row.goal:.2f}×"
    return f"≤ {row.goal:.2f}×: {'met' if ratio <= row.goal else 'missed'}"


def table(rows: list[Row]) -> str:
    lines = [
        "| task | image | imgconv | peer | peer time | ratio | goal | CPU ratio | imgconv peak RSS (tree / own) "
        "| peer peak RSS | imgconv RSS ÷ image |",
        "|---|---|--:|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        if row.peer == MEMORY_ONLY:
            continue
        if row.error and not (row.mine and row.theirs):
            # 200 characters: the reason must be readable (a row that cannot be measured says why here)
            lines.append(f"| {row.task} | {row.image} | {_cell_seconds(row.mine)} | {row.peer} | "
                         f"{_cell_seconds(row.theirs)} | failed: {row.error[:200].replace('|', '/')} | "
                         f"{_goal_cell(row, None)} | | | | |")
            continue
        mine = median([s.seconds for s in row.mine])
        theirs = median([s.seconds for s in row.theirs])
        tree = median([s.tree_rss for s in row.mine])
        own = median([s.own_rss for s in row.mine])
        peer_rss = median([s.tree_rss for s in row.theirs])
        ratio = f"**{mine / theirs:.2f}×**" if theirs > 0 else "–"
        goal = _goal_cell(row, mine / theirs if theirs > 0 else None)
        cpu_mine, cpu_theirs = median([s.cpu for s in row.mine]), median([s.cpu for s in row.theirs])
        cpu = f"{cpu_mine / cpu_theirs:.2f}×" if cpu_theirs >= 0.05 else "–"
        lines.append(
            f"| {row.task} | {row.image} | {mine:.2f} s | {row.peer} | {theirs:.2f} s | {ratio} | {goal} | {cpu} | "
            f"{_mib(tree)} / {_mib(own)} | {_mib(peer_rss)} | {tree / row.image_bytes:.1f}× |"
        )
    return "\n".join(lines)


def memory_rows(rows: list[Row]) -> list[Row]:
    """One row per (conversion, image) with imgconv samples: the build and export rows' own, or the memory
    group's where those did not run."""
    seen: dict[tuple[str, str], Row] = {}
    for row in rows:
        if row.task in ("oci-to-qcow2", "vm-to-oci") and row.mine and (row.task, row.image) not in seen:
            seen[(row.task, row.image)] = row
    return list(seen.values())


MEMORY_SENTENCE = ("Own: the `VmHWM` of imgconv's Python process; tree: the largest sum of RSS over it and its "
                   "descendants, sampled every 50 ms; the largest over the runs: for the busybox and debian "
                   "fixtures the table's own runs, for `large` (about 1 GB of Debian packages in one layer, built "
                   "for `make bench` only) one run of each conversion.")
MEMORY_INTRO = (f"Peak memory of the conversions, goal: imgconv's own process at most {OWN_RSS_GOAL // MiB} MiB "
                "whatever the image size (issue 13); the tree's peak (the libguestfs appliance's qemu included) "
                "beside it.")


def memory_table(rows: list[Row]) -> str:
    lines = ["| task | image | image (layer tar) | imgconv own peak RSS | goal | tree peak RSS | of which qemu | "
             "time | runs |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    for row in memory_rows(rows):
        own = max(s.own_rss for s in row.mine)  # the worst run: a bound must hold for every run
        tree = max(s.tree_rss for s in row.mine)
        qemu = max(s.by_comm.get("qemu-system-x86", 0) for s in row.mine)
        met = "met" if own <= OWN_RSS_GOAL else f"missed by {_mib(own - OWN_RSS_GOAL)}"
        lines.append(f"| {row.task} | {row.image} | {_mib(row.image_bytes)} | {_mib(own)} | "
                     f"≤ {OWN_RSS_GOAL // MiB} MiB: {met} | {_mib(tree)} | {_mib(qemu)} | "
                     f"{median([s.seconds for s in row.mine]):.1f} s | {len(row.mine)} |")
    failed = [r for r in rows if r.peer == MEMORY_ONLY and r.error and not r.mine]
    lines += [f"| {r.task} | {r.image} | {_mib(r.image_bytes)} | failed: {r.error[:200].replace('|', '/')} "
              "| | | | | |" for r in failed]
    return "\n".join(lines)


SIZE_INTRO = (f"Disk sizes: the `oci-to-qcow2` disks of the rows above (not converted again), goal (issue 13): a 2 MB "
              f"image (busybox) gives a disk of at most {SMALL_DISK_GOALS['busybox'] // MiB} MiB on the host, and "
              f"any disk is at most {DISK_RATIO_GOAL}× its content plus kernel and initramfs. qcow2 size: the "
              "file's size (st_size); content: the regular-file bytes of the image's flattened tree (hard links "
              "once; not the layer tar, which also counts headers, padding and files later layers replace or "
              "delete); kernel + initramfs: the files the disk boots (its sidecar's boot entry: the host's vmlinuz, "
              "the initramfs rebuilt byte for byte).")


def size_table(sizes: list[DiskSize]) -> str:
    lines = ["| image | content | kernel + initramfs | qcow2 size | ratio to content + kernel + initramfs | goal |",
             "|---|--:|--:|--:|--:|--:|"]
    lines += [f"| {s.image} | {s.content / MiB:.1f} MiB | {(s.kernel + s.initramfs) / MiB:.1f} MiB "
              f"({s.kernel / MiB:.1f} + {s.initramfs / MiB:.1f}) | {s.qcow2 / MiB:.1f} MiB | {s.ratio:.2f}× | "
              f"{s.goal()} |" for s in sizes]
    return "\n".join(lines)


def step_table(rows: list[Row]) -> str:
    """Median seconds per imgconv step (from --json), for the rows whose imgconv printed steps."""
    lines = ["| imgconv step | " + " | ".join(f"{r.task} [{r.image}]" for r in rows) + " |",
             "|---|" + "--:|" * len(rows)]
    names: list[str] = []
    for row in rows:
        for sample in row.mine:
            names += [n for n in sample.steps if n not in names]
    for name in names:
        cells = [f"{median([s.steps.get(name, 0.0) for s in row.mine]):.2f}" for row in rows]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    other = [median([s.seconds - sum(s.steps.values()) for s in row.mine]) for row in rows]
    lines.append("| (outside steps: start-up, planning, exit) | " + " | ".join(f"{o:.2f}" for o in other) + " |")
    lines.append("| **total** | " + " | ".join(f"{median([s.seconds for s in r.mine]):.2f}" for r in rows) + " |")
    return "\n".join(lines)


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def machine(accel: str) -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=False)
    version = (qemu.stdout.split("\n", 1)[0].split("version ")[-1].split()[0]) if qemu.stdout else "?"
    return (f"{os.cpu_count()} cores, {mem:.0f} GiB, {accel.upper()} (KVM {'used' if accel == 'kvm' else 'unusable'}), "
            f"Linux {platform.release()}, qemu {version}")


@dataclass
class Report:
    """One bench run: what --json writes and --from-json reads back."""

    date: str
    machine: str
    repeat: int
    busy: float  # share of the machine's CPU that other processes used meanwhile
    seconds: float
    fixtures: list[Fixture]
    rows: list[Row]
    notes: list[str]
    foreign: list[ForeignImage] = field(default_factory=list)
    sizes: list[DiskSize] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "date": self.date, "machine": self.machine, "repeat": self.repeat, "busy": self.busy,
            "seconds": self.seconds, "notes": self.notes,
            "fixtures": [{**f.__dict__, "oci_dir": str(f.oci_dir)} for f in self.fixtures],
            "rows": [{"task": r.task, "image": r.image, "peer": r.peer, "image_bytes": r.image_bytes, "note": r.note,
                      "error": r.error, "imgconv": [s.__dict__ for s in r.mine],
                      "peer_samples": [s.__dict__ for s in r.theirs]} for r in self.rows],
            "foreign": [{**f.__dict__, "path": str(f.path)} for f in self.foreign],
            "sizes": [s.__dict__ for s in self.sizes],
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Report:
        fixtures = [Fixture(**{**f, "oci_dir": Path(f["oci_dir"])}) for f in doc["fixtures"]]
        rows = [Row(r["task"], r["image"], r["peer"], r["image_bytes"], [Sample(**s) for s in r["imgconv"]],
                    [Sample(**s) for s in r["peer_samples"]], r["note"], r["error"]) for r in doc["rows"]]
        foreign = [ForeignImage(**{**f, "path": Path(f["path"])}) for f in doc.get("foreign", [])]
        return cls(doc["date"], doc["machine"], doc["repeat"], doc["busy"], doc["seconds"], fixtures, rows,
                   doc["notes"], foreign, [DiskSize(**s) for s in doc.get("sizes", [])])

    def text(self) -> str:
        """What `make bench` prints."""
        out = [f"# imgconv bench, {self.date}, {self.machine}, median of {self.repeat}", "",
               f"Other processes kept {self.busy:.0%} of the machine's CPU busy during the bench"
               + (" (a busy machine: wall-time ratios are noisy, CPU ratios less so)." if self.busy > 0.1 else ".")]
        if any(row.peer != MEMORY_ONLY for row in self.rows):
            out += ["", table(self.rows)]
        if memory_rows(self.rows):
            out += ["", MEMORY_INTRO, "", memory_table(self.rows)]
        if self.sizes:
            out += ["", SIZE_INTRO, "", size_table(self.sizes)]
        built = [r for r in self.rows if r.mine and r.mine[0].steps and r.peer != "no-VM floor"]
        if built:
            out += ["", "Where imgconv's time goes (median seconds per step, from --json):", "", step_table(built)]
        out.append("")
        out += [f"- {note}" for note in self.notes]
        out += [f"- {image.describe()}" for image in self.foreign]
        shown: set[tuple[str, str]] = set()
        for row in self.rows:
            rss = median([s.by_comm.get("qemu-system-x86", 0) for s in row.mine]) if row.mine else 0
            if rss and row.peer != MEMORY_ONLY and (row.task, row.image) not in shown:  # rows may share samples
                shown.add((row.task, row.image))
                out.append(f"- {row.task} [{row.image}]: of the imgconv peak, qemu {_mib(rss)}")
        out += [f"- {row.task} vs {row.peer} [{row.image}]: {row.note}" for row in self.rows if row.note]
        out += ["", f"(bench took {self.seconds:.0f}s)"]
        return "\n".join(out)

    def readme_section(self) -> str:
        used = [p for p in PEERS if any(r.peer == p for r in self.rows)]
        images = "; ".join([*(f"{f.name}: {f.layers} layer{'s' if f.layers > 1 else ''}, {f.compressed / MiB:.1f} "
                               f"MiB compressed, {f.uncompressed / MiB:.1f} MiB of tar" for f in self.fixtures),
                            *(image.describe() for image in self.foreign)])
        return "\n".join([
            "## Benchmarks",
            "",
            f"`make bench` ({self.date[:10]}, {self.machine}, other processes using {self.busy:.0%} of the CPU "
            f"meanwhile; median of {self.repeat}; rows and peers explained in [bench/README.md](bench/README.md)). "
            "Ratio = imgconv ÷ peer in wall time, so above 1 imgconv is slower; CPU ratio is the same for the CPU "
            "seconds of the whole process tree, steadier on a shared machine. RSS is the peak of the whole process "
            "tree (the appliance's qemu included) / imgconv's own Python process. Goal: issue 13's bound on the "
            "ratio, and whether this run met it. "
            f"Images: {images}.",
            "",
            table(self.rows),
            "",
            *[f"- **{p}**: {PEERS[p]}" for p in used],
            "",
            *([MEMORY_INTRO + " " + MEMORY_SENTENCE, "", memory_table(self.rows), ""] if memory_rows(self.rows)
              else []),
            *([SIZE_INTRO, "", size_table(self.sizes), ""] if self.sizes else []),
        ])


def write_readme(section: str) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    match = re.search(r"^## Benchmarks\n.*?(?=^## |\Z)", text, flags=re.S | re.M)
    if match is None:
        raise BenchError("README.md has no '## Benchmarks' section")
    readme.write_text(text[: match.start()] + section + ("\n" if match.end() < len(text) else "") + text[match.end():])


# -- main -------------------------------------------------------------------------------------------------


def _on_term(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the median is shown (3)")
    parser.add_argument("--quick", action="store_true", help="one run per measurement (--repeat 1)")
    parser.add_argument("--images", default=",".join(DEFAULT_IMAGES),
                        help=f"fixture images ({','.join(DEFAULT_IMAGES)}; {','.join(MEMORY_ONLY_IMAGES)} only runs "
                             f"the memory and size groups, {','.join(FOREIGN_IMAGES)} only the export group)")
    parser.add_argument("--groups", default=",".join(GROUPS),
                        help=f"which rows: {','.join(GROUPS)} (export, boot and size use the disk build makes)")
    parser.add_argument("--json", type=Path, help="also write every sample here")
    parser.add_argument("--write-readme", action="store_true", help="replace README.md's Benchmarks section")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs of every run)")
    parser.add_argument("--from-json", type=Path, help="measure nothing: show (and --write-readme) a --json file")
    args = parser.parse_args(argv)
    if args.from_json:
        report = Report.from_json(json.loads(args.from_json.read_text()))
        print(report.text())
        if args.write_readme:
            write_readme(report.readme_section())
            say("README.md's Benchmarks section updated")
        return 0
    repeat = 1 if args.quick else args.repeat
    if repeat < 1:
        parser.error("--repeat must be at least 1")
    names = [n for n in args.images.split(",") if n]
    groups = [g for g in args.groups.split(",") if g]
    if unknown := [g for g in groups if g not in GROUPS]:
        parser.error(f"unknown groups {unknown}; choose from {', '.join(GROUPS)}")
    if "memory" not in groups and (skipped := [n for n in names if n in MEMORY_ONLY_IMAGES]):
        say(f"{', '.join(skipped)}: only the memory group runs on it, and it was not asked for")
        names = [n for n in names if n not in skipped]  # nothing runs on them: not even built
    if "export" not in groups and (skipped := [n for n in names if n in FOREIGN_IMAGES]):
        say(f"{', '.join(skipped)}: only the export group runs on it, and it was not asked for")
        names = [n for n in names if n not in skipped]
    signal.signal(signal.SIGTERM, _on_term)
    become_subreaper()

    started = time.monotonic()
    busy_start, own_start = busy_cpu_seconds(), own_cpu_seconds()
    try:
        require_tools()
        env, accel = bench_env()
        from converter.boot.initbin import init_binary

        init_binary()  # compiled once and cached: not part of any measurement
        fixtures = [load_fixture(n) for n in names if n not in FOREIGN_IMAGES]
    except BenchError as exc:
        say(str(exc))
        return 1
    work = Path(tempfile.mkdtemp(prefix="imgconv-bench-"))
    bench = Bench(work, repeat, env)
    by_name = {fx.name: fx for fx in fixtures}
    try:
        for name in names:
            if name in FOREIGN_IMAGES:
                bench.export_foreign(name)
            else:
                bench.image(by_name[name], groups)
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        reap_at_exit()
        if args.keep:
            say(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    elapsed = time.monotonic() - started
    others = (busy_cpu_seconds() - busy_start) - (own_cpu_seconds() - own_start)
    report = Report(f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC", machine(accel), repeat,
                    max(0.0, others / (elapsed * (os.cpu_count() or 1))), elapsed, fixtures, bench.rows, bench.notes,
                    bench.foreign, bench.sizes)
    print(report.text())
    if args.json:
        args.json.write_text(json.dumps(report.to_json(), indent=1))
    if args.write_readme:
        write_readme(report.readme_section())
        say("README.md's Benchmarks section updated")
    return 1 if bench.failed else 0


if __name__ == "__main__":
    sys.exit(main())
