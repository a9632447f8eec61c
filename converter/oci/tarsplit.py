"""Layer tars kept as tar-split records, so that vm-to-oci can give back each original layer byte for byte.

A disk holds the image's final files, not its layer tars; re-serialising the files gives other diff_ids and so
another image ID. As containers/storage's tar-split does, oci-to-qcow2 records each layer's bytes in order,
except the contents of the files the disk will hold: every header block, PAX and GNU long-name body, padding,
end-of-archive and trailing zero block is kept ("r" lines), and a file the disk holds is one line naming its
path, size and sha256 ("f"). Contents the disk will not hold (files a newer layer deletes or replaces, sparse
files, whose stored form is not the file) are kept as raw bytes too: they are the price of identity.

Records are gzip-compressed JSON lines, one file per layer, the first line saying the layer's diff_id and size:
``{"diff_id": "sha256:...", "size": N}``, then ``{"r": BASE64}`` and ``{"f": PATH, "s": SIZE, "h": HEX}``;
a layer that cannot be recorded says why (``{"x": REASON}``) and is given back re-serialised.

On the way back a record is untrusted (it comes from the disk): lines and raw bytes are bounded, a file line
must name a file the disk holds with that very size and sha256 (each path once), and the reassembled layer
must have the recorded diff_id, which must be the config's.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, BinaryIO, cast

from converter.errors import DiskError
from converter.oci.flatten import DIR, flatten
from converter.oci.image import LayerInput
from converter.oci.layout import LayoutWriter
from converter.oci.model import Descriptor, MediaType, canonical_json
from converter.oci.tarread import Entry
from converter.oci.tree import Signature, SignatureIndex, signature
from converter.oci.writer import LAYER_MEDIA_TYPES

RAW_CHUNK = 48 << 10  # raw bytes per line (64 KiB of base64)
MAX_LINE = 1 << 20  # a longer line is not one imgconv wrote
# Bytes the tee keeps before deciding they are raw: the flattener's reader runs ahead of the entry it is at by
# at most one read (1 MiB buffers, 2 MiB of special headers); a file region older than this is given up on.
LOOKBEHIND = 16 << 20
_HEX = re.compile(r"[0-9a-f]{64}")


class TarSplitError(DiskError):
    """A record the disk holds is malformed or exceeds its bounds (vm-to-oci then builds new layers)."""


def record_name(index: int) -> str:
    """The record of layer *index*, under the disk's /.imgconv."""
    return f"layer-{index}.tar-split.gz"


# -- recording (oci-to-qcow2) --------------------------------------------------------------------------------


