"""The judges of vm-to-oci's output, none of them imgconv: umoci unpacks, skopeo reads and copies, the
host's own stat/xattr calls read what umoci wrote; and of oci-to-qcow2's: GNU tar in a libguestfs appliance
reads a disk's root filesystem (`tar_out`). (imgconv itself is run by tests/cli.py.)
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
import time
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

from tests.treecmp import Entry, normalize


def tool(*argv: str, timeout: float = 600) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, errors="replace", stdin=subprocess.DEVNULL,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc.stdout


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def skopeo_inspect(ref: str, *extra: str) -> dict[str, Any]:
    return dict(json.loads(tool("skopeo", "inspect", *extra, ref)))


# -- trees -------------------------------------------------------------------------------------------------------


def tree_from_dir(root: Path) -> dict[str, Entry]:
    """A tree as the host sees it (lstat, listxattr, readlink, sha256), hard links grouped by inode."""
    tree: dict[str, Entry] = {}
    inodes: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            mode, perms = st.st_mode, stat.S_IMODE(st.st_mode)
            xattrs = tuple(sorted((x, os.getxattr(full, x, follow_symlinks=False))
                                  for x in os.listxattr(full, follow_symlinks=False)))
            if stat.S_ISREG(mode):
                digest = hashlib.sha256()
                with open(full, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        digest.update(chunk)
                tree[rel] = Entry("file", perms, st.st_uid, st.st_gid, st.st_size, digest.hexdigest(), xattrs=xattrs)
                if st.st_nlink > 1:
                    inodes.setdefault(st.st_ino, []).append(rel)
            elif stat.S_ISDIR(mode):
                tree[rel] = Entry("dir", perms, st.st_uid, st.st_gid, xattrs=xattrs)
            elif stat.S_ISLNK(mode):
                tree[rel] = Entry("symlink", perms, st.st_uid, st.st_gid, linkname=os.readlink(full), xattrs=xattrs)
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                tree[rel] = Entry("char" if stat.S_ISCHR(mode) else "block", perms, st.st_uid, st.st_gid,
                                  devmajor=os.major(st.st_rdev), devminor=os.minor(st.st_rdev), xattrs=xattrs)
            elif stat.S_ISFIFO(mode):
                tree[rel] = Entry("fifo", perms, st.st_uid, st.st_gid, xattrs=xattrs)
            else:
                raise AssertionError(f"unexpected file type {mode:o} at {rel}")
    for group in inodes.values():
        leader = min(group)
        for path in group:
            if path != leader:
                tree[path] = dataclasses.replace(tree[path], hardlink=leader)
    return tree


def umoci_tree(layout: Path, tag: str, work: Path) -> dict[str, Entry]:
    """`umoci unpack` (as root: owners, modes, devices, xattrs applied) and the host's view of its rootfs."""
    bundle = work / f"umoci-{layout.name}-{tag}"
    shutil.rmtree(bundle, ignore_errors=True)
    tool("umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle))
    try:
        return tree_from_dir(bundle / "rootfs")
    finally:
        shutil.rmtree(bundle, ignore_errors=True)


# -- OCI layouts, read directly ---------------------------------------------------------------------------------


def blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()


def manifest_of(layout: Path, tag: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(manifest digest, manifest, config) of the image tagged `tag` in an OCI layout."""
    index = json.loads((layout / "index.json").read_bytes())
    found = [m for m in index["manifests"]
             if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag]
    assert len(found) == 1, index
    digest = found[0]["digest"]
    manifest = json.loads(blob(layout, digest))
    assert hashlib.sha256(blob(layout, digest)).hexdigest() == digest.removeprefix("sha256:")
    config = json.loads(blob(layout, manifest["config"]["digest"]))
    return digest, manifest, config


def layer_tar(layout: Path, descriptor: Mapping[str, Any]) -> bytes:
    """A layer's uncompressed tar, its compressed digest checked on the way."""
    raw = blob(layout, descriptor["digest"])
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == descriptor["digest"]
    media = descriptor["mediaType"]
    if media.endswith("+gzip") or media.endswith(".tar.gzip"):
        return gzip.decompress(raw)
    if media.endswith("+zstd"):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)).read()
    return raw


