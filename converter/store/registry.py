"""``imgconv store push`` and ``store pull``: a version and its provenance through an OCI registry.

A version travels as a KubeVirt containerDisk, so that KubeVirt can run the pushed image as it is: an image of
one layer holding the disk at ``/disk/NAME.qcow2``, owned by 107:107 (KubeVirt's qemu user) with mode 0440
(KubeVirt's convention: ``FROM scratch`` + ``ADD --chown=107:107 disk.qcow2 /disk/``). The layout is written
by imgconv's own OCI writer (reproducible: one version always gives the same manifest digest) and pushed with
skopeo. The version's sidecar rides in the config as a label, so a pulled version lists its source and time.

The provenance statement goes as a second image in the same repository, tagged ``sha256-HEX.intoto`` after
the disk image's manifest digest (cosign's tag scheme for attestations): a referrer (OCI 1.1 ``subject``)
would be the newer way, but Debian 12's skopeo 1.9 cannot push one, and a tag named by the digest binds the
statement to those exact bytes however the disk's own tag moves. Its one layer is the statement itself
(``application/vnd.in-toto+json``).

Pulling trusts nothing it reads: the blobs are verified by digest (converter/oci/registry.py), the layer is read
by the bounded tar reader, and it must hold one regular file, ``disk/NAME.qcow2`` (a qcow2), and at most the
``disk`` directory besides; anything else (a second file, a link, a device, a path outside) is refused in
one line. The disk's sha256 must be the one the pushed sidecar and statement name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from converter.artifact import temp_beside
from converter.errors import ImageError, ReferenceError_, ToolError
from converter.oci import registry
from converter.oci.image import Image
from converter.oci.layout import LayoutWriter
from converter.oci.model import Descriptor, load_json, sha256_digest
from converter.oci.reference import DockerName, Reference, Transport, parse_reference
from converter.oci.tarutil import read_members
from converter.oci.writer import LayerWriter, write_image
from converter.run import run
from converter.scratch import scratch_dir
from converter.store.reference import StoreRef
from converter.store.store import Store, Version, store_root

DISK_DIR = "disk"
QEMU_ID = 107  # KubeVirt's qemu user and group, which must be able to read the disk
DISK_MODE = 0o440
STATEMENT_MEDIA_TYPE = "application/vnd.in-toto+json"
SIDECAR_LABEL = "io.imgconv.sidecar"
MAX_STATEMENT = 1 << 20  # a statement is a few KiB; more is not one
QCOW2_MAGIC = b"QFI\xfb"
LAYOUT_TAG = "disk"


class ContainerDiskError(ImageError):
    """A pulled image is not a containerDisk imgconv takes, or not the version it claims to be."""


@dataclass(frozen=True)
class Moved:
    """What push or pull did: the version, where, and whether a statement went along."""

    version: str  # the store reference
    image: str  # docker://... as given
    sha256: str
    manifest_digest: str
    statement_tag: str | None  # the tag the statement is (or was found) under; None: there was none


def statement_tag(manifest_digest: str) -> str:
    """The tag the statement of the disk image with *manifest_digest* is pushed under."""
    algorithm, _, hex_digest = manifest_digest.partition(":")
    return f"{algorithm}-{hex_digest}.intoto"


def docker_name(text: str, *, for_push: bool) -> DockerName:
    """IMAGE of push and pull: a docker:// reference; push needs a tag (a digest is what the registry gives)."""
    ref: Reference = parse_reference(text)
    if ref.transport is not Transport.DOCKER or ref.name is None:
        raise ReferenceError_(f"{text!r}: store push and pull take a registry image, docker://REGISTRY/REPO:TAG")
    if for_push and ref.name.digest is not None:
        raise ReferenceError_(f"{text!r}: push to a tag (docker://REGISTRY/REPO:TAG), not a digest")
    return ref.name


def disk_file_name(ref: StoreRef) -> str:
    """The disk's name in the image: the store name's last component (``team/app`` gives ``app.qcow2``)."""
    return f"{ref.name.rsplit('/', 1)[-1]}.qcow2"


# -- push ---------------------------------------------------------------------------------------------------------


