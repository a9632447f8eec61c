"""The store (converter/store/) without a VM: references, versions and tags, history and rollback, rm and gc,
readers that keep a version from gc, concurrent writers, kills at any point, and `imgconv commit` flattening a
state file over its base with real qemu-img. The integration tests (tests/integration/test_store.py) boot them."""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing
import multiprocessing.synchronize
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from converter.boot.state import open_state, record_path
from converter.disk.safety import open_disk
from converter.errors import ReferenceError_, UsageError
from converter.progress import NullMonitor
from converter.provenance import verify_disk
from converter.store.commit import CommitRequest, commit
from converter.store.reference import StoreRef, parse_store_ref
from converter.store.store import Store, StoreError, choose_root
from tests.cli import Ran, assert_one_line_error

DIGEST = "sha256:" + "ab" * 32


@pytest.fixture(autouse=True)
def _no_chosen_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """choose_root (the global --store) lasts for the process: each test starts without one."""
    from converter.store import store as module

    monkeypatch.setattr(module, "_chosen_root", [])


# -- references ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("store:app", StoreRef("app", "latest")),
    ("store:app:v1", StoreRef("app", "v1")),
    ("store:team/web-app_2.x:V_1.2-rc", StoreRef("team/web-app_2.x", "V_1.2-rc")),
    ("store:a__b--c:_", StoreRef("a__b--c", "_")),
    (f"store:app@{DIGEST}", StoreRef("app", "latest", DIGEST)),
])
def test_good_references(text: str, expected: StoreRef) -> None:
    assert parse_store_ref(text) == expected
    assert parse_store_ref(text.removeprefix("store:"), prefixed=False) == expected


@pytest.mark.parametrize(("text", "needle"), [
    ("store:", "has no name"),
    ("store::v1", "has no name"),
    ("store:UPPER", "invalid name 'UPPER'"),
    ("store:a:b:c", "invalid tag 'b:c'"),
    ("store:a:", "invalid tag ''"),
    ("store:a:.hidden", "invalid tag"),
    ("store:a:" + "t" * 129, "invalid tag"),
    ("store:a//b", "invalid name"),
    ("store:a/", "invalid name"),
    ("store:-a", "invalid name"),
    ("store:a+b", "invalid name"),
    ("store:" + "a" * 256, "invalid name"),
    ("store:a@sha256:12", "the digest must be"),
    ("store:a@" + DIGEST.upper(), "the digest must be"),
    ("app", "is not a store reference"),
])
def test_bad_references_are_one_line_usage_errors(text: str, needle: str) -> None:
    with pytest.raises(ReferenceError_, match=needle) as caught:
        parse_store_ref(text)
    assert caught.value.exit_code == 2 and "\n" not in str(caught.value)


def test_a_digest_cannot_be_written() -> None:
    with pytest.raises(ReferenceError_, match="cannot be written"):
        parse_store_ref(f"store:app@{DIGEST}", digest_ok=False)


@pytest.mark.parametrize("argv", [
    ["boot", "store:"], ["boot", "store:UPPER"], ["boot", "store:a:b:c"],
    ["vm-to-oci", "store:UPPER", "oci:out:1"], ["oci-to-qcow2", "oci:nowhere:1", "store:a:b:c"],
    ["oci-to-qcow2", "oci:nowhere:1", f"store:app@{DIGEST}"], ["commit", "state.qcow2", "store:"],
    ["store", "history", "UPPER"], ["store", "rollback", "a:b:c"], ["store", "tag", "app", "store:"],
    ["store", "rm", "app"], ["verify", "store:UPPER"], ["verify", "--rebuild", "store:a:b:c"], ["provenance", "store:"],
    ["verify", "store:app"], ["provenance", "store:app:v1"],
])
def test_the_cli_refuses_bad_references_in_one_line(imgconv: Callable[..., Ran], tmp_path: Path,
                                                    argv: list[str]) -> None:
    ran = imgconv("--store", str(tmp_path / "store"), *argv)
    assert_one_line_error(ran, code=2)
    assert not (tmp_path / "store").exists()


# -- versions, tags, history ----------------------------------------------------------------------------------------


def _disk(store: Store, content: bytes) -> Path:
    """A finished "disk" in the store's tmp/, as a conversion leaves it before publishing."""
    store.ensure()
    host = socket.gethostname().replace("-", "_").replace("/", "_")  # named as artifact.temp_beside names them
    path = store.tmp / f".version.imgconv-{host}-{os.getpid()}-{time.monotonic_ns()}.qcow2"
    path.write_bytes(content)
    return path


