"""Provenance and verify on real conversions (issue 12 item 4), the source's digests judged by skopeo.

The busybox disk is the session's conversion (conftest's `converted_disk`); `verify --rebuild` converts it
once more from the source its sidecar records.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.cli import imgconv
from tests.integration.conftest import source_ref
from tests.world import FixtureImage, _run

pytestmark = [pytest.mark.appliance, pytest.mark.docker]


def copy_with_records(disk: Path, dest_dir: Path, name: str | None = None) -> Path:
    """The disk with its sidecar and statement, copied (writable) into *dest_dir*, the disk renamed to *name*."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / (name or disk.name)
    shutil.copyfile(disk, dest)
    for suffix in (".json", ".intoto.json"):
        shutil.copyfile(disk.with_name(disk.name + suffix), dest.with_name(dest.name + suffix))
    return dest


def test_the_statement_names_the_disk_and_the_sources_digests(converted_disk: Callable[[str], Path],
                                                               fixture_image: Callable[[str], FixtureImage]) -> None:
    disk, image = converted_disk("busybox"), fixture_image("busybox")
    ran = imgconv("provenance", str(disk)).ok()
    statement = json.loads(ran.stdout)
    assert statement == json.loads(disk.with_name(disk.name + ".intoto.json").read_text())
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == "https://slsa.dev/provenance/v1"
    assert statement["subject"] == [{"name": disk.name, "digest": {"sha256": hashlib.sha256(disk.read_bytes())
                                                                             .hexdigest()}}]
    # The judge: skopeo's view of the source, not imgconv's.
    config = _run(["skopeo", "inspect", "--config", "--raw", image.oci_ref]).stdout
    manifest = _run(["skopeo", "inspect", "--raw", image.oci_ref]).stdout
    deps = {d["name"]: d for d in statement["predicate"]["buildDefinition"]["resolvedDependencies"]}
    assert deps["image-config"]["digest"] == {"sha256": hashlib.sha256(config.encode()).hexdigest()}
    assert deps["image-manifest"]["digest"] == {"sha256": hashlib.sha256(manifest.encode()).hexdigest()}
    assert json.loads(manifest)["config"]["digest"] == "sha256:" + deps["image-config"]["digest"]["sha256"]
    sidecar = json.loads(disk.with_name(disk.name + ".json").read_text())
    assert deps["kernel"]["annotations"]["release"] == sidecar["kernel"]["release"]
    assert len(deps["kernel"]["digest"]["sha256"]) == 64 and len(deps["imgconv-init"]["digest"]["sha256"]) == 64
    assert deps["imgconv"]["annotations"]["version"] == sidecar["imgconv"]
    external = statement["predicate"]["buildDefinition"]["externalParameters"]
    assert external["source"] == source_ref(image) and external["options"] == sidecar["options"]


def test_verify_passes_on_the_disk_and_fails_on_a_flipped_byte(converted_disk: Callable[[str], Path],
                                                               tmp_path: Path) -> None:
    disk = converted_disk("busybox")
    ok = imgconv("verify", str(disk))
    assert ok.code == 0 and ok.stdout.count("\n") == 1 and ok.stdout.startswith(f"{disk}: OK (sha256:"), ok.stdout
    flipped = copy_with_records(disk, tmp_path / "flipped")
    with flipped.open("r+b") as f:
        f.seek(flipped.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    bad = imgconv("verify", str(flipped))
    assert bad.code == 1 and "sha256 differs" in bad.stdout, bad.stdout + bad.stderr


def test_verify_names_a_missing_statement_and_a_statement_of_another_disk(converted_disk: Callable[[str], Path],
                                                                           tmp_path: Path) -> None:
    disk = converted_disk("busybox")
    renamed = copy_with_records(disk, tmp_path / "renamed", "other.qcow2")
    other = imgconv("verify", str(renamed))
    assert other.code == 1 and "subject is another disk" in other.stdout, other.stdout
    renamed.with_name(renamed.name + ".intoto.json").unlink()
    missing = imgconv("verify", str(renamed))
    assert missing.code == 1 and "no provenance statement" in missing.stdout, missing.stdout


def test_verify_rebuild_reproduces_the_disk(converted_disk: Callable[[str], Path], tmp_path: Path) -> None:
    disk = copy_with_records(converted_disk("busybox"), tmp_path / "kept")
    ran = imgconv("verify", "--rebuild", "--quiet", str(disk), timeout=900)
    assert ran.code == 0 and "rebuilt identical" in ran.stdout, ran.stdout + ran.stderr
    assert sorted(p.name for p in disk.parent.iterdir()) == sorted([disk.name, disk.name + ".json",
                                                                    disk.name + ".intoto.json"])


def test_verify_rebuild_of_an_unreachable_source_fails_in_one_line(converted_disk: Callable[[str], Path],
                                                                    tmp_path: Path) -> None:
    disk = copy_with_records(converted_disk("busybox"), tmp_path / "gone")
    sidecar = disk.with_name(disk.name + ".json")
    doc = json.loads(sidecar.read_text())
    doc["source"] = f"oci:{tmp_path}/no-such-layout:1"
    sidecar.write_text(json.dumps(doc))
    ran = imgconv("verify", "--rebuild", str(disk))
    assert ran.code == 2 and ran.stderr.count("\n") == 1 and "no-such-layout" in ran.stderr, ran.stderr
