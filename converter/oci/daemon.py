"""`docker-daemon:NAME[:TAG]`: images in the Docker engine, through the docker SDK.

A thin adapter over the archive transport, as in go-containerregistry: reading is `save` into a
spool file then :func:`read_archive`; writing is :func:`write_archive` then `load`. DOCKER_HOST (and
DOCKER_TLS_VERIFY / DOCKER_CERT_PATH) are honoured through ``docker.from_env()``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from converter.errors import ImageError, ToolError, UsageError
from converter.oci.archive import read_archive, write_archive
from converter.oci.image import Image
from converter.oci.model import Platform
from converter.oci.reference import Reference
from converter.scratch import scratch_dir

if TYPE_CHECKING:
    from converter.oci.transport import Built


class DaemonTransport:
    """`docker-daemon:NAME[:TAG|@DIGEST]` or `docker-daemon:sha256:ID`."""

    @contextmanager
    def open(self, ref: Reference, *, platform: Platform | None, tls_verify: bool) -> Iterator[Image]:
        with scratch_dir() as scratch:
            spool = scratch / "daemon-save.tar"
            save_image(ref, spool)
            with read_archive(spool, None, None, platform, str(ref)) as image:
                yield image

    def check_destination(self, ref: Reference, force: bool) -> None:
        # The engine replaces a tag as `docker load` does; what it needs is a tag to give the image.
        if ref.name is None or not ref.name.tag:
            raise UsageError("docker-daemon: destinations need NAME:TAG")

    def write(self, built: Built, ref: Reference, *, tls_verify: bool, scratch: Path) -> str | None:
        assert ref.name is not None  # check_destination ran before the work
        archive = scratch / "load.tar"
        write_archive(built, [ref.name.familiar()], archive)
        load_archive(archive)
        return None


TRANSPORT = DaemonTransport()


def engine_address() -> str:
    return os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")


def client() -> Any:
    try:
        import docker
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise ToolError(f"the docker Python SDK is not importable: {exc}") from exc
    try:
        engine = docker.from_env(timeout=600)
        engine.ping()
    except Exception as exc:
        raise ToolError(f"cannot reach the Docker engine at {engine_address()}: {_reason(exc)}") from exc
    return engine


def _reason(exc: BaseException) -> str:
    text = getattr(exc, "explanation", None) or str(exc)
    return str(text).splitlines()[0] if str(text) else type(exc).__name__


def save_image(ref: Reference, spool: Path) -> None:
    """`docker save` the image *ref* names into *spool*."""
    import docker.errors

    name = ref.image_id or (ref.name.familiar() if ref.name else "")
    engine = client()
    try:
        image = engine.images.get(name)
    except docker.errors.ImageNotFound as exc:
        raise ImageError(f"no image {name} in the Docker engine at {engine_address()}") from exc
    except docker.errors.APIError as exc:
        raise ToolError(f"the Docker engine refused to describe {name}: {_reason(exc)}") from exc
    try:
        with spool.open("wb") as out:
            for chunk in image.save(named=False, chunk_size=1 << 20):
                out.write(chunk)
    except docker.errors.APIError as exc:
        raise ToolError(f"the Docker engine failed to export {name}: {_reason(exc)}") from exc


def load_archive(archive: Path) -> list[str]:
    """`docker load` an archive; returns the tags the engine reports."""
    import docker.errors

    engine = client()
    try:
        with archive.open("rb") as f:
            images = engine.images.load(f)
    except docker.errors.APIError as exc:
        raise ToolError(f"the Docker engine refused the image: {_reason(exc)}") from exc
    return [t for image in images for t in image.tags]
