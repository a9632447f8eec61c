"""``imgconv commit STATE DEST``: a ``boot --state`` file and its read-only base become one new read-only version.

Run-time changes become a version only when someone commits them (issue 12): the state file stays a
throwaway-able overlay, and what is committed is a standalone disk (no backing chain) with its own sidecar
naming the base version (``base``: its sha256) and its own provenance statement (converter/provenance.py's
commit_provenance: the base, the base's source image and the state file), at ``store:NAME:TAG`` or in a file.

    check-inputs   DEST free (a file) or a store target; the base found (``--base``, else the store version
                   with the sha256 STATE's record names, else the record's path) and checked as any disk;
                   STATE checked as ``boot`` checks it (its record must name the base's bytes)
    flatten        ``qemu-img convert`` of STATE over the base into one qcow2, the chain given explicitly
    publish        0444, sha256, sidecar, statement; a store version (the tag moves) or DEST, DEST.json and
                   DEST.intoto.json

The chain is never read from a header: STATE is opened with its backing given as ``json:`` blockdev options (the
base, through a descriptor of the very file that was checked, with ``"backing": null``), as
:mod:`converter.disk.safety` attaches any disk, so a STATE rewritten to name a host file reads nothing of it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converter import __version__
from converter.artifact import check_output, now_utc, publish, sha256_file, sidecar_path, temp_beside
from converter.boot.state import open_state, record_path
from converter.disk.safety import CHECK_TIMEOUT, SafeDisk, blockdev_node, open_disk, pinned
from converter.errors import UsageError
from converter.pipeline import Context, Pipeline, Slot, Step
from converter.progress import Monitor
from converter.provenance import commit_provenance, statement_for
from converter.run import run
from converter.store.reference import is_store_ref
from converter.store.store import Store, Target, disk_input, output_target, store_root

SIDECAR_DROPPED = ("sha256", "size", "output", "created", "base", "committed")


@dataclass(frozen=True)
class CommitRequest:
    state: Path
    dest: str  # store:NAME:TAG or a file
    base: str | None = None  # --base DISK: a file or store:...; else found from STATE's record
    force: bool = False  # replace a DEST file


@dataclass(frozen=True)
class CommitRecord:
    """``commit``'s result: the new version and what it was made of."""

    dest: str
    sha256: str
    size: int
    base: str  # the base version's sha256
    state: str


@dataclass(frozen=True)
class Inputs:
    base: SafeDisk
    base_sha256: str  # "sha256:HEX", as the state's record has it (open_state checked the base against it)
    base_sidecar: dict[str, Any]
    base_where: str  # where the base was found, as the statement's uri ("": the store's version by its sha256)
    state: SafeDisk
    target: Target | None
    output: Path  # DEST's file, or where a store version is written


REQUEST: Slot[CommitRequest] = Slot("request")


def _state_sha256(state: Path) -> str:
    try:
        record = json.loads(record_path(state).read_text())
        digest = record["sha256"]
    except FileNotFoundError as exc:
        raise UsageError(f"{state} is not a state file of imgconv boot (no {record_path(state).name})") from exc
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise UsageError(f"{state}: its record {record_path(state).name} is unreadable: {exc}") from exc
    if not isinstance(digest, str) or len(digest) != 64:
        raise UsageError(f"{state}: its record {record_path(state).name} names no disk sha256")
    return digest


def _find_base(ctx: Context, state: Path, digest: str) -> tuple[Path, dict[str, Any], str]:
    """The base disk, its sidecar and where it was found: --base, else the store's version with that sha256, else
    the record's path (where the disk was when boot made the state; its sha256 is checked again by open_state)."""
    request = ctx[REQUEST]
    if request.base is not None:
        path = ctx.enter(disk_input(request.base))
        where = request.base if is_store_ref(request.base) else str(path.absolute())
    else:
        store = Store(store_root())
        if store.object_path(digest).is_file():
            found = ctx.enter(store.use_digest("sha256:" + digest)).path
            return found, _sidecar_of(store.object_path(digest)), ""
        recorded = json.loads(record_path(state).read_text()).get("path")
        if not isinstance(recorded, str) or not Path(recorded).is_file():
            raise UsageError(f"the base disk of {state} (sha256:{digest}) is not in the store {store.root}; "
                             "give it with --base DISK")
        path = Path(recorded)
        where = str(path.absolute())
    return path, _sidecar_of(path), where