def _publish(store: Store, content: bytes, ref: str, source: str = "oci:src:1") -> str:
    finished = _disk(store, content)
    record = store.publish(finished, {"source": source, "created": "2026-01-01T00:00:00Z"}, parse_store_ref(ref))
    finished.unlink()
    return str(record["sha256"])


def test_two_versions_under_one_tag_history_rollback_and_roll_forward(tmp_path: Path) -> None:
    store = Store(tmp_path)
    one = _publish(store, b"one" * 1000, "store:app", "oci:src:1")
    two = _publish(store, b"two" * 1000, "store:app", "oci:src:2")
    assert one != two
    assert [(t.name, t.tag, t.current.sha256) for t in store.tags()] == [("app", "latest", two)]
    history = store.history(StoreRef("app"))
    assert [(e.sha256, e.source, e.how) for e in history.entries] == [(two, "oci:src:2", "write"),
                                                                      (one, "oci:src:1", "write")]
    with store.use(StoreRef("app")) as version:
        assert version.path.read_bytes() == b"two" * 1000
        assert version.sidecar["sha256"] == two and version.sidecar["source"] == "oci:src:2"
        assert version.path.stat().st_mode & 0o777 == 0o444

    back = store.rollback(StoreRef("app"))
    assert back.sha256 == one and back.how == "rollback"
    with store.use(StoreRef("app")) as version:
        assert version.path.read_bytes() == b"one" * 1000
    assert [e.sha256 for e in store.history(StoreRef("app")).entries] == [one, two, one]  # both kept
    with pytest.raises(StoreError, match="no earlier version to roll back to"):
        store.rollback(StoreRef("app"))
    assert store.gc().versions == ()  # the history keeps the version rolled back from

    store.tag(parse_store_ref(f"app@{two}", prefixed=False), StoreRef("app"))  # roll forward
    assert store.history(StoreRef("app")).current.sha256 == two
    assert store.rollback(StoreRef("app")).sha256 == one  # and back again: undo the last move


def test_a_second_rollback_goes_one_more_version_back(tmp_path: Path) -> None:
    store = Store(tmp_path)
    a, b, c = (_publish(store, text * 100, "store:app:prod") for text in (b"a", b"b", b"c"))
    assert [store.rollback(StoreRef("app", "prod")).sha256 for _ in range(2)] == [b, a]
    with pytest.raises(StoreError, match="no earlier version"):
        store.rollback(StoreRef("app", "prod"))
    assert {e.sha256 for e in store.history(StoreRef("app", "prod")).entries} == {a, b, c}


def test_the_same_bytes_are_one_version_and_do_not_move_the_tag(tmp_path: Path) -> None:
    store = Store(tmp_path)
    first = _publish(store, b"same", "store:app")
    assert _publish(store, b"same", "store:app") == first
    assert len(store.history(StoreRef("app")).entries) == 1
    assert _publish(store, b"same", "store:other:v1") == first
    assert sorted(p.name for p in store.objects.iterdir()) == [first[7:], first[7:] + ".json"]


def test_tag_rm_and_gc_free_space(tmp_path: Path) -> None:
    store = Store(tmp_path)
    big = os.urandom(1 << 20)
    kept = _publish(store, b"kept", "store:app:v1")
    gone = _publish(store, big, "store:app:v2")
    store.tag(StoreRef("app", "v2"), StoreRef("copy"))
    store.remove(StoreRef("app", "v2"))
    assert store.gc().versions == ()  # copy:latest still keeps it
    store.remove(StoreRef("copy"))
    report = store.gc()
    assert report.versions == (gone,) and report.freed >= len(big)
    assert not store.object_path(gone).exists() and store.object_path(kept).exists()
    with pytest.raises(StoreError, match="does not exist"):
        store.remove(StoreRef("copy"))
    with pytest.raises(StoreError, match="not a version of app"):
        store.tag(StoreRef("app", digest=gone), StoreRef("again"))


def test_a_version_in_use_survives_gc_until_its_reader_ends(tmp_path: Path) -> None:
    store = Store(tmp_path)
    digest = _publish(store, b"booting", "store:app")
    with store.use(StoreRef("app")) as version:
        store.remove(StoreRef("app"))
        report = store.gc()
        assert report.versions == () and report.in_use == (digest,)
        assert version.path.read_bytes() == b"booting"
    assert store.gc().versions == (digest,)
    assert list(store.uses.iterdir()) == []