class _LayerRecord:
    """One layer's record being written: raw bytes are batched into lines, file regions hashed and dropped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sink = path.open("wb")
        self.file = gzip.GzipFile(filename="", mode="wb", fileobj=self.sink, mtime=0)
        self.lines = io.BytesIO()
        self.raw = bytearray()
        self.whole = hashlib.sha256()
        self.size = 0
        self.broken: str | None = None
        self.paths: set[str] = set()

    def add_raw(self, data: bytes) -> None:
        self.raw += data
        while len(self.raw) >= RAW_CHUNK:
            self._line({"r": base64.b64encode(bytes(self.raw[:RAW_CHUNK])).decode()})
            del self.raw[:RAW_CHUNK]

    def add_file(self, path: str, size: int, sha256: str) -> None:
        if self.raw:
            self._line({"r": base64.b64encode(bytes(self.raw)).decode()})
            self.raw.clear()
        self._line({"f": path, "s": size, "h": sha256})

    def _line(self, doc: dict[str, object]) -> None:
        self.lines.write(json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode() + b"\n")
        if self.lines.tell() > 1 << 20:
            self.file.write(self.lines.getvalue())
            self.lines = io.BytesIO()

    def finish(self) -> None:
        """Flush the last lines; the header line (the diff_id, known only at the end) goes in front later."""
        if self.raw:
            self._line({"r": base64.b64encode(bytes(self.raw)).decode()})
        self.file.write(self.lines.getvalue())
        self.file.close()
        self.sink.close()


class Recorder:
    """A flattener tap (:class:`converter.oci.flatten.LayerTap`): records each layer into *directory* as the
    flattener reads it, in the same pass. The flattener says which regular files it keeps (newest layer first:
    a kept entry is what the disk holds at its path); every other byte is raw."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.count = 0  # layers seen, newest first
        self._current: _Tee | None = None

    def layer(self, what: str, stream: BinaryIO) -> BinaryIO:
        self.count += 1
        body = self.directory / f"body-{self.count}"
        self._current = _Tee(stream, _LayerRecord(body))
        return cast(BinaryIO, self._current)

    def kept(self, member: tarfile.TarInfo, path: str) -> None:
        if self._current is None or (isinstance(member, Entry) and member.runs is not None):
            return  # a sparse file's stored form is not the file: raw
        self._current.claim(path, member.offset_data, member.size)

    def end(self) -> None:
        """The layer was read: the rest of it (end-of-archive blocks, trailing zeros) is raw too."""
        if self._current is not None:
            self._current.finish()
            self._current = None

    def write_records(self, diff_ids: list[str]) -> list[tuple[str, Path]]:
        return finish_records(self.directory, diff_ids)


def finish_records(directory: Path, diff_ids: list[str]) -> list[tuple[str, Path]]:
    """The records a :class:`Recorder` left in *directory*, as files (name under /.imgconv, host path), oldest
    layer first. The flattener reads the newest layer first, so the bodies are numbered backwards."""
    out = []
    for index, diff_id in enumerate(diff_ids):
        body = directory / f"body-{len(diff_ids) - index}"
        out.append((record_name(index), _with_header(body, diff_id)))
    return out


def _with_header(body: Path, diff_id: str) -> Path:
    """Prefix the body with its header line, checking that the bytes seen were the layer's (its diff_id)."""
    meta = json.loads((body.parent / (body.name + ".meta")).read_text())
    header: dict[str, object] = {"diff_id": diff_id, "size": meta["size"]}
    if meta["diff_id"] != diff_id:
        header["x"] = "the layer read differently from its diff_id"
    elif meta["broken"]:
        header["x"] = meta["broken"]
    path = body.parent / (body.name + ".tar-split.gz")
    with path.open("wb") as out:
        out.write(gzip.compress(json.dumps(header).encode() + b"\n", mtime=0))
        if "x" not in header:
            with body.open("rb") as data:  # concatenated gzip members are one gzip stream
                shutil.copyfileobj(data, out, 1 << 20)
    return path


