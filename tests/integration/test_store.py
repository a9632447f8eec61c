"""The store end to end, through the installed CLI: versions of a real conversion under one tag, their history,
a rollback that `imgconv boot store:NAME` follows, a `boot --state` file committed as a new version that boots
with the change (and is read back by vm-to-oci) while its base does not have it, two conversions into one store
at once with gc running throughout, gc during a boot, rm and gc freeing space, and conversions SIGKILLed at
several steps leaving `store list` clean.

Conversions cost ~25 s and boots ~6 s under TCG, so the module makes three conversions of the busybox fixture
once (its disks differ by --hostname, which the workload prints) and the tests share them.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.cli import Ran, assert_one_line_error, imgconv, start
from tests.integration.judge import layer_tar, tar_names
from tests.world import FixtureImage, _run

pytestmark = [pytest.mark.appliance, pytest.mark.boot, pytest.mark.docker]


@dataclass
class Versions:
    root: Path  # the store directory
    source: str  # the busybox fixture's oci: reference
    first: str  # sha256 of store:app's first version (hostname imgconv)
    second: str  # of its second (hostname second), written at the same time as store:other:x
    other: str  # of store:other:x (hostname third)
    gc_runs: int  # how many `store gc` ran while the two conversions did

    def run(self, *args: str, timeout: float = 600) -> Ran:
        return imgconv("--store", str(self.root), *args, timeout=timeout)

    def boot(self, disk: str, script: str, *flags: str) -> Ran:
        return self.run("boot", "--timeout", "240", "--network", "none", "--entrypoint", "/bin/sh", *flags, disk,
                        "-c", script, timeout=300)

    def tags(self) -> dict[str, dict[str, Any]]:
        return {f"{t['name']}:{t['tag']}": t for t in self.run("store", "list", "--json").ok().json}


def _convert(root: Path, source: str, dest: str, *flags: str) -> subprocess.Popen[bytes]:
    """Its progress as JSON lines on stderr (steps by id), its record as JSON on stdout."""
    return start("--store", str(root), "oci-to-qcow2", "--json", *flags, source, dest)


def _finished(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err.decode()[-3000:]
    return json.loads(out)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def store(fixture_image: Callable[[str], FixtureImage], tmp_path_factory: pytest.TempPathFactory) -> Versions:
    root = tmp_path_factory.mktemp("store") / "store"
    source = fixture_image("busybox").oci_ref
    first = _finished(_convert(root, source, "store:app"))
    # Two conversions into one store at once, and gc over and over meanwhile: nothing either writes may be lost.
    stop, gc_runs = threading.Event(), [0]

    def collect() -> None:
        while not stop.is_set():
            imgconv("--store", str(root), "store", "gc").ok()
            gc_runs[0] += 1

    collector = threading.Thread(target=collect, daemon=True)
    second = _convert(root, source, "store:app", "--hostname", "second")
    other = _convert(root, source, "store:other:x", "--hostname", "third")
    collector.start()
    try:
        second_record, other_record = _finished(second), _finished(other)
    finally:
        stop.set()
        collector.join(120)
    return Versions(root, source, first["sha256"], second_record["sha256"], other_record["sha256"], gc_runs[0])


def _object(store: Versions, sha256: str) -> Path:
    return store.root / "objects" / "sha256" / sha256.removeprefix("sha256:")


def _intact(store: Versions, sha256: str) -> bool:
    path = _object(store, sha256)
    return ("sha256:" + hashlib.sha256(path.read_bytes()).hexdigest() == sha256
            and json.loads(Path(f"{path}.json").read_text())["sha256"] == sha256)


def test_concurrent_conversions_and_gc_lose_nothing(store: Versions) -> None:
    assert store.gc_runs >= 2
    assert len({store.first, store.second, store.other}) == 3
    tags = store.tags()
    assert {key: t["sha256"] for key, t in tags.items() if key in ("app:latest", "other:x")} == {
        "app:latest": store.second, "other:x": store.other}
    assert tags["app:latest"]["source"] == store.source
    for sha256 in (store.first, store.second, store.other):
        assert _intact(store, sha256)
        assert _object(store, sha256).stat().st_mode & 0o777 == 0o444


def test_history_rollback_and_boot_the_earlier_version(store: Versions) -> None:
    history = store.run("store", "history", "--json", "app").ok().json["history"]
    assert [(e["sha256"], e["source"], e["how"]) for e in history[:2]] == [
        (store.second, store.source, "write"), (store.first, store.source, "write")]
    text = store.run("store", "history", "store:app:latest").ok().stdout.splitlines()
    assert text[1].startswith("*") and store.second in text[1] and store.first in text[2]

    assert store.boot("store:app", "hostname").ok().stdout == "second\n"
    rolled = store.run("store", "rollback", "app").ok()
    assert store.first in rolled.stdout
    assert store.boot("store:app", "hostname").ok().stdout == "imgconv\n"
    assert store.tags()["app:latest"]["sha256"] == store.first
    assert {e["sha256"] for e in store.run("store", "history", "--json", "app").ok().json["history"]} >= {
        store.first, store.second}
    store.run("store", "tag", f"app@{store.second}", "app").ok()  # roll forward again
    assert store.tags()["app:latest"]["sha256"] == store.second


def test_a_committed_state_is_a_new_version_with_the_change(store: Versions, tmp_path: Path) -> None:
    store.run("store", "tag", f"app@{store.first}", "base").ok()
    state = tmp_path / "state.qcow2"
    wrote = store.boot("store:base", "echo changed > /etc/marker && echo written", "--state", str(state)).ok()
    assert wrote.stdout == "written\n"
    committed = store.run("commit", "--json", "--quiet", str(state), "store:base:v2").ok().json
    assert committed["base"] == store.first and committed["dest"] == "store:base:v2"
    assert store.boot("store:base:v2", "cat /etc/marker").ok().stdout == "changed\n"
    assert store.boot("store:base", "cat /etc/marker 2>/dev/null || echo none").ok().stdout == "none\n"
    path = _object(store, committed["sha256"])
    sidecar = json.loads(Path(f"{path}.json").read_text())
    assert sidecar["base"] == store.first and sidecar["source"] == store.source
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(path)], capture_output=True,
                                     check=True).stdout)
    assert info["format"] == "qcow2" and "backing-filename" not in info  # flattened: no chain

    layout = tmp_path / "layout"
    exported = store.run("vm-to-oci", "--quiet", "--json", "store:base:v2", f"oci:{layout}:v2").ok().json
    manifest_digest = exported["manifest_digest"]
    manifest = json.loads((layout / "blobs" / "sha256" / manifest_digest.removeprefix("sha256:")).read_text())
    names = {name for layer in manifest["layers"] for name in tar_names(layer_tar(layout, layer))}
    assert {"etc/marker", "./etc/marker"} & names, sorted(names)[:50]

    # Its provenance: a statement of the new bytes that names the base version and the base's source image (the
    # judges: hashlib for the disk and the state, skopeo for the source's config), which verify checks.
    verified = store.run("verify", "store:base:v2")
    assert verified.code == 0 and verified.stdout == f"store:base:v2: OK ({committed['sha256']}, from {store.source})\n"
    statement = store.run("provenance", "store:base:v2").ok().json
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == "https://slsa.dev/provenance/v1"
    assert statement["subject"] == [{"name": path.name, "digest": {"sha256": hashlib.sha256(path.read_bytes())
                                                                   .hexdigest()}}]
    definition = statement["predicate"]["buildDefinition"]
    assert definition["buildType"] == "urn:imgconv:commit:v1"
    assert definition["externalParameters"] == {"state": str(state), "base": store.first, "dest": "store:base:v2"}
    deps = {d["name"]: d for d in definition["resolvedDependencies"]}
    assert deps["base"]["digest"] == {"sha256": store.first.removeprefix("sha256:")}
    assert deps["base"]["annotations"] == {"source": store.source}
    config = _run(["skopeo", "inspect", "--config", "--raw", store.source]).stdout
    assert deps["image-config"]["digest"] == {"sha256": hashlib.sha256(config.encode()).hexdigest()}
    assert deps["state"]["digest"] == {"sha256": hashlib.sha256(state.read_bytes()).hexdigest()}
    refused = store.run("verify", "--rebuild", "store:base:v2")
    assert_one_line_error(refused, "made by imgconv commit", code=2)

    # The same state committed into a file: DEST, DEST.json and DEST.intoto.json, which verify and provenance read.
    dest = tmp_path / "v2.qcow2"
    store.run("commit", "--quiet", str(state), str(dest)).ok()
    assert sorted(p.name for p in tmp_path.glob("v2.*")) == ["v2.qcow2", "v2.qcow2.intoto.json", "v2.qcow2.json"]
    assert store.run("verify", str(dest)).ok().stdout.startswith(f"{dest}: OK (sha256:")
    in_file = store.run("provenance", str(dest)).ok().json
    assert in_file["subject"] == [{"name": "v2.qcow2", "digest": {"sha256": hashlib.sha256(dest.read_bytes())
                                                                  .hexdigest()}}]
    assert {d["name"]: d["digest"] for d in in_file["predicate"]["buildDefinition"]["resolvedDependencies"]}[
        "base"] == {"sha256": store.first.removeprefix("sha256:")}


def test_verify_rebuild_of_a_store_version_reproduces_it(store: Versions) -> None:
    """store:NAME as verify --rebuild's DISK: its recorded source converted again (in the store's tmp/, removed)."""
    ran = store.run("verify", "--rebuild", "--quiet", "store:other:x", timeout=900)
    expected = f"store:other:x: OK, rebuilt identical ({store.other}) from {store.source}\n"
    assert (ran.code, ran.stdout) == (0, expected), ran.stderr[-3000:]
    assert list((store.root / "tmp").iterdir()) == []
    assert _intact(store, store.other)



def _wait_for(predicate: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_gc_during_a_boot_keeps_its_version_and_rm_then_gc_frees_it(store: Versions) -> None:
    booting = start("--store", str(store.root), "boot", "--timeout", "240", "--network", "none",
                    "--entrypoint", "/bin/sh", "store:other:x", "-c", "sleep 5; hostname")
    try:
        _wait_for(lambda: any((store.root / "uses").iterdir()), 60, "the boot to mark its version in use")
        store.run("store", "rm", "other:x").ok()
        report = store.run("store", "gc", "--json").ok().json
        assert report["in_use"] == [store.other] and store.other not in report["versions"]
        assert _intact(store, store.other)
        out, err = booting.communicate(timeout=300)
    finally:
        if booting.poll() is None:
            booting.kill()
    assert (booting.returncode, out) == (0, b"third\n"), err.decode()[-2000:]
    size = _object(store, store.other).stat().st_blocks * 512
    report = store.run("store", "gc", "--json").ok().json
    assert report["versions"] == [store.other] and report["freed"] >= size > 0
    assert not _object(store, store.other).exists()
    assert "other:x" not in store.tags()
    text = store.run("store", "gc").ok().stdout
    assert text.startswith("deleted 0 version(s)")


def _kill_at(store: Versions, step: str, dest: str) -> None:
    """A conversion into *dest*, SIGKILLed as soon as its --json progress says *step* started."""
    proc = _convert(store.root, store.source, dest, "--hostname", "killed")
    assert proc.stderr is not None
    try:
        for line in proc.stderr:
            event = json.loads(line)
            if event.get("event") == "step" and event.get("id") == step:
                break
        else:
            pytest.fail(f"the conversion ended before {step}: exit {proc.wait()}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()


def test_conversions_killed_at_any_step_leave_the_store_clean(store: Versions) -> None:
    """Each run sweeps the temporary files the previous killed ones left beside the same output (as for a file
    OUTPUT), so the last kill is the one after create-disk: its temporary disk stays until gc. (Kills inside the
    publish step itself, at random points, are tests/unit/test_store.py's.)"""
    before = store.tags()
    for step in ("publish", "create-disk", "install-boot"):
        _kill_at(store, step, "store:killed")
    after = store.tags()
    assert {k: v for k, v in after.items() if k != "killed:latest"} == before
    for tag in after.values():  # a tag names only whole versions (the last kill may have finished its publish)
        assert _intact(store, tag["sha256"])
    leftovers = sorted(str(p) for p in (store.root / "tmp").iterdir())
    assert leftovers, "a conversion killed after create-disk leaves its temporary disk until gc"
    report = store.run("store", "gc", "--json").ok().json
    assert sorted(report["temporary"]) == leftovers
    assert list((store.root / "tmp").iterdir()) == []
    for tag in store.tags().values():
        assert _intact(store, tag["sha256"])
