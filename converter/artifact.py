"""The read-only, versioned artifact: atomic placement, mode 0444, sha256 and a sidecar.

Work happens under a hidden temporary name beside OUTPUT (same filesystem, so the final
rename is atomic); OUTPUT appears only when complete. A run that is killed leaves at most a
`.NAME.imgconv-*` file beside it, never a partial OUTPUT.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from converter.errors import UsageError

READ_ONLY = 0o444


def sidecar_path(output: Path) -> Path:
    return output.with_name(output.name + ".json")


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


@contextmanager
def temp_beside(output: Path, suffix: str = "") -> Iterator[Path]:
    """A temporary file name beside *output*, removed unless it has been renamed away."""
    fd, name = tempfile.mkstemp(prefix=f".{output.name}.imgconv-", suffix=suffix, dir=output.parent or ".")
    os.close(fd)
    path = Path(name)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def now_utc() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    moment = datetime.fromtimestamp(int(epoch), UTC) if epoch and epoch.isdigit() else datetime.now(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def publish(finished: Path, output: Path, sidecar: dict[str, Any]) -> dict[str, Any]:
    """Make *finished* read-only, hash it, and move it and its sidecar into place.

    The sidecar is written first under a temporary name; the two renames then follow each
    other immediately, artifact first, so OUTPUT never exists without being complete.
    """
    os.chmod(finished, READ_ONLY)
    record = dict(sidecar)
    record["sha256"] = sha256_file(finished)
    record["size"] = finished.stat().st_size
    side = sidecar_path(output)
    with temp_beside(side) as side_temp:
        side_temp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        os.chmod(side_temp, READ_ONLY)
        os.replace(finished, output)
        os.replace(side_temp, side)
    return record
