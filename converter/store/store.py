"""The store: content-addressed, read-only versions, and tags that move over them with their history.

Layout of a store directory (``--store DIR``, else ``IMGCONV_STORE``, else ``$XDG_DATA_HOME/imgconv/store``)::

    lock                       flock(2): exclusive for whoever changes tags or objects, shared to resolve a tag
    objects/sha256/HEX         a version: a disk (0444), named by its sha256, never rewritten
    objects/sha256/HEX.json    its sidecar (0444), placed before the disk, so a version never lacks it
    tags/NAME:TAG.json         a tag: its history, newest first (NAME's '/' written as '+'); atomic_write only
    tmp/                       disks being written (a conversion's temporary files, named after their pid)
    uses/PID-N                 one per reader (boot, vm-to-oci, commit): it names the version and is flock'ed
                               as long as the reader runs, so gc leaves that version alone

Why it stays consistent however it is interrupted: a disk is written under tmp/ and only *linked* to its
object name once complete (and fsync'ed), under the exclusive lock, and the tag file is replaced after that
(write-then-link); a kill leaves at most a temporary file (which ``gc`` removes once its process is gone) or an
object no tag names yet (which ``gc`` removes). ``gc`` holds the exclusive lock, so it never sees a version
linked but not yet tagged, and readers take their use lock while holding the shared one, so gc never sees a
version resolved but not yet marked in use. Hashing a disk happens before the lock: writers wait only for
renames.

A tag's history is a log: each entry is the version the tag was moved to, when and how (``write``: a
conversion, ``commit``, ``tag``, ``rollback``), and which entry a rollback returns to (``back``: the entry that
was current before it). A rollback is itself an entry whose ``back`` is that of the entry it returned to, so a
second rollback goes one more version back, and the versions rolled back from stay in the history (kept by gc;
``store tag store:NAME@sha256:...`` moves the tag forward again).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from converter.artifact import READ_ONLY, atomic_write, sha256_file, sync_dir
from converter.epoch import timestamp
from converter.errors import UsageError
from converter.store.reference import StoreRef, is_store_ref, parse_store_ref

TAG_FILE_VERSION = 1
WORK_NAME = "version"  # conversions into the store write tmp/.version.imgconv-HOST-PID-*

_chosen_root: list[Path] = []


class StoreError(UsageError):
    """The store cannot do what was asked: no such tag, nothing to roll back to, a damaged tag file."""


def choose_root(path: Path) -> None:
    """The global ``--store DIR``: wins over IMGCONV_STORE for the rest of this run."""
    _chosen_root[:] = [Path(os.path.abspath(path))]


def store_root() -> Path:
    """``--store``, else ``IMGCONV_STORE``, else ``$XDG_DATA_HOME/imgconv/store`` (XDG: only an absolute
    XDG_DATA_HOME counts; the default is ~/.local/share)."""
    if _chosen_root:
        return _chosen_root[0]
    if os.environ.get("IMGCONV_STORE"):
        return Path(os.path.abspath(os.environ["IMGCONV_STORE"]))
    data = os.environ.get("XDG_DATA_HOME", "")
    base = Path(data) if os.path.isabs(data) else Path.home() / ".local" / "share"
    return base / "imgconv" / "store"


@dataclass(frozen=True)
class Entry:
    """One move of a tag (module docstring): to which version, when, how, and where a rollback returns."""

    n: int
    sha256: str
    source: str  # the image the version was made from (for a commit: its base's)
    created: str  # when the version was made
    tagged: str  # when the tag was moved to it
    how: str  # write | commit | tag | rollback
    back: int | None  # the entry a rollback from this one returns to


@dataclass(frozen=True)
class Tag:
    name: str
    tag: str
    entries: tuple[Entry, ...]  # newest first; entries[0] is what the tag points at

    @property
    def current(self) -> Entry:
        return self.entries[0]

    def __str__(self) -> str:
        return f"{self.name}:{self.tag}"


@dataclass(frozen=True)
class Version:
    sha256: str
    path: Path
    sidecar: dict[str, Any]


@dataclass(frozen=True)
class GcReport:
    versions: tuple[str, ...]  # sha256 of each version deleted
    temporary: tuple[str, ...]  # temporary files of killed runs, deleted
    in_use: tuple[str, ...]  # versions no tag keeps that a running boot (or other reader) still uses
    freed: int  # bytes of disk space


def _now() -> str:
    return timestamp(int(time.time()))


def _host() -> str:
    return socket.gethostname().replace("-", "_").replace("/", "_") or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_TEMP_RE = re.compile(r"^\..*\.imgconv-(?P<host>[^-]+)-(?P<pid>\d+)-")


def abandoned(path: Path) -> bool:
    """A temporary file (artifact.py's naming) of a process of this host that no longer exists."""
    match = _TEMP_RE.match(path.name)
    return bool(match) and match["host"] == _host() and not _alive(int(match["pid"]))  # type: ignore[index]


def _fsync(path: Path) -> None:
    """The disk's bytes on stable storage before its name says it is a complete version."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link(finished: Path, obj: Path) -> None:
    """*finished* under its version's name. A link never replaces (a version's bytes never change); where the
    filesystem has no hard links, a rename does the same, since the caller holds the lock and *obj* is absent."""
    try:
        os.link(finished, obj)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        os.rename(finished, obj)


def _allocated(path: Path) -> int:
    """Bytes *path* holds on disk (a directory with what is in it)."""
    try:
        own = path.lstat()
        inside = path.rglob("*") if stat.S_ISDIR(own.st_mode) else ()
        return own.st_blocks * 512 + sum(_allocated(p) for p in inside if not p.is_dir() or p.is_symlink())
    except FileNotFoundError:
        return 0


class Store:
    """One store directory (module docstring). Methods that change it take the exclusive lock themselves."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.objects = root / "objects" / "sha256"
        self.tags_dir = root / "tags"
        self.tmp = root / "tmp"
        self.uses = root / "uses"

    def ensure(self) -> None:
        """Create the store's directories (a first write); say so in one line if it cannot be."""
        try:
            for directory in (self.objects, self.tags_dir, self.tmp, self.uses):
                directory.mkdir(parents=True, exist_ok=True)
            (self.root / "lock").touch(exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the store {self.root}: {exc.strerror}") from exc

    @property
    def work_path(self) -> Path:
        """Where a conversion into the store writes its disk (temporary names beside it, in tmp/)."""
        return self.tmp / WORK_NAME

    @contextmanager
    def locked(self, exclusive: bool) -> Iterator[None]:
        lock = self.root / "lock"
        try:
            fd = os.open(lock, (os.O_RDWR | os.O_CREAT) if exclusive else os.O_RDONLY, 0o644)
        except FileNotFoundError as exc:
            raise StoreError(f"the store {self.root} is empty: nothing was converted or committed into it") from exc
        except OSError as exc:
            raise StoreError(f"cannot lock the store {self.root}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # releases the lock

    # -- tags ---------------------------------------------------------------------------------------------------

    def _tag_file(self, name: str, tag: str) -> Path:
        return self.tags_dir / f"{name.replace('/', '+')}:{tag}.json"

    def read_tag(self, name: str, tag: str) -> Tag | None:
        path = self._tag_file(name, tag)
        try:
            doc = json.loads(path.read_text())
            if doc.get("imgconv-store-tag") != TAG_FILE_VERSION:
                raise ValueError("not an imgconv store tag file")
            return Tag(doc["name"], doc["tag"], tuple(Entry(**entry) for entry in doc["entries"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            raise StoreError(f"the store's tag file {path} is damaged: {exc}") from exc

    def _write_tag(self, tag: Tag) -> None:
        doc = {"imgconv-store-tag": TAG_FILE_VERSION, "name": tag.name, "tag": tag.tag,
               "entries": [asdict(entry) for entry in tag.entries]}
        atomic_write(self._tag_file(tag.name, tag.tag), (json.dumps(doc, indent=2) + "\n").encode())

    def tags(self) -> list[Tag]:
        """Every tag, by name and tag (temporary files of atomic writes, hidden, are not tags)."""
        if not self.tags_dir.is_dir():
            return []
        found = []
        for path in sorted(self.tags_dir.glob("[!.]*.json")):
            name, _, tag = path.name.removesuffix(".json").rpartition(":")
            read = self.read_tag(name.replace("+", "/"), tag)
            if read is not None:
                found.append(read)
        return sorted(found, key=lambda t: (t.name, t.tag))

    def _need_tag(self, ref: StoreRef) -> Tag:
        found = self.read_tag(ref.name, ref.tag)
        if found is None:
            raise StoreError(f"{ref} does not exist in the store {self.root}")
        return found

    def _move(self, ref: StoreRef, entry: Entry) -> Entry:
        """Point *ref* at *entry*'s version, keeping the history; moving it to the version it holds changes
        nothing (a rebuild with the same bytes)."""
        old = self.read_tag(ref.name, ref.tag)
        entries = old.entries if old is not None else ()
        if entries and entries[0].sha256 == entry.sha256:
            return entries[0]
        new = Entry(**{**asdict(entry), "n": 1 + max((e.n for e in entries), default=0),
                       "back": entries[0].n if entries else None})
        self._write_tag(Tag(ref.name, ref.tag, (new, *entries)))
        return new

    # -- versions -----------------------------------------------------------------------------------------------

    def object_path(self, sha256: str) -> Path:
        return self.objects / sha256.removeprefix("sha256:")

    def sidecar(self, sha256: str) -> dict[str, Any]:
        """The version's sidecar, or {} when it is missing or not a JSON object."""
        path = self.object_path(sha256)
        try:
            sidecar = json.loads(path.with_name(path.name + ".json").read_text())
        except (OSError, ValueError):
            return {}
        return sidecar if isinstance(sidecar, dict) else {}

    def _version(self, sha256: str, what: str) -> Version:
        path = self.object_path(sha256)
        if not path.is_file():
            raise StoreError(f"{what}: its version {sha256} is missing from the store {self.root} (damaged store)")
        return Version(sha256, path, self.sidecar(sha256))

    def resolve(self, ref: StoreRef) -> Version:
        """The version *ref* names (the caller holds the lock)."""
        if ref.digest is None:
            return self._version(self._need_tag(ref).current.sha256, str(ref))
        if not any(e.sha256 == ref.digest for t in self.tags() if t.name == ref.name for e in t.entries):
            raise StoreError(f"{ref} is not a version of {ref.name} in the store {self.root}")
        return self._version(ref.digest, str(ref))

    def use(self, ref: StoreRef) -> contextlib.AbstractContextManager[Version]:
        """The version *ref* names, kept from gc while the block runs (a flock'ed file in uses/ naming it)."""
        return self._held(lambda: self.resolve(ref))

    def use_digest(self, sha256: str) -> contextlib.AbstractContextManager[Version]:
        """The version with this sha256, kept from gc while the block runs."""
        return self._held(lambda: self._version(sha256, sha256))

    @contextmanager
    def _held(self, find: Callable[[], Version]) -> Iterator[Version]:
        with self.locked(exclusive=False):  # gc (exclusive) sees the version either unresolved or marked
            version = find()
            marker = self._mark_in_use(version.sha256)
        try:
            yield version
        finally:
            if marker is not None:
                marker[0].unlink(missing_ok=True)
                os.close(marker[1])

    def _mark_in_use(self, sha256: str) -> tuple[Path, int] | None:
        path = self.uses / f"{os.getpid()}-{time.monotonic_ns()}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as exc:  # a store this user may read but not write: nobody else can gc it either
            if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
                return None
            raise StoreError(f"cannot mark {sha256} in use in the store {self.root}: {exc.strerror}") from exc
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, sha256.encode())
        return path, fd

    def publish(self, finished: Path, sidecar: dict[str, Any], ref: StoreRef, how: str = "write",
                statement: Callable[[str], bytes] | None = None) -> dict[str, Any]:
        """*finished* (a complete disk in tmp/) becomes a read-only version and *ref* moves to it; returns the
        sidecar as recorded. The bytes are hashed and synced before the lock; under it the sidecar (and the
        provenance statement *statement* renders from the sha256, ``HEX.intoto.json``, which `imgconv verify`
        and `store push` read) and the disk are linked in (an existing version of the same bytes is kept as it
        is), then the tag moves."""
        os.chmod(finished, READ_ONLY)
        _fsync(finished)
        record = {**sidecar, "sha256": sha256_file(finished), "size": finished.stat().st_size}
        obj = self.object_path(record["sha256"])
        side = obj.with_name(obj.name + ".json")
        data = (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
        with self.locked(exclusive=True):
            proof = obj.with_name(obj.name + ".intoto.json")
            if statement is not None and not proof.exists():
                atomic_write(proof, statement(record["sha256"]), READ_ONLY)
            if not obj.exists():
                atomic_write(side, data, READ_ONLY)
                _link(finished, obj)
                sync_dir(obj.parent)
            elif not side.exists():
                atomic_write(side, data, READ_ONLY)
            self._move(ref, Entry(0, record["sha256"], str(record.get("source", "")),
                                  str(record.get("created", "")), _now(), how, None))
        return record

    # -- the store commands -------------------------------------------------------------------------------------

    def history(self, ref: StoreRef) -> Tag:
        with self.locked(exclusive=False):
            return self._need_tag(ref)

    def tag(self, source: StoreRef, dest: StoreRef) -> Entry:
        """``store tag SRC DST``: DST moves to the version SRC names (a tag's current one, or one by digest)."""
        with self.locked(exclusive=True):
            version = self.resolve(source)
            return self._move(dest, Entry(0, version.sha256, str(version.sidecar.get("source", "")),
                                          str(version.sidecar.get("created", "")), _now(), "tag", None))

    def rollback(self, ref: StoreRef) -> Entry:
        """The tag goes back to the version it held before its current one was written (module docstring)."""
        with self.locked(exclusive=True):
            tag = self._need_tag(ref)
            current = tag.current
            target = next((e for e in tag.entries if e.n == current.back), None)
            if target is None:
                raise StoreError(f"{ref} has no earlier version to roll back to")
            entry = Entry(1 + max(e.n for e in tag.entries), target.sha256, target.source, target.created, _now(),
                          "rollback", target.back)
            self._write_tag(Tag(tag.name, tag.tag, (entry, *tag.entries)))
            return entry

    def remove(self, ref: StoreRef) -> Tag:
        """``store rm``: the tag and its history go; its versions stay until ``gc`` (and while in use)."""
        with self.locked(exclusive=True):
            tag = self._need_tag(ref)
            self._tag_file(ref.name, ref.tag).unlink()
            sync_dir(self.tags_dir)
            return tag

    def gc(self) -> GcReport:
        """Delete every version no tag's history keeps and no reader uses, and the temporary files of runs that
        were killed (those of running conversions stay)."""
        if not (self.root / "lock").exists():
            return GcReport((), (), (), 0)
        with self.locked(exclusive=True):
            kept = {e.sha256.removeprefix("sha256:") for t in self.tags() for e in t.entries}
            in_use = self._in_use()
            deleted, freed = [], 0
            for path in sorted(self.objects.glob("[0-9a-f]*")):
                digest = path.name.split(".", 1)[0]  # HEX, HEX.json (sidecar), HEX.intoto.json (statement)
                if digest in kept or digest in in_use or not re.fullmatch(r"[0-9a-f]{64}", digest):
                    continue
                freed += _allocated(path)
                path.unlink(missing_ok=True)
                if path.name == digest:
                    deleted.append("sha256:" + digest)
            temporary = []
            for directory in (self.tmp, self.objects, self.tags_dir):
                for path in sorted(directory.glob(".*")):
                    if abandoned(path):
                        freed += _allocated(path)
                        if path.is_dir() and not path.is_symlink():  # a conversion's spool (temp_dir_beside)
                            shutil.rmtree(path, ignore_errors=True)
                        else:
                            path.unlink(missing_ok=True)
                        temporary.append(str(path))
        return GcReport(tuple(deleted), tuple(temporary), tuple(sorted("sha256:" + d for d in in_use - kept)), freed)

    def _in_use(self) -> set[str]:
        """Versions named by a use file whose reader still holds its lock; files of readers gone are removed."""
        used = set()
        for path in self.uses.glob("*"):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                used.add(os.pread(fd, 200, 0).decode("ascii", "replace").removeprefix("sha256:")[:64])
            else:
                path.unlink(missing_ok=True)
            finally:
                os.close(fd)
        return used


@dataclass(frozen=True)
class Target:
    """OUTPUT ``store:NAME[:TAG]`` of a conversion or a commit: where the disk is written, and where it goes."""

    root: Path
    ref: StoreRef

    @property
    def work_path(self) -> Path:
        return Store(self.root).work_path

    def publish(self, finished: Path, sidecar: dict[str, Any], how: str = "write",
                statement: Callable[[str], bytes] | None = None) -> dict[str, Any]:
        return Store(self.root).publish(finished, sidecar, self.ref, how, statement)


def output_target(text: str) -> Target | None:
    """OUTPUT or DEST as given: a store target (its store created if need be), or None for a file."""
    if not is_store_ref(text):
        return None
    ref = parse_store_ref(text, digest_ok=False)
    store = Store(store_root())
    store.ensure()
    return Target(store.root, ref)


@contextmanager
def disk_input(disk: str | Path) -> Iterator[Path]:
    """DISK as given: a file, or the file of the store version ``store:...`` names, kept from gc meanwhile."""
    text = str(disk)
    if not is_store_ref(text):
        yield Path(disk)
        return
    ref = parse_store_ref(text)
    with Store(store_root()).use(ref) as version:
        yield version.path


def build_output(text: str) -> tuple[Path, Target | None]:
    """oci-to-qcow2's OUTPUT: the file to write, and the store target when OUTPUT is ``store:...`` (the disk is
    then written in the store's tmp/ and linked in as a version)."""
    target = output_target(text)
    return (target.work_path, target) if target is not None else (Path(text), None)


def check_disk_reference(text: str) -> str:
    """DISK as typed: a ``store:`` reference checked here (a Path would fold ``//`` and a final ``/`` away) and
    read later by the verb's open-disk step (:func:`disk_input`); any other DISK made absolute, so that a file
    given as ``./store:x`` stays a file once a Path has dropped its ``./``."""
    if is_store_ref(text):
        parse_store_ref(text)
        return text
    return os.path.abspath(text) if text else text