def _sidecar_of(disk: Path) -> dict[str, Any]:
    try:
        doc = json.loads(sidecar_path(disk).read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def check_inputs(ctx: Context) -> Inputs:
    request = ctx[REQUEST]
    state = request.state
    if not state.is_file():
        raise UsageError(f"the state file {state} does not exist" if not state.exists()
                         else f"the state file {state} is not a file")
    target = output_target(request.dest)
    output = target.work_path if target is not None else Path(request.dest)
    if target is None:
        check_output(output, request.force)
    digest = _state_sha256(state)
    base_path, sidecar, where = _find_base(ctx, state, digest)
    base = open_disk(base_path)
    checked = open_state(state, base)  # refuses a state made over other bytes than the base's
    return Inputs(base, "sha256:" + digest, sidecar, where, checked, target, output)


def flatten(ctx: Context) -> Path:
    inputs = ctx[check_inputs]
    out = ctx.enter(temp_beside(inputs.output, ".qcow2"))
    base_name, state_name = ctx.enter(pinned(inputs.base)), ctx.enter(pinned(inputs.state))
    spec = {"driver": "qcow2", "file": {"driver": "file", "filename": str(state_name)},
            "backing": blockdev_node(inputs.base, base_name, "base")}
    run(["qemu-img", "convert", "-O", "qcow2", "json:" + json.dumps(spec), str(out)],
        purpose=f"flatten {ctx[REQUEST].state} over its base into one disk", timeout=CHECK_TIMEOUT)
    return out


def publish_commit(ctx: Context) -> CommitRecord:
    inputs, request = ctx[check_inputs], ctx[REQUEST]
    created, state = now_utc(), request.state.absolute()
    sidecar = {key: value for key, value in inputs.base_sidecar.items() if key not in SIDECAR_DROPPED}
    sidecar.update({"imgconv": __version__, "format": "qcow2", "virtual_size": inputs.state.virtual_size,
                    "created": created, "base": inputs.base_sha256, "committed": {"state": str(state)}})
    with pinned(inputs.state) as state_name:  # the bytes of the very state file that was checked and flattened
        state_sha256 = sha256_file(state_name)
    dest = str(inputs.target.ref) if inputs.target is not None else str(inputs.output)
    predicate = commit_provenance(inputs.base_sha256, inputs.base_sidecar, inputs.base_where, state, state_sha256,
                                  dest, __version__, created)
    if inputs.target is not None:
        # The subject is the version's object file (objects/sha256/HEX), as for a conversion into the store.
        record = inputs.target.publish(ctx[flatten], sidecar, how="commit", statement=lambda sha256: statement_for(
            sha256.removeprefix("sha256:"), predicate)(sha256))
    else:
        record = publish(ctx[flatten], inputs.output, sidecar, statement_for(inputs.output.name, predicate))
    return CommitRecord(dest, record["sha256"], record["size"], inputs.base_sha256, str(request.state))


PIPELINE: Pipeline[CommitRecord] = Pipeline("commit", (
    Step("check-inputs", "checking the state file and its base", check_inputs, needs=(REQUEST,)),
    Step("flatten", "flattening the state over its base", flatten, needs=(REQUEST, check_inputs)),
    Step("publish", "publishing", publish_commit, needs=(REQUEST, check_inputs, flatten)),
), result=publish_commit, given=(REQUEST,))


def commit(request: CommitRequest, monitor: Monitor) -> CommitRecord:
    return PIPELINE.run(monitor, request=request)