def tar_names(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return tar.getnames()


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# -- disks, read by GNU tar in an appliance ----------------------------------------------------------------------


def tar_out(disks: dict[str, Path], dest: Path) -> dict[str, Path]:
    """Each qcow2 disk's root filesystem (its first partition) as GNU tar in one libguestfs appliance reads it
    (numeric owners, xattrs): name -> the tar, written under *dest*."""
    import guestfs  # type: ignore[import-not-found]

    from converter.boot.accel import configure_guestfs

    g = guestfs.GuestFS(python_return_dict=True)
    configure_guestfs(g)
    g.set_network(False)
    for disk in disks.values():
        g.add_drive_opts(str(disk), format="qcow2", readonly=True)
    g.launch()
    out = {}
    devices = g.list_devices()
    for device, name in zip(devices, disks, strict=True):
        g.mount_ro(f"{device}1", "/")
        out[name] = dest / f"{name}.tar"
        g.tar_out("/", str(out[name]), numericowner=True, xattrs=True)
        g.umount("/")
    g.shutdown()
    g.close()
    return out


def tar_times(tar: Path | bytes) -> dict[str, Decimal]:
    """path -> mtime to the nanosecond, as the tar's headers give it (a PAX record where there is a fraction)."""
    with tarfile.open(fileobj=io.BytesIO(tar)) if isinstance(tar, bytes) else tarfile.open(tar) as opened:
        return {normalize(m.name): Decimal(m.pax_headers.get("mtime", str(m.mtime))) for m in opened}




class Jobs:
    """Slow, appliance-bound work started early and run a few at a time, while tests wait only for what they
    need. libguestfs appliances spend much of their time waiting, so two at once nearly halve the wall time on
    two cores ($IMGCONV_TEST_JOBS changes the number). A job's exception is raised in the test that asks for
    its result.

    Jobs are defined up front, started (in the order given) for the tests that were selected, and any other
    one is started when a test asks for it: the selection only saves work, it is never needed to be right.
    `start` and `[]` are called from the main thread only; a job's `prepare` (e.g. a session fixture that is
    not thread-safe) runs there, its result passed to the job as the first argument.
    """

    def __init__(self, workers: int | None = None) -> None:
        from concurrent.futures import Future, ThreadPoolExecutor

        workers = workers or int(os.environ.get("IMGCONV_TEST_JOBS", "2"))
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vm-to-oci-job")
        self._futures: dict[str, Future[Any]] = {}
        self._defined: dict[str, tuple[Any, tuple[Any, ...], dict[str, Any], Any]] = {}
        self.timings: dict[str, tuple[float, float]] = {}  # key -> (started after, seconds)
        self._created = time.monotonic()

    def define(self, key: str, fn: Any, *args: Any, prepare: Any = None, **kwargs: Any) -> None:
        assert key not in self._defined, key
        self._defined[key] = (fn, args, kwargs, prepare)

    def start(self, *keys: str) -> None:
        for key in keys:
            if key not in self._futures:
                fn, args, kwargs, prepare = self._defined[key]
                if prepare is not None:
                    args = (prepare(), *args)
                self._futures[key] = self._pool.submit(self._timed, key, fn, *args, **kwargs)

    def _timed(self, key: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        try:
            return fn(*args, **kwargs)
        finally:
            self.timings[key] = (started - self._created, time.monotonic() - started)

    def __getitem__(self, key: str) -> Any:
        self.start(key)
        return self._futures[key].result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        log = os.environ.get("IMGCONV_TEST_JOB_LOG")  # where to append when each job ran, for tuning
        if log:
            with open(log, "a") as out:
                for key, (start, seconds) in sorted(self.timings.items(), key=lambda kv: kv[1][0]):
                    out.write(f"{key:24} started at {start:6.1f} s, took {seconds:6.1f} s\n")


def selected(request: Any) -> list[tuple[str, dict[str, Any]]]:
    """(test function name, its parameters) of each selected test of the requesting module."""
    return [(item.originalname, dict(getattr(item, "callspec", None).params if hasattr(item, "callspec") else {}))
            for item in request.session.items if getattr(item, "module", None) is request.module]