class _Tee(io.RawIOBase):
    """The layer's stream as the flattener reads it, every byte also given to the record: bytes at positions
    the flattener claims for a kept file are hashed, the rest is raw. Bytes are held back up to LOOKBEHIND, as
    a claim comes after the reader has read a little beyond the entry's header."""

    def __init__(self, inner: BinaryIO, record: _LayerRecord) -> None:
        super().__init__()
        self.inner, self.record = inner, record
        self.held = bytearray()
        self.base = 0  # stream position of held[0]
        self.claim_at: tuple[str, int, int, hashlib._Hash] | None = None

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.inner.read(size)
        if data:
            self.record.whole.update(data)
            self.record.size += len(data)
            self.held += data
            self._settle(self.base + len(self.held) - LOOKBEHIND)
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        memoryview(buffer)[: len(data)] = data
        return len(data)

    def claim(self, path: str, start: int, size: int) -> None:
        if self.record.broken is not None or size == 0:
            return  # an empty file has no bytes to take from the disk
        if path in self.record.paths:
            self.record.broken = f"the layer has {path!r} twice"
            return
        self.record.paths.add(path)
        self._settle(start)
        if self.base != start:  # already given up as raw: the reader ran further ahead than LOOKBEHIND
            self.record.broken = f"{path!r} was read too far ahead"
            return
        self.claim_at = (path, start, start + size, hashlib.sha256())
        self._settle(start + size)

    def _settle(self, upto: int) -> None:
        """Decide the held bytes before position *upto*: hashed if claimed, raw otherwise."""
        while self.held and self.base < upto:
            claim = self.claim_at
            if claim is not None and self.base >= claim[1]:
                take = min(upto, claim[2], self.base + len(self.held)) - self.base
                claim[3].update(self.held[:take])
            else:
                stop = upto if claim is None else min(upto, claim[1])
                take = min(stop, self.base + len(self.held)) - self.base
                self.record.add_raw(bytes(self.held[:take]))
            del self.held[:take]
            self.base += take
            if claim is not None and self.base == claim[2]:
                self.record.add_file(claim[0], claim[2] - claim[1], claim[3].hexdigest())
                self.claim_at = None

    def finish(self) -> None:
        while self.read(1 << 20):
            pass
        self._settle(self.base + len(self.held))
        if self.claim_at is not None:
            self.record.broken = "the layer ended inside a file"
        self.record.finish()
        meta = {"size": self.record.size, "diff_id": "sha256:" + self.record.whole.hexdigest(),
                "broken": self.record.broken}
        self.record.path.with_name(self.record.path.name + ".meta").write_text(json.dumps(meta))


# -- reassembling (vm-to-oci) --------------------------------------------------------------------------------


class DiskFiles:
    """vm-to-oci's layer writer seen through: every file's signature, and the content of the regular files the
    records name kept in a content-addressed spool (*spool*), so that layers can be reassembled afterwards
    without reading the disk again."""

    def __init__(self, inner: object, spool: Path, wanted: dict[str, tuple[str, int]]) -> None:
        self.inner = inner
        self.spool = spool
        spool.mkdir(parents=True, exist_ok=True)
        self.wanted = {sha for sha, _ in wanted.values()}  # sha256 hex of the contents the records name
        # A file is spooled if a record may want it: tar-out names a hard-linked file by whichever of its names
        # it meets first, so a content is looked for by its size rather than by its recorded path.
        self.sizes = {size for _, size in wanted.values()}
        self.index = SignatureIndex()

    def add(self, info: tarfile.TarInfo, data: IO[bytes] | None = None) -> None:
        if not info.isreg() or data is None:
            self.index.addfile(info, None)
            self.inner.add(info, data)  # type: ignore[attr-defined]
            return
        if info.size not in self.sizes:  # no record takes it: hashed on its way, not kept
            hashing = _Hashing(data)
            self.inner.add(info, hashing)  # type: ignore[attr-defined]
            while hashing.read(1 << 20):  # whatever the writer left unread still counts
                pass
            self.index.entries[info.name.strip("/")] = signature(info, hashing.hash.hexdigest())
            return
        temp = self.spool / ".incoming"
        digest = hashlib.sha256()
        with temp.open("w+b") as out:
            remaining = info.size
            while remaining > 0 and (chunk := data.read(min(remaining, 1 << 20))):
                out.write(chunk)
                digest.update(chunk)
                remaining -= len(chunk)
            out.seek(0)
            self.inner.add(info, out)  # type: ignore[attr-defined]
        self.index.entries[info.name.strip("/")] = signature(info, digest.hexdigest())
        if digest.hexdigest() in self.wanted:
            os.replace(temp, self.spool / digest.hexdigest())
        else:
            temp.unlink()

    def attach(self, inner: object) -> DiskFiles:
        """Pass the files on to *inner* (the fallback layer's writer) as they are seen."""
        self.inner = inner
        return self

    @property
    def signatures(self) -> dict[str, Signature]:
        return self.index.entries


