"""The records imgconv writes and prints: sidecar, origin record, inspect report, export result.

They overlap (every one names the image it is about), so they share one :class:`ImageIdentity` built from
an :class:`~converter.oci.image.Image`, and they are serialised in one place (:func:`to_json`), with the
identity's fields at the top level where scripts and earlier disks expect them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from converter.oci.image import Image


@dataclass(frozen=True)
class LayerRecord:
    digest: str
    media_type: str
    size: int
    diff_id: str


@dataclass(frozen=True)
class ImageIdentity:
    """Which image a record is about: the same whichever transport it was read from (the image ID)."""

    source: str
    image_id: str  # the config digest
    manifest_digest: str | None
    index_digest: str | None
    layers: tuple[LayerRecord, ...]

    @classmethod
    def of(cls, image: Image) -> ImageIdentity:
        return cls(
            source=image.source, image_id=image.image_id, manifest_digest=image.manifest_digest,
            index_digest=image.index_digest,
            layers=tuple(LayerRecord(layer.descriptor.digest, layer.descriptor.media_type, layer.descriptor.size,
                                     layer.diff_id) for layer in image.layers),
        )


@dataclass(frozen=True)
class KernelRecord:
    release: str
    origin: str
    # --kernel PACKAGE.deb: "sha256:HEX" of the package; left out of the JSON for other kernels, whose records
    # stay as they were.
    package_sha256: str = field(default="", metadata={"omit_empty": True})


@dataclass(frozen=True)
class BootEntry:
    """What a disk's bootloader boots: paths inside its root filesystem, and the kernel command line.
    Recorded in the sidecar, so that tools booting the same kernel directly need not parse the bootloader's
    configuration back."""

    kernel: str  # e.g. /.imgconv/boot/vmlinuz-6.1.0-57-cloud-amd64
    initrd: str
    cmdline: str
    kernel_sha256: str = ""  # of the kernel file booted (the provenance statement names it); "" in older sidecars


@dataclass(frozen=True)
class RunRecord:
    """What the disk runs: Entrypoint + Cmd with the image's User and WorkingDir."""

    argv: tuple[str, ...]
    user: str
    cwd: str


@dataclass(frozen=True)
class OriginRecord:
    """`/.imgconv/origin.json` in a disk: where it came from and every path imgconv added (vm-to-oci takes
    exactly those out again)."""

    imgconv: str
    identity: ImageIdentity
    kernel: KernelRecord
    injected: tuple[str, ...]
    touched_dirs: dict[str, float]
    options: dict[str, Any]


@dataclass(frozen=True)
class BuildRecord:
    """The sidecar `OUTPUT.json` and `oci-to-qcow2 --json`'s result."""

    imgconv: str
    identity: ImageIdentity
    config_digest: str
    kernel: KernelRecord
    boot: BootEntry
    format: str
    virtual_size: int
    options: dict[str, Any]
    created: str
    run: RunRecord
    firmware: str = "bios"  # bios | uefi | both (--firmware): what the disk boots under
    # An incremental rebuild: the store version (sha256:HEX) whose disk it started from; left out otherwise.
    built_on: str = field(default="", metadata={"omit_empty": True})
    sha256: str = ""
    size: int = 0
    output: str = ""


@dataclass(frozen=True)
class InspectRecord:
    """`imgconv inspect`'s report: the identity, then what `docker inspect` users look for first."""

    identity: ImageIdentity
    platform: str  # os/arch[/variant], normalised as the OCI spec's platform matching does
    created: Any  # as the config has it (untrusted: shown quoted)
    config: dict[str, Any]  # Entrypoint, Cmd, Env, WorkingDir, User, ExposedPorts, Labels


@dataclass(frozen=True)
class OsRecord:
    """The operating system libguestfs inspection found on a foreign disk (strings from the guest, cleaned)."""

    distro: str
    version: str
    product: str
    root: str  # the device of its root filesystem


@dataclass(frozen=True)
class DiskSource:
    disk: str
    format: str
    sha256: str | None
    virtual_size: int | None
    made_by_imgconv: bool
    os: OsRecord | None


@dataclass(frozen=True)
class NewLayer:
    digest: str
    diff_id: str
    entries: int


@dataclass(frozen=True)
class ExportRecord:
    """`vm-to-oci`'s result: the image written (its identity's source is the destination) and the disk."""

    identity: ImageIdentity = field(metadata={"rename": {"source": "destination"}})
    new_layer: NewLayer | None  # None when the image's own layers came back (tar-split: the disk is unchanged)
    source: DiskSource
    original_layers: bool = False  # the disk's files were the image's own: its layers, config and image ID


def to_json(record: Any) -> dict[str, Any]:
    """A record as the JSON object imgconv writes: an ``identity`` field is merged into the top level (some
    of its keys renamed where the record says so)."""
    doc: dict[str, Any] = {}
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        if f.name == "identity":
            renames = f.metadata.get("rename", {})
            doc.update({renames.get(key, key): item for key, item in dataclasses.asdict(value).items()})
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            doc[f.name] = {key: item for key, item in dataclasses.asdict(value).items()
                           if item or not _omit_empty(value, key)}
        elif value or not f.metadata.get("omit_empty"):
            doc[f.name] = value
    return doc


def _omit_empty(record: Any, name: str) -> bool:
    """The field *name* of *record* is left out of the JSON when empty (a field added later, kept off older shapes)."""
    return any(f.name == name and f.metadata.get("omit_empty") for f in dataclasses.fields(record))


def dumps(record: Any, *, sort_keys: bool = False) -> str:
    return json.dumps(to_json(record), indent=2, sort_keys=sort_keys, ensure_ascii=False)
