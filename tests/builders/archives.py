"""Docker archives (`docker save` tars) written to a file, good or deliberately broken: any members, symlinks
among them (Docker dedups identical layers that way), any manifest.json, valid JSON or not."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def tar_file(path: Path, files: Mapping[str, bytes], *, symlinks: Mapping[str, str] | None = None,
             dirs: Sequence[str] = ()) -> Path:
    """A tar at *path*: the *files* (name -> content) in order, then the *symlinks* (name -> target), then the
    *dirs*; every header otherwise tarfile's defaults."""
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
        for name in dirs:
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
    return path


def docker_archive(path: Path, manifest: Any, files: Mapping[str, bytes] | None = None, *,
                   symlinks: Mapping[str, str] | None = None, dirs: Sequence[str] = ()) -> Path:
    """A docker archive whose manifest.json is *manifest* as JSON (anything: tests feed it malformed ones) and
    whose other members are *files*, *symlinks* and *dirs* as in `tar_file`."""
    return tar_file(path, {"manifest.json": json.dumps(manifest).encode(), **(files or {})}, symlinks=symlinks,
                    dirs=dirs)
