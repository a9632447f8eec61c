"""Where a disk came from, as a signed-statement-ready document, and checks of a disk against it.

Each disk oci-to-qcow2 publishes gets, beside its sidecar ``OUTPUT.json``, an in-toto Statement v1
(``OUTPUT.intoto.json``) whose predicate is SLSA provenance v1: the subject is the disk (its file name and
sha256); the resolved dependencies are the source image (its config digest, and its manifest digest where the
source has one), the kernel (release and the sha256 of the file booted, and of the package it came from with
``--kernel PACKAGE.deb``), imgconv's init and imgconv itself; the external parameters are the source reference,
the options and SOURCE_DATE_EPOCH, which is all ``verify --rebuild`` needs to make the same bytes again (disks are
bit-identical: converter/disk/reproducible.py).

A version made by ``imgconv commit`` (converter/store/commit.py) gets a statement of another build type
(:data:`COMMIT_BUILD_TYPE`): what it was made of is a state file and a base version, not a source image, so its
dependencies are the base (its sha256, and the source image the base names) and the state file, and
``verify --rebuild`` refuses it rather than rebuild the base and call the bytes different.

A file of its own rather than a key of the sidecar: it is the exact document in-toto and SLSA tools (and
``cosign attest --predicate``) consume, and the sidecar's format stays what scripts already read.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from converter.artifact import sha256_file, sidecar_path, statement_path
from converter.errors import ImgconvError, UsageError
from converter.progress import Monitor
from converter.records import BuildRecord

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "urn:imgconv:oci-to-qcow2:v1"  # what externalParameters mean: imgconv's oci-to-qcow2 options
COMMIT_BUILD_TYPE = "urn:imgconv:commit:v1"  # externalParameters: the state file, the base's sha256, DEST
BUILDER_ID = "urn:imgconv:local"  # imgconv run by whoever ran it: nothing here is attested by a service


class ProvenanceError(ImgconvError):
    """A statement that is missing or unreadable where one is needed (`imgconv provenance`)."""

    exit_code = UsageError.exit_code


@dataclass(frozen=True)
class Resource:
    """An in-toto ResourceDescriptor: what a build used or made, by name, location and digest."""

    name: str
    digest: dict[str, str]
    uri: str = ""
    annotations: dict[str, Any] = field(default_factory=dict)

    def doc(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "digest": self.digest}
        if self.uri:
            out["uri"] = self.uri
        if self.annotations:
            out["annotations"] = self.annotations
        return out


@dataclass(frozen=True)
class Provenance:
    """The SLSA provenance v1 predicate of one conversion."""

    external: dict[str, Any]
    dependencies: tuple[Resource, ...]
    builder_version: dict[str, str]
    finished: str
    build_type: str = BUILD_TYPE

    def doc(self) -> dict[str, Any]:
        return {
            "buildDefinition": {"buildType": self.build_type, "externalParameters": self.external,
                                "resolvedDependencies": [d.doc() for d in self.dependencies]},
            "runDetails": {"builder": {"id": BUILDER_ID, "version": self.builder_version},
                           "metadata": {"finishedOn": self.finished}},
        }


@dataclass(frozen=True)
class Statement:
    subject: Resource
    predicate: Provenance

    def doc(self) -> dict[str, Any]:
        return {"_type": STATEMENT_TYPE, "subject": [self.subject.doc()], "predicateType": PREDICATE_TYPE,
                "predicate": self.predicate.doc()}

    def render(self) -> bytes:
        return (json.dumps(self.doc(), indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def _sha(digest: str) -> dict[str, str]:
    algorithm, _, value = digest.partition(":")
    return {algorithm: value}


def provenance_of(record: BuildRecord, source: str, init_sha256: str, epoch: int | None) -> Provenance:
    """The predicate for *record* (the sidecar being published), built from *source* as given on the command
    line with imgconv's init of *init_sha256* and SOURCE_DATE_EPOCH *epoch* (None: unset)."""
    identity = record.identity
    image = [Resource("image-config", _sha(identity.image_id), source,
                      {"mediaType": "application/vnd.oci.image.config.v1+json"})]
    if identity.manifest_digest:
        image.append(Resource("image-manifest", _sha(identity.manifest_digest), source))
    kernel = [Resource("kernel", _sha(record.boot.kernel_sha256) if record.boot.kernel_sha256 else {},
                       annotations={"release": record.kernel.release, "origin": record.kernel.origin,
                                    "path": record.boot.kernel})]
    if record.kernel.package_sha256:  # --kernel PACKAGE.deb: the file booted came out of this package
        kernel.append(Resource("kernel-package", _sha(record.kernel.package_sha256),
                               annotations={"release": record.kernel.release,
                                            "file": str(record.options.get("kernel") or "")}))
    external: dict[str, Any] = {"source": source, "options": record.options, "source_date_epoch": epoch}
    base = []
    if record.built_on:  # an incremental rebuild: the store version whose disk it started from
        external["built_on"] = record.built_on
        base.append(Resource("base-version", _sha(record.built_on)))
    return Provenance(
        external=external,
        dependencies=(*image, *kernel, *base, Resource("imgconv-init", _sha(init_sha256)),
                      Resource("imgconv", {}, f"pkg:pypi/imgconv@{record.imgconv}",
                               {"version": record.imgconv})),
        builder_version={"imgconv": record.imgconv}, finished=record.created)