def test_a_dead_readers_use_file_does_not_keep_a_version(tmp_path: Path) -> None:
    store = Store(tmp_path)
    digest = _publish(store, b"x", "store:app")
    (store.uses / "999999-1").write_text(digest)  # nobody holds its lock: its reader is gone
    store.remove(StoreRef("app"))
    assert store.gc().versions == (digest,)
    assert list(store.uses.iterdir()) == []


def test_gc_removes_temporary_files_of_dead_runs_only(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.ensure()
    host = socket.gethostname().replace("-", "_").replace("/", "_")
    dead_pid = _dead_pid()
    mine = store.tmp / f".version.imgconv-{host}-{os.getpid()}-abc.qcow2"
    abandoned = store.tmp / f".version.imgconv-{host}-{dead_pid}-abc.qcow2"
    tag_temp = store.tags_dir / f".app:latest.json.imgconv-{host}-{dead_pid}-xyz"
    for path in (mine, abandoned, tag_temp):
        path.write_bytes(b"partial" * 1000)
    report = store.gc()
    assert sorted(report.temporary) == sorted([str(abandoned), str(tag_temp)])
    assert mine.exists() and not abandoned.exists() and not tag_temp.exists()
    assert store.tags() == []


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_store_root_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from converter.store import store as module

    monkeypatch.delenv("IMGCONV_STORE", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert module.store_root() == tmp_path / "xdg" / "imgconv" / "store"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")
    assert module.store_root() == Path.home() / ".local" / "share" / "imgconv" / "store"
    monkeypatch.setenv("IMGCONV_STORE", str(tmp_path / "env"))
    assert module.store_root() == tmp_path / "env"
    choose_root(tmp_path / "flag")
    assert module.store_root() == tmp_path / "flag"


# -- concurrency and kills ------------------------------------------------------------------------------------------


def _writer(root: str, worker: int, count: int) -> None:
    store = Store(Path(root))
    for i in range(count):
        _publish(store, f"worker {worker} version {i}".encode() * 500, f"store:w{worker}")
        _publish(store, f"shared {worker}.{i}".encode() * 500, "store:shared")


def _collector(root: str, stop: multiprocessing.synchronize.Event) -> None:
    store = Store(Path(root))
    while not stop.is_set():
        store.gc()


def test_concurrent_writers_and_gc_lose_nothing(tmp_path: Path) -> None:
    Store(tmp_path).ensure()
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    collector = ctx.Process(target=_collector, args=(str(tmp_path), stop))
    collector.start()
    writers = [ctx.Process(target=_writer, args=(str(tmp_path), w, 15)) for w in range(3)]
    for proc in writers:
        proc.start()
    for proc in writers:
        proc.join(120)
    stop.set()
    collector.join(60)
    assert [p.exitcode for p in (*writers, collector)] == [0, 0, 0, 0]
    store = Store(tmp_path)
    for w in range(3):
        assert len(store.history(StoreRef(f"w{w}")).entries) == 15
    assert len(store.history(StoreRef("shared")).entries) == 45
    for tag in store.tags():
        for entry in tag.entries:  # every version any history names is there, whole, with its sidecar
            path = store.object_path(entry.sha256)
            assert hashlib.sha256(path.read_bytes()).hexdigest() == entry.sha256[7:]
            assert json.loads(path.with_name(path.name + ".json").read_text())["sha256"] == entry.sha256
    assert store.gc().versions == ()


def _publish_forever(root: str) -> None:
    store = Store(Path(root))
    i = 0
    while True:
        i += 1
        _publish(store, os.urandom(64) * 4096, "store:app")


def test_writers_killed_at_random_points_leave_the_store_consistent(tmp_path: Path) -> None:
    Store(tmp_path).ensure()
    ctx = multiprocessing.get_context("fork")
    rng = random.Random(12)
    for _ in range(12):
        proc = ctx.Process(target=_publish_forever, args=(str(tmp_path),))
        proc.start()
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
    store = Store(tmp_path)
    history = store.history(StoreRef("app"))
    assert len(history.entries) >= 1
    for entry in history.entries:
        with store.use(StoreRef("app", digest=entry.sha256)) as version:
            assert version.path.stat().st_size == 64 * 4096
    store.gc()  # the killed runs' temporary files and any version linked but never tagged
    left = {p.name for p in store.objects.iterdir()}
    assert left == {e.sha256[7:] for e in history.entries} | {e.sha256[7:] + ".json" for e in history.entries}
    assert [p for p in store.tmp.iterdir()] == [] and [p.name for p in store.tags_dir.iterdir()] == ["app:latest.json"]


# -- commit ---------------------------------------------------------------------------------------------------------


def _qemu_io(spec: dict[str, object], command: str) -> str:
    ran = subprocess.run(["qemu-io", "-c", command, "json:" + json.dumps(spec)], capture_output=True, text=True,
                         timeout=60, check=True)
    return ran.stdout


def _overlay_spec(state: Path, base: Path) -> dict[str, object]:
    return {"driver": "qcow2", "file": {"driver": "file", "filename": str(state)},
            "backing": {"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": str(base)}}}


@pytest.fixture
def base_and_state(tmp_path: Path) -> tuple[Path, Path]:
    """A 4 MiB qcow2 base (0x11 in its first MiB), a state made by boot's own code, with 0x22 written at 1 MiB."""
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "4M"], check=True)
    _qemu_io({"driver": "qcow2", "file": {"driver": "file", "filename": str(base)}}, "write -P 0x11 0 1M")
    base.chmod(0o444)
    (tmp_path / "base.qcow2.json").write_text(json.dumps({"source": "oci:base:1", "sha256": "x", "kernel": "k"}))
    state = tmp_path / "state.qcow2"
    open_state(state, open_disk(base))
    _qemu_io(_overlay_spec(state, base), "write -P 0x22 1M 64k")
    return base, state


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_pattern(disk: Path, pattern: int, offset: str, length: str) -> bool:
    out = _qemu_io({"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": str(disk)}},
                   f"read -P {pattern:#x} {offset} {length}")
    return "Pattern verification failed" not in out


