"""Shared, session-scoped conversions: each fixture image is turned into a disk once per test run.

`converted_disk(name)` runs the real CLI (`imgconv oci-to-qcow2 --json`) and caches the disk for the
session (the run's events beside it: `session_events`), so the oci-to-qcow2, boot and round-trip tests share
conversions instead of paying a libguestfs launch each. Each image comes in through a different transport, so
all of them get exercised by the conversions themselves.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.cli import imgconv
from tests.world import DockerWorld, FixtureImage

# Which transport each fixture image is read through when it is converted.
SOURCE_TRANSPORT = {"busybox": "oci", "distroless": "archive", "tricky": "daemon", "debian": "daemon"}


def source_ref(image: FixtureImage) -> str:
    kind = SOURCE_TRANSPORT.get(image.name, "oci")
    return {"oci": image.oci_ref, "archive": image.archive_ref, "daemon": image.daemon_ref}[kind]


def events_path(disk: Path) -> Path:
    """Where the `--json` events (stderr: steps, notes) of the conversion that made a session disk are kept."""
    return disk.with_name(disk.name + ".events")


def session_events(disk: Path) -> list[dict[str, Any]]:
    """The events of the session's conversion that made *disk* (`converted_disk`), e.g. its notes."""
    return [json.loads(line) for line in events_path(disk).read_text().splitlines() if line.startswith("{")]


@pytest.fixture(scope="session")
def converted_disk(fixture_image: Callable[[str], FixtureImage], docker_world: DockerWorld,
                   tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Factory: the qcow2 disk `imgconv oci-to-qcow2` makes of a fixture image (made once)."""
    disks: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("disks")
    env = dict(docker_world.env)  # the whole environment: DOCKER_HOST for docker-daemon: sources

    def get(name: str) -> Path:
        if name not in disks:
            image = fixture_image(name)
            disk = root / f"{name}.qcow2"
            ran = imgconv("oci-to-qcow2", "--json", source_ref(image), str(disk), env=env, inherit_env=False).ok()
            events_path(disk).write_bytes(ran.stderr_bytes)
            disks[name] = disk
        return disks[name]

    return get
