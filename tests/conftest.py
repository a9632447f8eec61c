"""Session fixtures of the test world (tests/world.py): a private dockerd, a local registry, fixture images.

    docker_world                 DockerWorld: .host .env .client .cli() .run() .export() .load() .save()
    registry                     Registry: .addr, .ref(name, tag) -> "docker://127.0.0.1:PORT/name:tag"
    built_fixture("busybox")     BuiltFixture on disk (cache), no daemon needed (except to build debian)
    fixture_image("busybox")     FixtureImage, loaded into docker_world: .daemon_ref .archive_ref .oci_ref ...
    fixture_images               {name: FixtureImage} for all of busybox, distroless, tricky, runtime, debian

Services start on first use and stop at the end of the session. Without root or dockerd the tests that need
them are skipped, except where the world is required (CI=true or IMGCONV_REQUIRE_WORLD=1): there they fail.
Tests using these fixtures get the `docker` / `registry` markers automatically.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator

import pytest
from hypothesis import settings

from fixtures import NAMES, BuiltFixture, cache_key, cache_root
from tests.world import DockerWorld, FixtureImage, Registry, World, require_world

# Every property test runs the same examples each time unless `make fuzz` asks otherwise (tests/builders/fuzzing.py):
# a red CI must mean a change broke something, not that a run drew an input nobody has looked at yet.
settings.register_profile("default-derandomized", derandomize=True, database=None)
settings.load_profile("default-derandomized")

_AUTO_MARKS = {
    "docker_world": "docker",
    "fixture_image": "docker",
    "fixture_images": "docker",
    "registry": "registry",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        for fixture, mark in _AUTO_MARKS.items():
            if fixture in used and item.get_closest_marker(mark) is None:
                item.add_marker(mark)
        if "fixture_images" in used and item.get_closest_marker("slow") is None:
            item.add_marker("slow")


def _unavailable(world: World, reason: str) -> None:
    if world.require:
        pytest.fail(f"the test world is required here (CI or IMGCONV_REQUIRE_WORLD=1): {reason}")
    pytest.skip(reason)


def _need_docker(world: World) -> None:
    reason = world.docker_unavailable()
    if reason is not None:
        _unavailable(world, reason)


@pytest.fixture(scope="session")
def world() -> Iterator[World]:
    state = World(require=require_world())
    yield state
    state.close()


@pytest.fixture(scope="session")
def docker_world(world: World) -> DockerWorld:
    _need_docker(world)
    return world.docker()


@pytest.fixture(scope="session")
def registry(world: World) -> Registry:
    for tool in ("docker-registry", "skopeo"):
        if shutil.which(tool) is None:
            _unavailable(world, f"{tool} is not installed")
    return world.registry()


@pytest.fixture(scope="session")
def built_fixture(world: World) -> Callable[[str], BuiltFixture]:
    """Factory: a fixture image's files (OCI layout, docker-archive), built or taken from the cache."""

    def get(name: str) -> BuiltFixture:
        if name == "debian" and not (cache_root() / "fixtures" / f"debian-{cache_key('debian')}").exists():
            _need_docker(world)  # building it takes a daemon; a cached one does not
        return world.built(name)

    return get


@pytest.fixture(scope="session")
def fixture_image(world: World, docker_world: DockerWorld) -> Callable[[str], FixtureImage]:
    """Factory: one fixture image, built lazily and loaded into the session's dockerd."""
    return world.image


@pytest.fixture(scope="session")
def fixture_images(fixture_image: Callable[[str], FixtureImage]) -> dict[str, FixtureImage]:
    """All fixture images by name (debian included: a cold cache pays for mmdebstrap and docker build)."""
    return {name: fixture_image(name) for name in NAMES}