def _digest_text(value: Any) -> str:
    """*value* if it is a "sha256:HEX" digest (a base's sidecar is read from a file anyone may have edited)."""
    return value if isinstance(value, str) and re.fullmatch(r"sha256:[0-9a-f]{64}", value) else ""


def commit_provenance(base_sha256: str, base_sidecar: dict[str, Any], base_where: str, state: Path,
                      state_sha256: str, dest: str, imgconv: str, finished: str) -> Provenance:
    """The predicate of ``imgconv commit``: *state* (its bytes' *state_sha256*) flattened over the base version
    *base_sha256* (found at *base_where*; *base_sidecar* is its sidecar) into *dest*. The base's own source image
    is named by the digests its sidecar records (a commit of a commit keeps the first conversion's)."""
    identity = base_sidecar.get("identity")
    identity = identity if isinstance(identity, dict) else {}
    source = str(base_sidecar.get("source") or identity.get("source") or "")
    base = Resource("base", _sha(base_sha256), base_where, {"source": source} if source else {})
    image = []
    config = _digest_text(identity.get("image_id")) or _digest_text(base_sidecar.get("config_digest"))
    if config:
        image.append(Resource("image-config", _sha(config), source,
                              {"mediaType": "application/vnd.oci.image.config.v1+json"}))
    if manifest := _digest_text(identity.get("manifest_digest")):
        image.append(Resource("image-manifest", _sha(manifest), source))
    return Provenance(
        external={"state": str(state), "base": base_sha256, "dest": dest},
        dependencies=(base, *image, Resource("state", _sha(state_sha256), str(state)),
                      Resource("imgconv", {}, f"pkg:pypi/imgconv@{imgconv}", {"version": imgconv})),
        builder_version={"imgconv": imgconv}, finished=finished, build_type=COMMIT_BUILD_TYPE)


def statement_for(disk_name: str, predicate: Provenance) -> Callable[[str], bytes]:
    """What :func:`converter.artifact.publish` calls with the disk's sha256 once it is known."""
    return lambda sha256: Statement(Resource(disk_name, _sha(sha256)), predicate).render()


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from *path*; a missing or malformed file is a :class:`ProvenanceError` naming *what*."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ProvenanceError(f"{path} is missing: no {what}") from exc
    except (OSError, ValueError) as exc:
        raise ProvenanceError(f"{path} is not a readable {what}: {exc}") from exc
    if not isinstance(doc, dict):
        raise ProvenanceError(f"{path} is not a {what} (not a JSON object)")
    return doc


@dataclass(frozen=True)
class Verdict:
    """What `imgconv verify` found: nothing wrong (problems empty) or each difference in one line."""

    disk: str
    sha256: str
    problems: tuple[str, ...]
    source: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems


def _subject_problems(disk: Path, sha256: str, statement: dict[str, Any]) -> list[str]:
    problems = []
    if statement.get("_type") != STATEMENT_TYPE or statement.get("predicateType") != PREDICATE_TYPE:
        problems.append(f"{statement_path(disk).name} is not an in-toto statement of SLSA provenance v1")
    subjects = statement.get("subject")
    subject = subjects[0] if isinstance(subjects, list) and subjects and isinstance(subjects[0], dict) else {}
    digest = subject.get("digest")
    claimed = f"sha256:{digest.get('sha256', '') if isinstance(digest, dict) else ''}"
    if subject.get("name") != disk.name:
        problems.append(f"the statement's subject is another disk ({subject.get('name')!r}, not {disk.name!r})")
    if claimed != sha256:
        problems.append(f"sha256 differs: the disk is {sha256}, its statement says {claimed}")
    return problems


def verify_disk(disk: Path) -> Verdict:
    """Check *disk* against its sidecar and its statement: both present, and the same sha256 and name in each."""
    if not disk.is_file():
        raise UsageError(f"{disk} does not exist or is not a file")
    sha256, problems, source = sha256_file(disk), [], ""
    try:
        sidecar = read_json(sidecar_path(disk), "sidecar")
        source = str(sidecar.get("source", ""))
        if sidecar.get("sha256") != sha256:
            problems.append(f"sha256 differs: the disk is {sha256}, its sidecar says {sidecar.get('sha256')}")
    except ProvenanceError as exc:
        problems.append(str(exc))
    try:
        problems += _subject_problems(disk, sha256, read_json(statement_path(disk), "provenance statement"))
    except ProvenanceError as exc:
        problems.append(str(exc))
    return Verdict(str(disk), sha256, tuple(problems), source)


