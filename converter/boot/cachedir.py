"""Where imgconv keeps what it can rebuild (compiled init, accelerator probe); written with artifact.atomic_write."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/imgconv`` (default ``~/.cache/imgconv``), created on demand."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    path = Path(base) / "imgconv"
    path.mkdir(parents=True, exist_ok=True)
    return path

