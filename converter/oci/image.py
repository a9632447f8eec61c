"""An image: a verified manifest and config over a store of blobs.

Transports only provide a :class:`BlobStore` (and where to start); resolving an index to a
platform, reading and verifying the manifest and config, and opening layers is the same for
every transport and lives here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from converter.errors import ImageError
from converter.oci.blobs import open_layer_stream, read_verified
from converter.oci.model import (
    INDEX_TYPES,
    LAYER_COMPRESSION,
    MANIFEST_TYPES,
    Descriptor,
    ImageConfig,
    Index,
    Manifest,
    Platform,
)


class BlobStore(Protocol):
    """Where a transport keeps blobs. Returned streams are raw: the caller verifies them."""

    def open_blob(self, digest: str) -> BinaryIO: ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class LayerInput:
    """One layer to flatten: how to name it in errors and how to open its uncompressed tar."""

    what: str
    open: Callable[[], AbstractContextManager[BinaryIO]]


@dataclass(frozen=True)
class Layer:
    index: int
    descriptor: Descriptor
    diff_id: str

    @property
    def compression(self) -> str:
        return LAYER_COMPRESSION[self.descriptor.media_type]

    @property
    def what(self) -> str:
        return f"layer {self.index} ({self.descriptor.digest})"


@dataclass(frozen=True)
class Image:
    source: str
    manifest: Manifest
    config: ImageConfig
    store: BlobStore
    index_digest: str | None = None

    @property
    def image_id(self) -> str:
        """The config digest: the same whichever transport the image was read from."""
        return self.config.digest

    @property
    def manifest_digest(self) -> str | None:
        return self.manifest.digest

    @property
    def layers(self) -> tuple[Layer, ...]:
        return tuple(
            Layer(i, desc, diff_id)
            for i, (desc, diff_id) in enumerate(zip(self.manifest.layers, self.config.diff_ids, strict=True))
        )

    def layer_inputs(self) -> tuple[LayerInput, ...]:
        """The layers as the flattener takes them, each verified as it is read."""
        return tuple(LayerInput(layer.what, functools.partial(self.open_layer, layer)) for layer in self.layers)

    def open_layer(self, layer: Layer) -> AbstractContextManager[BinaryIO]:
        """The layer's uncompressed tar, verified against its digest, size and diff_id as it is read."""
        desc = layer.descriptor
        return open_layer_stream(
            lambda: self.store.open_blob(desc.digest),
            digest=desc.digest,
            size=desc.size,
            compression=layer.compression,
            diff_id=layer.diff_id,
            what=layer.what,
        )


def read_json_blob(store: BlobStore, desc: Descriptor, what: str) -> bytes:
    raw = store.open_blob(desc.digest)
    try:
        return read_verified(raw, desc.digest, desc.size, what)
    finally:
        raw.close()


def resolve(
    store: BlobStore, top: Descriptor, platform: Platform | None, source: str, *, index_digest: str | None = None
) -> Image:
    """Follow *top* (an index or a manifest) down to one image for *platform*, verifying every blob.

    *platform* None means "the host's" for an index, and "whatever it is" for a single manifest.
    """
    desc = top
    for _depth in range(4):  # an index of indexes is legal; a loop is not
        if desc.media_type in INDEX_TYPES:
            index = Index.parse(read_json_blob(store, desc, f"image index {desc.digest}"),
                                f"image index {desc.digest}")
            index_digest = index_digest or desc.digest
            desc = index.select(platform or Platform.host())
            continue
        if desc.media_type not in MANIFEST_TYPES:
            raise ImageError(f"{source}: {desc.digest} has unsupported media type {desc.media_type!r}")
        manifest = Manifest.parse(read_json_blob(store, desc, f"manifest {desc.digest}"),
                                  f"manifest {desc.digest}", desc.media_type)
        return from_manifest(store, manifest, source, platform, index_digest=index_digest)
    raise ImageError(f"{source}: image indexes nested too deeply")


def from_manifest(
    store: BlobStore, manifest: Manifest, source: str, platform: Platform | None, *, index_digest: str | None = None
) -> Image:
    config = ImageConfig.parse(read_json_blob(store, manifest.config, f"config {manifest.config.digest}"),
                               f"config {manifest.config.digest}")
    if len(config.diff_ids) != len(manifest.layers):
        raise ImageError(
            f"{source}: the manifest lists {len(manifest.layers)} layers but the config has "
            f"{len(config.diff_ids)} diff_ids"
        )
    if platform is not None and not platform.matches(config.platform):
        raise ImageError(f"{source} is for platform {config.platform}, not {platform}")
    return Image(source, manifest, config, store, index_digest)

