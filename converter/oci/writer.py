"""Writing images: a tar stream becomes a compressed layer blob, then config, manifest and index.

The layer's two digests (compressed blob, uncompressed diff_id) are computed as the bytes pass,
so a layer is written once, in bounded memory, whatever its size. Output is reproducible: the
gzip header carries no name or time, and with a clamp time (SOURCE_DATE_EPOCH) no entry is newer.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from types import TracebackType
from typing import IO, Any, BinaryIO, cast

from converter.oci.layout import LayoutWriter
from converter.oci.model import Descriptor, MediaType, canonical_json
from converter.oci.tarutil import StreamingTarFile, abandon_output

LAYER_MEDIA_TYPES = {"gzip": MediaType.OCI_LAYER_GZIP, "zstd": MediaType.OCI_LAYER_ZSTD, "none": MediaType.OCI_LAYER}

# Docker's layer media types have OCI twins for the very same bytes.
OCI_EQUIVALENT = {
    MediaType.DOCKER_LAYER: MediaType.OCI_LAYER,
    MediaType.DOCKER_LAYER_GZIP: MediaType.OCI_LAYER_GZIP,
    MediaType.DOCKER_FOREIGN_GZIP: MediaType.OCI_LAYER_ND_GZIP,
}


class _HashingSink(io.RawIOBase):
    """Counts and hashes what is written, passing it on to *inner*."""

    def __init__(self, inner: IO[bytes]) -> None:
        super().__init__()
        self.inner = inner
        self.hash = hashlib.sha256()
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.hash.update(view)
        self.count += len(view)
        self.inner.write(view)
        return len(view)

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


def clamp_mtime(info: tarfile.TarInfo, limit: int) -> None:
    """No entry newer than *limit* (SOURCE_DATE_EPOCH). An exact PAX ``mtime`` record outranks the
    header's own field when tarfile writes it, so it is clamped too (compared exactly, as a decimal)."""
    exact = info.pax_headers.get("mtime")
    if exact is not None:
        try:
            newer = Decimal(exact) > limit
        except ArithmeticError:
            newer = True  # unparsable: never let it through
        if newer:
            info.pax_headers = {k: v for k, v in info.pax_headers.items() if k != "mtime"}
            info.mtime = limit
    if info.mtime > limit:
        info.mtime = limit


@dataclass(frozen=True)
class WrittenLayer:
    descriptor: Descriptor
    diff_id: str
    entries: int


class LayerWriter:
    """`with LayerWriter(layout, "gzip") as layer: layer.add(info, data)`; then ``layer.result``."""

    def __init__(self, layout: LayoutWriter, compression: str = "gzip", *, clamp_mtime: int | None = None,
                 level: int | None = None) -> None:
        self.layout = layout
        self.compression = compression
        self.clamp_mtime = clamp_mtime
        self.level = level
        self.entries = 0
        self.result: WrittenLayer | None = None

    def __enter__(self) -> LayerWriter:
        self._file, self._temp = self.layout.temp_blob()
        self._blob = _HashingSink(self._file)
        blob = cast(IO[bytes], self._blob)
        self._compressor: IO[bytes] | None = None
        if self.compression == "gzip":
            self._compressor = cast(IO[bytes], gzip.GzipFile(filename="", mode="wb", fileobj=blob,
                                                             compresslevel=self.level or 6, mtime=0))
        elif self.compression == "zstd":
            import zstandard

            self._compressor = cast(IO[bytes], zstandard.ZstdCompressor(level=self.level or 3, threads=-1)
                                    .stream_writer(blob, closefd=False))
        self._plain = _HashingSink(self._compressor or blob)
        self.tar = StreamingTarFile.open(fileobj=cast(IO[bytes], self._plain), mode="w|", format=tarfile.PAX_FORMAT,
                                bufsize=1 << 20)
        return self

    def add(self, info: tarfile.TarInfo, data: IO[bytes] | None = None) -> None:
        if self.clamp_mtime is not None:
            clamp_mtime(info, self.clamp_mtime)
        info.uname = info.gname = ""
        self.tar.addfile(info, data)
        self.entries += 1

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if kind is not None:
                # Thrown away: close quietly now, while the temporary file is still open, so that no
                # finaliser writes into a closed stream later (a second, confusing error on stderr).
                abandon_output(self.tar)
                if self._compressor is not None:
                    with contextlib.suppress(Exception):
                        self._compressor.close()
                return
            self.tar.close()
            if self._compressor is not None:
                self._compressor.close()
            self._file.flush()
            digest = self._blob.digest
            self.layout.commit_blob(self._temp, digest)
            self.result = WrittenLayer(
                Descriptor(LAYER_MEDIA_TYPES[self.compression], digest, self._blob.count),
                self._plain.digest, self.entries,
            )
        finally:
            self._file.close()
            self._temp.unlink(missing_ok=True)


def write_image(layout: LayoutWriter, config: Mapping[str, Any], layers: list[Descriptor],
                tag: str | None) -> tuple[Descriptor, Descriptor]:
    """Store *config* and an OCI manifest for *layers*; point the layout's index at it under *tag*."""
    config_desc = layout.add_bytes(canonical_json(config), MediaType.OCI_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MediaType.OCI_MANIFEST,
        "config": config_desc.to_json(),
        "layers": [Descriptor(OCI_EQUIVALENT.get(d.media_type, d.media_type), d.digest, d.size).to_json()
                   for d in layers],
    }
    manifest_desc = layout.add_manifest(canonical_json(manifest), MediaType.OCI_MANIFEST, tag)
    return manifest_desc, config_desc


def copy_blob(source: BinaryIO, layout: LayoutWriter, digest: str) -> None:
    """Copy a blob (an unchanged base layer) into *layout*, verifying it as it is copied."""
    from converter.oci.blobs import VerifiedReader

    if layout.store.blob_path(digest).exists():
        return
    out, temp = layout.temp_blob()
    try:
        with out:
            reader = VerifiedReader(source, digest, None, f"base layer {digest}")
            while chunk := reader.read(1 << 20):
                out.write(chunk)
        layout.commit_blob(temp, digest)
    finally:
        temp.unlink(missing_ok=True)
