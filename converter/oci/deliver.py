"""Deliver a finished image (built in a private OCI layout) to any destination transport.

Each destination is complete or untouched: a new layout directory is renamed into place, an
existing one gets its blobs first and its index.json replaced atomically last, an archive is
renamed from a temporary name, and the daemon and registries receive a finished image.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from converter.errors import UsageError
from converter.oci.archive import write_archive
from converter.oci.layout import LayoutWriter, check_layout
from converter.oci.model import Descriptor
from converter.oci.reference import Reference, Transport

WORK_TAG = "imgconv"


@dataclass(frozen=True)
class Built:
    layout: Path  # a private layout holding exactly one image, tagged WORK_TAG
    manifest: Descriptor
    config: Descriptor
    layers: tuple[Descriptor, ...]


def check_destination(ref: Reference, force: bool = True) -> None:
    """Fail before the work when the destination cannot be written."""
    if ref.transport is Transport.OCI:
        assert ref.path is not None
        root = Path(ref.path)
        if root.exists():
            check_layout(root)
        elif not root.parent.is_dir():
            raise UsageError(f"the directory of {root} does not exist")
    elif ref.transport is Transport.DOCKER_ARCHIVE:
        assert ref.path is not None
        path = Path(ref.path)
        if path.is_dir():
            raise UsageError(f"{path} is a directory; a docker archive is a file")
        if not path.parent.is_dir():
            raise UsageError(f"the directory of {path} does not exist")
        if path.exists() and not force:
            raise UsageError(f"{path} already exists")
    elif ref.transport is Transport.DOCKER_DAEMON and (ref.name is None or not ref.name.tag):
        raise UsageError("docker-daemon: destinations need NAME:TAG")


def deliver(built: Built, ref: Reference, *, tls_verify: bool, scratch: Path) -> str | None:
    """Put the image at *ref*; returns the manifest digest where the destination has one."""
    if ref.transport is Transport.OCI:
        assert ref.path is not None
        _into_layout(built, Path(ref.path), ref.tag)
        return built.manifest.digest
    if ref.transport is Transport.DOCKER_ARCHIVE:
        assert ref.path is not None
        tags = [ref.name.familiar()] if ref.name else []
        write_archive(built.layout, built.manifest, built.config, list(built.layers), tags, Path(ref.path))
        return None
    if ref.transport is Transport.DOCKER_DAEMON:
        from converter.oci.daemon import load_archive

        assert ref.name is not None
        archive = scratch / "load.tar"
        write_archive(built.layout, built.manifest, built.config, list(built.layers), [ref.name.familiar()], archive)
        load_archive(archive)
        return None
    from converter.oci.registry import push

    assert ref.name is not None
    return push(built.layout, WORK_TAG, ref.name, tls_verify, scratch)


def _into_layout(built: Built, root: Path, tag: str | None) -> None:
    if not root.exists():
        # A fresh layout: staged beside its final name under a private name, tagged there, and renamed into
        # place at once. Another writer may have made it meanwhile: then the image is added to theirs.
        staged = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".imgconv-staging", dir=root.parent))
        try:
            shutil.copytree(built.layout, staged, dirs_exist_ok=True)
            writer = LayoutWriter(staged)
            manifest_raw = writer.store.blob_path(built.manifest.digest).read_bytes()
            _retag(writer, manifest_raw, built.manifest.media_type, tag)
            try:
                os.rename(staged, root)
                return
            except OSError:
                if not root.is_dir():
                    raise
            check_layout(root)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
    _add_to_layout(built, root, tag)


def _add_to_layout(built: Built, root: Path, tag: str | None) -> None:
    """Blobs first (each under a private temporary name), then index.json, under a lock so that concurrent
    imgconv runs adding to one layout do not lose each other's tags."""
    target = LayoutWriter(root)
    for desc in (built.config, *built.layers, built.manifest):
        dest = target.store.blob_path(desc.digest)
        if dest.exists():
            continue
        fd, name = tempfile.mkstemp(prefix=f".{dest.name[:16]}.", suffix=".imgconv-tmp", dir=dest.parent)
        os.close(fd)
        try:
            shutil.copyfile(built.layout / "blobs" / "sha256" / desc.digest.removeprefix("sha256:"), name)
            os.replace(name, dest)
        finally:
            Path(name).unlink(missing_ok=True)
    manifest_raw = target.store.blob_path(built.manifest.digest).read_bytes()
    with _locked(root):
        target.add_manifest(manifest_raw, built.manifest.media_type, tag)


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _retag(writer: LayoutWriter, manifest_raw: bytes, media_type: str, tag: str | None) -> None:
    index = writer.root / "index.json"
    index.unlink(missing_ok=True)
    writer.add_manifest(manifest_raw, media_type, tag)