def test_commit_flattens_a_state_over_its_base_into_a_file(base_and_state: tuple[Path, Path], tmp_path: Path) -> None:
    base, state = base_and_state
    before = base.read_bytes(), state.read_bytes()
    dest = tmp_path / "committed.qcow2"
    record = commit(CommitRequest(state, str(dest), base=str(base)), NullMonitor())
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(dest)], capture_output=True,
                                     check=True).stdout)
    assert "backing-filename" not in info and info["virtual-size"] == 4 << 20
    assert _read_pattern(dest, 0x11, "0", "1M") and _read_pattern(dest, 0x22, "1M", "64k")
    assert _read_pattern(dest, 0, "2M", "1M")
    sidecar = json.loads(Path(f"{dest}.json").read_text())
    assert sidecar["base"] == record.base == "sha256:" + json.loads(record_path(state).read_text())["sha256"]
    assert sidecar["source"] == "oci:base:1" and sidecar["sha256"] == record.sha256
    assert dest.stat().st_mode & 0o777 == 0o444
    # its own provenance statement: the new disk's bytes, made of the base's and the state's
    statement = json.loads(Path(f"{dest}.intoto.json").read_text())
    assert statement["subject"] == [{"name": dest.name, "digest": {"sha256": _sha256(dest)}}]
    definition = statement["predicate"]["buildDefinition"]
    assert definition["buildType"] == "urn:imgconv:commit:v1"
    deps = {d["name"]: d for d in definition["resolvedDependencies"]}
    assert deps["base"]["digest"] == {"sha256": _sha256(base)} and deps["base"]["uri"] == str(base)
    assert deps["base"]["annotations"] == {"source": "oci:base:1"}
    assert deps["state"]["digest"] == {"sha256": _sha256(state)} and deps["state"]["uri"] == str(state)
    assert verify_disk(dest).ok
    assert (base.read_bytes(), state.read_bytes()) == before
    with pytest.raises(UsageError, match="already exists"):
        commit(CommitRequest(state, str(dest), base=str(base)), NullMonitor())


