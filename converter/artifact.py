"""The read-only, versioned artifact: atomic placement, mode 0444, sha256 and a sidecar.

Work happens under a hidden temporary name beside OUTPUT (same filesystem, so the final
rename is atomic); OUTPUT appears only when complete. A run that is killed leaves at most a
`.NAME.imgconv-HOST-PID-*` file beside it, never a partial OUTPUT, and the next run to the same
OUTPUT removes it once that process is gone.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from converter.epoch import source_date_epoch, timestamp
from converter.errors import UsageError

READ_ONLY = 0o444


def sidecar_path(output: Path) -> Path:
    return output.with_name(output.name + ".json")


def statement_path(output: Path) -> Path:
    """The in-toto provenance statement beside OUTPUT (converter/provenance.py)."""
    return output.with_name(output.name + ".intoto.json")


def check_output(output: Path, force: bool) -> None:
    """Refuse to overwrite, and fail before any work if OUTPUT cannot be written."""
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"the directory of {output} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write to {parent}")
    if output.is_dir():
        raise UsageError(f"{output} is a directory; give a file name for the disk")
    if (output.exists() or output.is_symlink()) and not force:
        raise UsageError(f"{output} already exists; pass --force to replace it")
    side = sidecar_path(output)
    if (side.exists() or side.is_symlink()) and not force:
        # The sidecar is part of the output: OUTPUT=package must not replace someone's package.json.
        raise UsageError(f"{side} already exists (the sidecar imgconv writes beside {output.name}); "
                         "pass --force to replace it")
    if side.is_dir():
        raise UsageError(f"{side} is a directory; imgconv writes its sidecar there")
    statement = statement_path(output)
    if (statement.exists() or statement.is_symlink()) and not force:
        raise UsageError(f"{statement} already exists (the provenance statement imgconv writes beside "
                         f"{output.name}); pass --force to replace it")


def _temp_prefix(output: Path, pid: int | None = None) -> str:
    """`.NAME.imgconv-HOST-PID-`: who made a temporary file, so a later run can tell whether it is abandoned."""
    host = socket.gethostname().replace("-", "_").replace("/", "_") or "host"
    return f".{output.name}.imgconv-{host}-{os.getpid() if pid is None else pid}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep_abandoned(output: Path) -> list[Path]:
    """Remove temporary files beside *output* left by runs of this host that were killed (SIGKILL, power loss)
    before they could clean up. Files of live processes, of other hosts and of unknown form are left alone."""
    ours = _temp_prefix(output, 0).removesuffix("0-")
    removed = []
    for path in (output.parent or Path(".")).glob(f".{glob.escape(output.name)}.imgconv-*"):
        pid_text = path.name[len(ours):].split("-", 1)[0] if path.name.startswith(ours) else ""
        if pid_text.isdigit() and not _alive(int(pid_text)):
            with contextlib.suppress(OSError):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
                removed.append(path)
    return removed


def _new_temp(output: Path, suffix: str = "") -> Path:
    """A new empty file beside *output* (same filesystem, so renaming it over *output* is atomic)."""
    fd, name = tempfile.mkstemp(prefix=_temp_prefix(output), suffix=suffix, dir=output.parent or ".")
    os.close(fd)
    return Path(name)


@contextmanager
def temp_beside(output: Path, suffix: str = "") -> Iterator[Path]:
    """A temporary file name beside *output*, removed unless it has been renamed away."""
    sweep_abandoned(output)
    path = _new_temp(output, suffix)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


@contextmanager
def temp_dir_beside(output: Path, suffix: str = "") -> Iterator[Path]:
    """A private temporary directory beside *output* (on the output's filesystem, not in $TMPDIR, which may be
    memory), removed however the block ends."""
    sweep_abandoned(output)
    path = Path(tempfile.mkdtemp(prefix=_temp_prefix(output), suffix=suffix, dir=output.parent or "."))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _write_durably(path: Path, data: bytes, mode: int) -> None:
    """*data* into *path* with *mode*, on the disk (fsync) before anyone renames it into place."""
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fchmod(f.fileno(), mode)
        os.fsync(f.fileno())


def sync_dir(directory: Path) -> None:
    """Make the renames in *directory* durable. Filesystems that cannot sync a directory are let be."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write *data* to *path* so that readers, and a crash, see the old file or the whole new one.

    The temporary file is named like :func:`temp_beside`'s, so a killed run's leftover is recognised
    and swept by the next run to the same name.
    """
    temp = _new_temp(path)
    try:
        _write_durably(temp, data, mode)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    sync_dir(path.parent)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def now_utc() -> str:
    """SOURCE_DATE_EPOCH if set (a malformed one is a UsageError), else the current time."""
    return timestamp(source_date_epoch())


def publish(finished: Path, output: Path, sidecar: dict[str, Any],
            statement: Callable[[str], bytes] | None = None) -> dict[str, Any]:
    """Make *finished* read-only, hash it, and move it and its sidecar into place.

    The sidecar is written (and synced) first under a temporary name, so a failure to write it
    publishes nothing; the two renames then follow each other immediately, artifact first, so
    OUTPUT never exists without being complete. (This is :func:`atomic_write` for two files.) *statement*, given
    the disk's sha256, renders the provenance statement, written and renamed the same way, last.
    """
    os.chmod(finished, READ_ONLY)
    record = dict(sidecar)
    record["sha256"] = sha256_file(finished)
    record["size"] = finished.stat().st_size
    side = sidecar_path(output)
    with temp_beside(side) as side_temp, temp_beside(statement_path(output)) as statement_temp:
        _write_durably(side_temp, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode(), READ_ONLY)
        if statement is not None:
            _write_durably(statement_temp, statement(record["sha256"]), READ_ONLY)
        os.replace(finished, output)
        os.replace(side_temp, side)
        if statement is not None:
            os.replace(statement_temp, statement_path(output))
    sync_dir(side.parent)
    return record
