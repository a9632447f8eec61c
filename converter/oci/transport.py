"""Transports: where an image is read from and where a finished one is written to.

Each transport is one module holding both directions (as go-containerregistry's `layout`, `tarball`,
`daemon` and `remote` packages): `layout.py` for `oci:`, `archive.py` for `docker-archive:`, `daemon.py`
for `docker-daemon:` (a thin adapter over the archive transport) and `registry.py` for `docker://`.
They implement :class:`Transport`, and :data:`TRANSPORTS` is the one place that maps a reference's
transport to its implementation: adding one (a store, `containers-storage:`) is a new module and a
new row here, with no branch anywhere else.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from converter.oci import archive, daemon, layout, registry
from converter.oci.image import Image
from converter.oci.model import Descriptor, Platform
from converter.oci.reference import Reference
from converter.oci.reference import Transport as Kind

WORK_TAG = "imgconv"


@dataclass(frozen=True)
class Built:
    """A finished image waiting for delivery."""

    layout: Path  # a private layout holding exactly one image, tagged WORK_TAG
    manifest: Descriptor
    config: Descriptor
    layers: tuple[Descriptor, ...]

    @property
    def tag(self) -> str:
        """The tag naming the image in its private layout (so that a transport needs no import of this module)."""
        return WORK_TAG


class Transport(Protocol):
    """Both directions of one transport."""

    def open(self, ref: Reference, *, platform: Platform | None, tls_verify: bool) -> AbstractContextManager[Image]:
        """The image *ref* names, manifest and config verified; its temporaries and handles live as long as the
        block (the caller never reaches into the store to release them)."""
        ...

    def check_destination(self, ref: Reference, force: bool) -> None:
        """Fail before any work when *ref* cannot be written."""
        ...

    def write(self, built: Built, ref: Reference, *, tls_verify: bool, scratch: Path) -> str | None:
        """Put *built* at *ref*, complete or not at all; the manifest digest where the destination keeps one."""
        ...


TRANSPORTS: Mapping[Kind, Transport] = {
    Kind.OCI: layout.TRANSPORT,
    Kind.DOCKER_ARCHIVE: archive.TRANSPORT,
    Kind.DOCKER_DAEMON: daemon.TRANSPORT,
    Kind.DOCKER: registry.TRANSPORT,
}


def open_image(ref: Reference, *, platform: Platform | None = None,
               tls_verify: bool = True) -> AbstractContextManager[Image]:
    """Yield the image *ref* names, its manifest and config already verified.

    Layers are verified as they are read (``Image.open_layer``). Temporary copies (a registry
    download, a daemon export, a decompressed archive) live only as long as the block.
    """
    return TRANSPORTS[ref.transport].open(ref, platform=platform, tls_verify=tls_verify)


def check_destination(ref: Reference, force: bool = True) -> None:
    """Fail before the work when the destination cannot be written."""
    TRANSPORTS[ref.transport].check_destination(ref, force)


def deliver(built: Built, ref: Reference, *, tls_verify: bool, scratch: Path) -> str | None:
    """Put the image at *ref*; returns the manifest digest where the destination has one."""
    return TRANSPORTS[ref.transport].write(built, ref, tls_verify=tls_verify, scratch=scratch)