def write_containerdisk(layout: LayoutWriter, version: Version, file_name: str) -> Descriptor:
    """The containerDisk image of *version* in *layout* under LAYOUT_TAG; every time in it is 0, so one version
    always gives the same image."""
    with LayerWriter(layout, "gzip") as layer:
        folder = tarfile.TarInfo(DISK_DIR)
        folder.type, folder.mode, folder.uid, folder.gid = tarfile.DIRTYPE, 0o555, QEMU_ID, QEMU_ID
        layer.add(folder)
        info = tarfile.TarInfo(f"{DISK_DIR}/{file_name}")
        info.size, info.mode, info.uid, info.gid = version.path.stat().st_size, DISK_MODE, QEMU_ID, QEMU_ID
        with version.path.open("rb") as data:
            layer.add(info, data)
    assert layer.result is not None  # set by a clean __exit__
    config = {
        "architecture": "amd64", "os": "linux", "created": "1970-01-01T00:00:00Z",
        "rootfs": {"type": "layers", "diff_ids": [layer.result.diff_id]},
        "config": {"Labels": {SIDECAR_LABEL: json.dumps(version.sidecar, sort_keys=True)}},
    }
    return write_image(layout, config, [layer.result.descriptor], LAYOUT_TAG)[0]


def write_statement_image(layout: LayoutWriter, statement: bytes, tag: str) -> None:
    """The statement as an image of one non-tar layer (the statement's bytes), with a config that names it, so
    that registries and skopeo 1.9 take it as any image."""
    blob = layout.add_bytes(statement, STATEMENT_MEDIA_TYPE)
    config = {"architecture": "amd64", "os": "linux", "created": "1970-01-01T00:00:00Z",
              "rootfs": {"type": "layers", "diff_ids": [blob.digest]}}
    write_image(layout, config, [blob], tag)


def push_version(ref: StoreRef, image: str, tls_verify: bool) -> Moved:
    """Push the version *ref* names to *image* (docker://...), and its statement, if it has one, beside it."""
    name = docker_name(image, for_push=True)
    with Store(store_root()).use(ref) as version, scratch_dir() as scratch:
        layout = LayoutWriter(scratch / "layout")
        write_containerdisk(layout, version, disk_file_name(ref))
        digest = _pushed(layout.root, LAYOUT_TAG, name, tls_verify, scratch, image)
        proof = version.path.with_name(version.path.name + ".intoto.json")
        tag = None
        if proof.is_file():
            tag = statement_tag(digest)
            write_statement_image(layout, proof.read_bytes(), "statement")
            _pushed(layout.root, "statement", dataclasses.replace(name, tag=tag, digest=None), tls_verify, scratch,
                    image)
        return Moved(str(ref), image, version.sha256, digest, tag)


def _pushed(layout: Path, tag: str, name: DockerName, tls_verify: bool, scratch: Path, image: str) -> str:
    try:
        return registry.push(layout, tag, name, tls_verify, scratch)
    except ToolError as exc:
        raise registry.registry_error(image, exc) from exc


# -- pull ---------------------------------------------------------------------------------------------------------


def pull_version(image: str, ref: StoreRef, tls_verify: bool) -> Moved:
    """Pull the containerDisk *image* into the store as a version, tagged *ref*, with its statement."""
    name = docker_name(image, for_push=False)
    store = Store(store_root())
    store.ensure()
    with scratch_dir() as scratch:
        (scratch / "disk").mkdir()
        try:
            pulled = registry.pull(name, None, tls_verify, scratch / "disk", image)
        except ToolError as exc:
            raise registry.registry_error(image, exc) from exc
        digest = pulled.manifest_digest or ""
        sidecar = _sidecar(pulled)
        statement, tag = _statement(name, digest, tls_verify, scratch, image)
        with temp_beside(store.work_path) as temp:
            sha256 = _unpack_disk(pulled, temp, image)
            _check_claims(image, sha256, sidecar, statement)
            store.publish(temp, {**sidecar, "pulled_from": image, "pulled_manifest": digest}, ref, "pull",
                          (lambda _sha: statement) if statement is not None else None)
    return Moved(str(ref), image, sha256, digest, tag)


def _sidecar(image: Image) -> dict[str, Any]:
    """The pushed sidecar (a label of the config), or nothing when absent or not a JSON object."""
    labels = image.config.doc.get("config", {}).get("Labels") if isinstance(image.config.doc.get("config"),
                                                                            dict) else None
    text = labels.get(SIDECAR_LABEL) if isinstance(labels, dict) else None
    try:
        doc = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        doc = None
    return doc if isinstance(doc, dict) else {}


