"""``imgconv boot --state FILE``: the workload's writes kept in FILE, a qcow2 overlay of the read-only disk.

FILE is a qcow2 made by imgconv *without* a backing file in its header: the chain is built by ``boot`` with
``-blockdev`` nodes (the checked disk, ``backing: null``, under FILE, whose backing is given explicitly), so
nothing FILE's header says is ever followed, and FILE goes through :func:`~converter.disk.safety.open_disk`
like any disk imgconv did not make. Which disk FILE belongs to is recorded beside it, in ``FILE.base.json``
(written before FILE appears, so a FILE without its record was not made by imgconv and is refused):

- the disk's sha256, its format and virtual size: the identity. Writes in FILE only make sense over the very
  bytes they were made on; the same disk copied elsewhere is the same disk;
- a stamp of the file it was hashed from (device, inode, size, mtime and ctime in ns). Hashing a disk of
  several GiB on every boot would cost seconds, so a disk whose stamp is unchanged is taken as the same bytes
  (ctime cannot be set back by a user: any write to it changes it); any other disk is hashed, and refused
  (one line, exit 2) unless its sha256 is the recorded one (the stamp is then updated).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from converter.disk.safety import CREATE_TIMEOUT, SafeDisk, open_disk, opened
from converter.errors import UsageError
from converter.run import run

RECORD_VERSION = 1

log = logging.getLogger("imgconv.boot.state")


def record_path(state: Path) -> Path:
    return state.with_name(state.name + ".base.json")


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _hash_disk(disk: SafeDisk) -> tuple[str, list[int]]:
    """The sha256 of the very file that was checked, and its stamp."""
    with opened(disk.path) as (fd, st):
        if (st.st_dev, st.st_ino) != disk.identity:
            raise UsageError(f"{disk.path} was replaced while imgconv was reading it; refused")
        digest = hashlib.sha256()
        offset = 0
        while chunk := os.pread(fd, 1 << 20, offset):
            digest.update(chunk)
            offset += len(chunk)
        return digest.hexdigest(), _stamp(st)


def _current_stamp(disk: SafeDisk) -> list[int]:
    with opened(disk.path) as (_fd, st):
        return _stamp(st)


def _write_json(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


def _create(state: Path, disk: SafeDisk) -> None:
    sha256, stamp = _hash_disk(disk)
    tmp = state.with_name(f".{state.name}.{os.getpid()}.tmp")
    size = -(-disk.virtual_size // 512) * 512  # qcow2 sizes are whole sectors
    try:
        # "path": where the disk was, so that `imgconv commit` finds a base that is a plain file (its sha256 is
        # checked again there: a moved or replaced file is refused, never trusted by name).
        _write_json(record_path(state), {"imgconv-state": RECORD_VERSION, "sha256": sha256, "format": disk.format,
                                         "virtual-size": disk.virtual_size, "stamp": stamp,
                                         "path": str(Path(disk.path).resolve())})
        run(["qemu-img", "create", "-q", "-f", "qcow2", tmp, str(size)],
            purpose=f"create the state file {state}", timeout=CREATE_TIMEOUT)
        os.link(tmp, state)  # never replaces a FILE that appeared meanwhile
    except FileExistsError as exc:
        raise UsageError(f"--state {state} appeared while imgconv was creating it; refused") from exc
    except OSError as exc:
        raise UsageError(f"cannot create the state file {state}: {exc.strerror}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def _read_record(state: Path) -> dict[str, Any]:
    side = record_path(state)
    try:
        record = json.loads(side.read_text())
    except FileNotFoundError as exc:
        raise UsageError(f"--state {state} was not made by imgconv boot (its record {side.name} is missing); "
                         "refused") from exc
    except (OSError, ValueError) as exc:
        raise UsageError(f"--state {state}: its record {side.name} is unreadable: {exc}") from exc
    if not isinstance(record, dict) or record.get("imgconv-state") != RECORD_VERSION:
        raise UsageError(f"--state {state}: {side.name} is not an imgconv state record")
    return record


def _belongs(state: Path, disk: SafeDisk, record: dict[str, Any]) -> None:
    """Refuse *state* unless it was made over *disk*'s bytes (module docstring)."""
    other = f"--state {state} belongs to another disk than {disk.path}; refused (use another state file)"
    if record.get("format") != disk.format or record.get("virtual-size") != disk.virtual_size:
        raise UsageError(other)
    if record.get("stamp") == _current_stamp(disk):
        return
    sha256, stamp = _hash_disk(disk)
    if sha256 != record.get("sha256"):
        raise UsageError(other)
    try:
        _write_json(record_path(state), {**record, "stamp": stamp})
    except OSError as exc:  # only a saving: the next boot hashes again
        log.debug("cannot update %s: %s", record_path(state), exc)


def open_state(state: Path, disk: SafeDisk) -> SafeDisk:
    """FILE checked (or created on first use) as the writable top of *disk*: a qcow2 without a backing file of
    its own, as big as the disk, recorded as belonging to it. Raise UsageError (exit 2) otherwise."""
    state = Path(os.path.abspath(state))
    if not state.exists() and not state.is_symlink():
        _create(state, disk)
    else:
        _belongs(state, disk, _read_record(state))
    checked = open_disk(state)
    if checked.identity == disk.identity:
        raise UsageError(f"--state {state} is the disk itself; refused")
    if checked.format != "qcow2" or checked.virtual_size < disk.virtual_size:
        raise UsageError(f"--state {state} is not a qcow2 overlay as big as {disk.path}; refused")
    return checked