def test_commit_into_the_store_finds_the_base_by_its_sha256(base_and_state: tuple[Path, Path],
                                                            tmp_path: Path) -> None:
    base, state = base_and_state
    store = Store(tmp_path / "store")
    store.ensure()
    finished = store.tmp / ".version.imgconv-test-1-base.qcow2"
    finished.write_bytes(base.read_bytes())
    base_digest = store.publish(finished, {"source": "oci:base:1"}, StoreRef("app"))["sha256"]
    choose_root(store.root)
    record = commit(CommitRequest(state, "store:app:v2"), NullMonitor())
    assert record.base == base_digest and record.dest == "store:app:v2"
    with store.use(StoreRef("app", "v2")) as version:
        assert version.sidecar["base"] == base_digest
        assert _read_pattern(version.path, 0x22, "1M", "64k")
        assert verify_disk(version.path).ok  # its statement (HEX.intoto.json) names the version's object
        deps = json.loads(Path(f"{version.path}.intoto.json").read_text())["predicate"]["buildDefinition"][
            "resolvedDependencies"]
        assert deps[0] == {"name": "base", "digest": {"sha256": base_digest.removeprefix("sha256:")},
                           "annotations": {"source": "oci:base:1"}}
    with store.use(StoreRef("app")) as version:
        assert _read_pattern(version.path, 0, "1M", "64k")
    assert store.history(StoreRef("app", "v2")).current.how == "commit"


def test_commit_refuses_a_state_of_another_disk_and_a_missing_base(base_and_state: tuple[Path, Path],
                                                                   tmp_path: Path) -> None:
    base, state = base_and_state
    other = tmp_path / "other.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(other), "4M"], check=True)
    with pytest.raises(UsageError, match="belongs to another disk"):
        commit(CommitRequest(state, str(tmp_path / "out.qcow2"), base=str(other)), NullMonitor())
    choose_root(tmp_path / "empty-store")
    moved = base.rename(tmp_path / "moved.qcow2")  # neither in the store nor where the state says it was
    with pytest.raises(UsageError, match="give it with --base"):
        commit(CommitRequest(state, str(tmp_path / "out.qcow2")), NullMonitor())
    with pytest.raises(UsageError, match="does not exist"):
        commit(CommitRequest(tmp_path / "nope.qcow2", str(tmp_path / "out.qcow2"), base=str(moved)), NullMonitor())
    assert not (tmp_path / "out.qcow2").exists()


def test_commit_finds_a_file_base_where_the_state_says_it_was(base_and_state: tuple[Path, Path],
                                                               tmp_path: Path) -> None:
    """No --base and no store version: the state's record names the disk's path; its sha256 is checked again, so
    other bytes at that path are refused."""
    base, state = base_and_state
    choose_root(tmp_path / "empty-store")
    dest = tmp_path / "committed.qcow2"
    commit(CommitRequest(state, str(dest)), NullMonitor())
    assert _read_pattern(dest, 0x22, "1M", "64k") and _read_pattern(dest, 0x11, "0", "1M")
    base.chmod(0o644)
    _qemu_io({"driver": "qcow2", "file": {"driver": "file", "filename": str(base)}}, "write -P 0x33 0 4k")
    with pytest.raises(UsageError, match="belongs to another disk"):
        commit(CommitRequest(state, str(tmp_path / "again.qcow2")), NullMonitor())


def test_commit_never_follows_a_backing_file_named_in_the_state(base_and_state: tuple[Path, Path],
                                                               tmp_path: Path) -> None:
    """A state rewritten to name a host file as its backing is refused as any such disk is (safety.open_disk)."""
    base, state = base_and_state
    secret = tmp_path / "secret.raw"
    secret.write_bytes(b"S" * (4 << 20))
    subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "raw", "-b", str(secret), str(state)],
                   check=True)
    record = json.loads(record_path(state).read_text())
    record["stamp"] = []  # the state changed: boot's record would hash the base again; it still matches
    record_path(state).write_text(json.dumps(record))
    with pytest.raises(UsageError, match="backing file"):
        commit(CommitRequest(state, str(tmp_path / "out.qcow2"), base=str(base)), NullMonitor())