def _unpack_disk(image: Image, out: Path, source: str) -> str:
    """The one disk of the containerDisk *image* written to *out*; returns its sha256 (``sha256:HEX``)."""
    if len(image.layers) != 1:
        raise ContainerDiskError(f"{source}: not a containerDisk: {len(image.layers)} layers, not one")
    found, digest = None, hashlib.sha256()
    with image.open_layer(image.layers[0]) as stream:
        for member, tar in read_members(stream, f"{source} layer"):
            name = member.name.strip("/").removeprefix("./")
            if member.isdir() and name in (DISK_DIR, "", "."):
                continue
            head, _, base = name.partition("/")
            if not member.isreg() or head != DISK_DIR or "/" in base or not base.endswith(".qcow2"):
                raise ContainerDiskError(f"{source}: not a containerDisk imgconv takes: it holds {_kind(member)} "
                                         f"/{name} (only one regular file, /{DISK_DIR}/NAME.qcow2)")
            if found is not None:
                raise ContainerDiskError(f"{source}: not a containerDisk imgconv takes: a second disk /{name} "
                                         f"besides /{found}")
            found = name
            _copy(tar.extractfile(member), out, digest, source, name)
    if found is None:
        raise ContainerDiskError(f"{source}: not a containerDisk: no /{DISK_DIR}/NAME.qcow2 in its layer")
    return "sha256:" + digest.hexdigest()


def _kind(member: tarfile.TarInfo) -> str:
    if member.issym() or member.islnk():
        return f"a link (to {member.linkname!r})"
    return "a directory" if member.isdir() else "a regular file" if member.isreg() else "a special file"


def _copy(data: BinaryIO, out: Path, digest: Any, source: str, name: str) -> None:
    with out.open("wb") as f:
        first = True
        while chunk := data.read(1 << 20):
            if first and not chunk.startswith(QCOW2_MAGIC):
                raise ContainerDiskError(f"{source}: /{name} is not a qcow2 disk")
            first = False
            digest.update(chunk)
            f.write(chunk)
        if first:
            raise ContainerDiskError(f"{source}: /{name} is empty, not a qcow2 disk")
        os.fsync(f.fileno())


def _check_claims(source: str, sha256: str, sidecar: dict[str, Any], statement: bytes | None) -> None:
    """The disk must be the one the pushed sidecar and statement name (else a registry or a man in the middle
    changed it, or the statement belongs to another disk)."""
    claimed = sidecar.get("sha256")
    if claimed is not None and claimed != sha256:
        raise ContainerDiskError(f"{source}: the disk is {sha256}, but the image's sidecar says {claimed}")
    if statement is None:
        return
    doc = load_json(statement, f"{source} provenance statement")
    subjects = doc.get("subject")
    subject = subjects[0] if isinstance(subjects, list) and subjects and isinstance(subjects[0], dict) else {}
    named = subject.get("digest", {}).get("sha256") if isinstance(subject.get("digest"), dict) else None
    if f"sha256:{named}" != sha256:
        raise ContainerDiskError(f"{source}: its provenance statement is of another disk (sha256:{named}, "
                                 f"not {sha256})")


def _statement(name: DockerName, digest: str, tls_verify: bool, scratch: Path,
               source: str) -> tuple[bytes | None, str | None]:
    """The statement pushed beside the disk image (its tag, bytes verified by digest), or (None, None)."""
    tag = statement_tag(digest)
    url = f"docker://{dataclasses.replace(name, tag=tag, digest=None)}"
    try:
        raw = run(["skopeo", "inspect", "--raw", *_tls(tls_verify), url], purpose="read the statement").stdout
    except ToolError as exc:
        if isinstance(registry.registry_error(source, exc), ImageError):
            return None, None  # pushed without one (a version made before versions had statements)
        raise registry.registry_error(source, exc) from exc
    layers = load_json(raw, f"{source} statement manifest").get("layers")
    layer = layers[0] if isinstance(layers, list) and len(layers) == 1 and isinstance(layers[0], dict) else {}
    blob, size = layer.get("digest"), layer.get("size")
    if layer.get("mediaType") != STATEMENT_MEDIA_TYPE or not isinstance(blob, str) or not isinstance(size, int) \
            or not 0 < size <= MAX_STATEMENT:
        raise ContainerDiskError(f"{source}: the image tagged {tag} is not an in-toto statement imgconv pushed")
    folder = scratch / "statement"
    run(["skopeo", "copy", "--quiet", *_tls(tls_verify, "src-"), url, f"dir:{folder}"], purpose="read the statement")
    path = folder / blob.removeprefix("sha256:")
    with path.open("rb") if path.is_file() else io.BytesIO() as f:
        data = f.read(MAX_STATEMENT + 1)
    if sha256_digest(data) != blob or len(data) != size:
        raise ContainerDiskError(f"{source}: the statement tagged {tag} does not match its digest {blob}")
    return data, tag


def _tls(tls_verify: bool, prefix: str = "") -> list[str]:
    return [] if tls_verify else [f"--{prefix}tls-verify=false"]