@dataclass(frozen=True)
class Rebuild:
    """`verify --rebuild`: the recorded disk's sha256 and the sha256 of the disk built again from its source."""

    disk: str
    source: str
    recorded: str
    rebuilt: str

    @property
    def identical(self) -> bool:
        return self.recorded == self.rebuilt


def rebuild_disk(disk: Path, tls_verify: bool, monitor: Monitor, work_dir: Path | None = None) -> Rebuild:
    """Build *disk* again from the source its sidecar records, with the options and SOURCE_DATE_EPOCH its
    statement records, into a temporary directory in *work_dir* (default: beside it; removed after), and compare
    the bytes' sha256. A version made by ``imgconv commit`` has no source to be built from, and one rebuilt
    incrementally is not a full build's bytes: both refused."""
    statement = read_json(statement_path(disk), "provenance statement")
    sidecar = read_json(sidecar_path(disk), "sidecar")
    definition = statement.get("predicate", {}).get("buildDefinition", {})
    if definition.get("buildType") == COMMIT_BUILD_TYPE:
        raise ProvenanceError(f"{disk.name} was made by imgconv commit (a state file over the version "
                              f"{sidecar.get('base', '?')}), not converted from a source: it cannot be rebuilt; "
                              "verify --rebuild its base instead")
    external = definition.get("externalParameters", {})
    built_on = sidecar.get("built_on") or (external.get("built_on") if isinstance(external, dict) else None)
    if built_on:
        raise ProvenanceError(f"{disk.name} was rebuilt incrementally on the version {built_on}: it has a full "
                              "build's files but not its bytes (the bootloader keeps the base's filesystem UUID, "
                              "inodes lie elsewhere); verify --rebuild its base, or convert with --no-incremental "
                              "for versions that rebuild bit for bit")
    source = str(sidecar.get("source") or external.get("source") or "")
    if not source:
        raise ProvenanceError(f"{sidecar_path(disk)} records no source to rebuild {disk.name} from")
    options = dict(external.get("options") or sidecar.get("options") or {})
    options["tls_verify"] = tls_verify
    epoch = external.get("source_date_epoch")
    previous = os.environ.get("SOURCE_DATE_EPOCH")
    with tempfile.TemporaryDirectory(prefix=".imgconv-rebuild-", dir=work_dir or disk.parent) as work:
        try:
            if epoch is None:
                os.environ.pop("SOURCE_DATE_EPOCH", None)
            else:
                os.environ["SOURCE_DATE_EPOCH"] = str(epoch)
            rebuilt = convert_recorded(source, Path(work) / disk.name, options, monitor)
        finally:
            if previous is None:
                os.environ.pop("SOURCE_DATE_EPOCH", None)
            else:
                os.environ["SOURCE_DATE_EPOCH"] = previous
    return Rebuild(str(disk), source, sha256_file(disk), rebuilt)


def convert_recorded(source: str, output: Path, options: dict[str, Any], monitor: Monitor) -> str:
    """oci-to-qcow2 of *source* into *output* with *options* as a sidecar records them (``BuildOptions.recorded``
    plus ``tls_verify``); the new disk's sha256."""
    from converter.disk.build import BuildOptions, DiskFormat, convert
    from converter.disk.plan import InitMode
    from converter.disk.uefi import Firmware
    from converter.oci.model import Platform

    def path(key: str) -> Path | None:
        return Path(options[key]) if options.get(key) else None

    try:
        built = BuildOptions(
            output=output, format=DiskFormat(options.get("format", "qcow2")), compress=bool(options.get("compress")),
            size=options.get("size"), kernel=path("kernel"), initrd=path("initrd"),
            hostname=str(options.get("hostname", "imgconv")),
            platform=Platform.parse(options["platform"]) if options.get("platform") else None,
            tls_verify=bool(options.get("tls_verify", True)),
            kernel_modules=_optional_bool(options.get("kernel_modules")),
            firmware=Firmware(options.get("firmware", "bios")), init=InitMode(options.get("init", "auto")))
    except (ValueError, TypeError) as exc:
        raise ProvenanceError(f"the recorded options cannot be used again: {exc}") from exc
    recorded = {key: value for key, value in options.items() if key != "tls_verify"}
    if built.recorded() != recorded:  # an option this imgconv does not know, or one it would record differently
        differ = sorted(set(built.recorded().items()) ^ set(recorded.items()), key=str)
        raise ProvenanceError(f"the recorded options cannot be given again to this imgconv: {differ[:4]}")
    return convert(source, built, monitor).sha256


def _optional_bool(value: Any) -> bool | None:
    """A recorded yes/no that may be unset (None: imgconv decides, as it did when the disk was made)."""
    return None if value is None else bool(value)