def record_lines(path: Path, max_raw: int, spent: list[int] | None = None) -> Iterator[dict[str, object]]:
    """The lines of a record, bounded: each line, and all raw bytes together (*max_raw*; with *spent*, a running
    count shared by the records of one image, so that many layers cannot each take the whole budget)."""
    raw = 0 if spent is None else spent[0]
    with gzip.open(path, "rb") as stream:
        while line := stream.readline(MAX_LINE + 1):
            if len(line) > MAX_LINE:
                raise TarSplitError(f"{path.name}: a line longer than {MAX_LINE} bytes")
            try:
                doc = json.loads(line)
            except ValueError as exc:
                raise TarSplitError(f"{path.name}: not a tar-split record: {exc}") from exc
            if not isinstance(doc, dict):
                raise TarSplitError(f"{path.name}: not a tar-split record")
            if "r" in doc:
                raw += len(str(doc["r"])) * 3 // 4
                if raw > max_raw:
                    raise TarSplitError(f"{path.name}: more than {max_raw} raw bytes")
                if spent is not None:
                    spent[0] = raw
            yield doc


def reassemble(record: Path, diff_id: str, files: DiskFiles, used: set[str], out: BinaryIO, max_raw: int,
               spent: list[int] | None = None) -> str | None:
    """Write the layer *record* describes into *out*: None if it is the layer *diff_id*, else why not."""
    lines = record_lines(record, max_raw, spent)
    header = next(lines, None)
    if header is None or header.get("diff_id") != diff_id:
        return f"{record.name} is not the record of {diff_id}"
    if "x" in header:
        return f"layer {diff_id} was not recorded ({header['x']})"
    whole = hashlib.sha256()
    for doc in lines:
        if "r" in doc:
            try:
                chunk = base64.b64decode(str(doc["r"]), validate=True)
            except ValueError as exc:
                raise TarSplitError(f"{record.name}: bad raw bytes: {exc}") from exc
        else:
            chunk = b""
            why = _file_line(doc, files, used)
            if why is not None:
                return why
            with (files.spool / str(doc["h"])).open("rb") as data:
                while block := data.read(1 << 20):
                    whole.update(block)
                    out.write(block)
        whole.update(chunk)
        out.write(chunk)
    if "sha256:" + whole.hexdigest() != diff_id:
        return f"layer {diff_id} reassembles to sha256:{whole.hexdigest()}"
    return None


def _file_line(doc: dict[str, object], files: DiskFiles, used: set[str]) -> str | None:
    """Check a file line against the disk: the path holds a regular file of that size and sha256, named once."""
    path, size, sha = doc.get("f"), doc.get("s"), doc.get("h")
    if not isinstance(path, str) or not isinstance(size, int) or not isinstance(sha, str) or not _HEX.fullmatch(sha):
        raise TarSplitError("a malformed file line in a tar-split record")
    if path in used:
        raise TarSplitError(f"a tar-split record names {path!r} twice")
    used.add(path)
    sig = files.signatures.get(path)
    if sig is None or sig.type != tarfile.REGTYPE or sig.sha256 != sha or sig.size != size:
        return f"/{path} changed"
    if not (files.spool / sha).is_file():
        return f"/{path} was not kept"
    return None


def tree_changes(layers: list[Path], files: DiskFiles) -> str | None:
    """None if the disk's files are those of the flattened *layers* (as `--base` compares them), else the first
    difference found."""
    index = SignatureIndex()
    inputs = [LayerInput(f"reassembled layer {i}", functools.partial(_open, path)) for i, path in enumerate(layers)]
    tree = flatten(inputs, index)
    disk = files.signatures
    for path, sig in index.entries.items():
        if disk.get(path) != sig:
            return f"/{path} changed" if path in disk else f"/{path} was removed"
    for path in disk:
        # A directory no layer names but entries beneath it imply has no entry of its own: the disk holds it as
        # the conversion made it (0755, root's).
        if path not in index.entries and not (disk[path] == IMPLIED_DIR and tree.kinds.get(path) == DIR):
            return f"/{path} was added"
    return None