def test_the_store_commands_print_tags_history_and_what_gc_freed(imgconv: Callable[..., Ran], tmp_path: Path) -> None:
    store = Store(tmp_path / "flag")
    one = _publish(store, b"one" * 4096, "store:app", "oci:src:1")
    two = _publish(store, b"two" * 4096, "store:app", "oci:src:\x1b[2J")  # a control character is shown escaped
    # --store wins over IMGCONV_STORE
    listed = imgconv("--store", str(store.root), "store", "list", env={"IMGCONV_STORE": str(tmp_path / "env")}).ok()
    header, row = listed.stdout.splitlines()
    assert header.split() == ["NAME", "TAG", "SHA256", "SOURCE", "CREATED"]
    assert row.split()[:4] == ["app", "latest", two, "oci:src:\\x1b[2J"]
    empty = imgconv("store", "list", env={"IMGCONV_STORE": str(tmp_path / "env")}).ok()
    assert "has no tags" in empty.stdout
    lines = imgconv("--store", str(store.root), "store", "history", "store:app").ok().stdout.splitlines()
    assert lines[1].startswith("*") and two in lines[1] and one in lines[2] and "write" in lines[2]
    rolled = imgconv("--store", str(store.root), "store", "rollback", "app").ok()
    assert rolled.stdout == f"app:latest: rolled back to {one} (from {two})\n"
    tagged = imgconv("--store", str(store.root), "store", "tag", f"app@{two}", "store:app:prod").ok()
    assert tagged.stdout == f"app:prod -> {two}\n"
    removed = imgconv("--store", str(store.root), "store", "rm", "app:latest").ok()
    assert removed.stdout == f"removed app:latest (was {one})\n"
    freed = imgconv("--store", str(store.root), "store", "gc").ok().stdout.splitlines()
    assert freed[0].startswith("deleted 1 version(s) and 0 temporary file(s), freed ") and freed[1] == f"  {one}"
    missing = imgconv("--store", str(store.root), "store", "history", "app")
    assert_one_line_error(missing, "store:app:latest does not exist", code=2)


def test_the_store_publish_and_commit_are_steps_with_stable_ids() -> None:
    from converter.disk import build
    from converter.store.commit import PIPELINE

    assert build.pipeline("keep", store=True).step_ids == build.pipeline("keep").step_ids
    assert build.pipeline("keep", store=True).step_ids[-1] == "publish"
    assert PIPELINE.step_ids == ("check-inputs", "flatten", "publish")


def test_a_file_named_like_a_reference_is_given_as_a_path(imgconv: Callable[..., Ran], tmp_path: Path) -> None:
    ran = imgconv("--store", str(tmp_path / "store"), "boot", "./store:app")
    assert_one_line_error(ran, f"{tmp_path}/store:app does not exist", code=2)
    ran = imgconv("--store", str(tmp_path / "store"), "vm-to-oci", "./store:app", "oci:out:1")
    assert_one_line_error(ran, "store:app does not exist", code=2)
    assert not (tmp_path / "store").exists()
    ran = imgconv("--store", str(tmp_path / "store"), "boot", "store:app")
    assert_one_line_error(ran, f"the store {tmp_path}/store is empty", code=2)


def test_verify_and_provenance_read_a_store_version_and_refuse_a_missing_tag(imgconv: Callable[..., Ran],
                                                                             tmp_path: Path) -> None:
    """store:NAME[:TAG] as verify's and provenance's DISK: the version's object, its sidecar and its statement."""
    from converter.provenance import Provenance, Resource, statement_for

    store = Store(tmp_path / "store")
    predicate = Provenance({"source": "oci:src:1"}, (Resource("image-config", {"sha256": "cd" * 32}),), {}, "")
    finished = _disk(store, b"version one" * 512)
    digest = store.publish(finished, {"source": "oci:src:1"}, StoreRef("app", "v1"),
                           statement=lambda sha256: statement_for(sha256.removeprefix("sha256:"), predicate)(sha256)
                           )["sha256"]
    run = functools.partial(imgconv, "--store", str(store.root))
    ok = run("verify", "store:app:v1")
    assert (ok.code, ok.stdout) == (0, f"store:app:v1: OK ({digest}, from oci:src:1)\n"), ok.stderr
    assert run("verify", f"store:app@{digest}").code == 0
    shown = run("provenance", "store:app:v1")
    assert shown.code == 0 and json.loads(shown.stdout)["subject"] == [
        {"name": digest.removeprefix("sha256:"), "digest": {"sha256": hashlib.sha256(b"version one" * 512)
                                                            .hexdigest()}}]
    assert_one_line_error(run("verify", "store:app"), "store:app:latest does not exist", code=2)
    assert_one_line_error(run("provenance", "store:other:v1"), "store:other:v1 does not exist", code=2)
    assert_one_line_error(run("verify", "--rebuild", "store:app:v2"), "store:app:v2 does not exist", code=2)
    assert_one_line_error(run("verify", f"store:other@{digest}"), "is not a version of other", code=2)
    # a flipped byte in the version's object: FAILED, exit 1, naming both records
    obj = store.object_path(digest)
    obj.chmod(0o644)
    data = bytearray(obj.read_bytes())
    data[7] ^= 0xFF
    obj.write_bytes(bytes(data))
    bad = run("verify", "store:app:v1")
    assert bad.code == 1 and bad.stdout.count("store:app:v1: FAILED: sha256 differs") == 2, bad.stdout