IMPLIED_DIR = Signature(tarfile.DIRTYPE, 0o755, 0, 0, 0, "", "", (0, 0), ())


def wanted_hashes(records: list[Path], max_raw: int) -> dict[str, tuple[str, int]]:
    """The contents the records take from the disk (what :class:`DiskFiles` keeps in its spool): path -> (sha256,
    size)."""
    wanted = {}
    for record in records:
        for doc in record_lines(record, max_raw):
            path, sha, size = doc.get("f"), doc.get("h"), doc.get("s")
            if isinstance(path, str) and isinstance(sha, str) and _HEX.fullmatch(sha) and isinstance(size, int):
                wanted[path] = (sha, size)
    return wanted


class _Hashing(io.RawIOBase):
    """A file's content on its way into the layer, hashed as it passes."""

    def __init__(self, inner: IO[bytes]) -> None:
        super().__init__()
        self.inner, self.hash = inner, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        data = self.inner.read(-1 if size is None else size)
        self.hash.update(data)
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        memoryview(buffer)[: len(data)] = data
        return len(data)


def write_restored(layout: LayoutWriter, layers: list[Path], config: bytes, compression: str,
                   tag: str) -> tuple[Descriptor, Descriptor, list[Descriptor]]:
    """The original image in *layout*: the reassembled layers compressed anew (so their blobs, and the manifest,
    may differ from the source's: the original compressed bytes are not kept), and the original config's very
    bytes (so the image ID is the original's). Returns the manifest's, the config's and the layers' descriptors."""
    descriptors = []
    for path in layers:
        out, temp = layout.temp_blob()
        try:
            with out, path.open("rb") as data:
                packed: IO[bytes]
                if compression == "zstd":
                    import zstandard

                    packed = cast(IO[bytes], zstandard.ZstdCompressor(level=3).stream_writer(out, closefd=False))
                else:
                    packed = cast(IO[bytes], gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0,
                                                           compresslevel=6))  # as LayerWriter compresses
                with packed:
                    while chunk := data.read(1 << 20):
                        packed.write(chunk)
            digest = "sha256:" + _file_sha256(temp)
            size = temp.stat().st_size
            layout.commit_blob(temp, digest)
        finally:
            temp.unlink(missing_ok=True)
        descriptors.append(Descriptor(LAYER_MEDIA_TYPES[compression], digest, size))
    config_desc = layout.add_bytes(config, MediaType.OCI_CONFIG)
    manifest = {"schemaVersion": 2, "mediaType": MediaType.OCI_MANIFEST, "config": config_desc.to_json(),
                "layers": [d.to_json() for d in descriptors]}
    return layout.add_manifest(canonical_json(manifest), MediaType.OCI_MANIFEST, tag), config_desc, descriptors


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as data:
        while chunk := data.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def restore(records: list[Path], diff_ids: list[str], files: DiskFiles, out_dir: Path,
            max_raw: int) -> list[Path] | str:
    """The original layer tars (uncompressed, in *out_dir*) if the disk's files are the image's own, else why
    not (a changed file, a layer not recorded, a record that does not match the config)."""
    if len(records) != len(diff_ids):
        return f"the disk holds {len(records)} layer records for {len(diff_ids)} layers"
    used: set[str] = set()
    spent = [0]  # raw bytes of all the records together: at most *max_raw*
    paths = []
    for index, (record, diff_id) in enumerate(zip(records, diff_ids, strict=True)):
        path = out_dir / f"layer-{index}.tar"
        with path.open("wb") as out:
            why = reassemble(record, diff_id, files, used, out, max_raw, spent)
        if why is not None:
            return why
        paths.append(path)
    return tree_changes(paths, files) or paths


def _open(path: Path) -> BinaryIO:
    return path.open("rb")
