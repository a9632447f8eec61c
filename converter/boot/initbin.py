"""The guest init binary: ``init/init.c`` compiled once, statically, and cached by content hash."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from converter.artifact import atomic_write
from converter.boot.cachedir import cache_dir
from converter.errors import MissingToolError
from converter.run import run

# musl gives a ~80 KB binary; glibc's static one is ~10x larger but works the same.
COMPILERS = ("musl-gcc", "gcc")
CFLAGS = ("-static", "-Os", "-s", "-std=gnu11", "-Wall", "-Wextra", "-Werror")

_PURPOSE = "build the guest init (a static C program)"


def init_sources() -> dict[str, bytes]:
    """The C sources shipped with the package, by file name: ``init.c`` and the ``*.h`` parts it includes (one
    feature a file, so that work on one does not touch the others)."""
    folder = resources.files("converter.boot").joinpath("init")
    return {entry.name: entry.read_bytes() for entry in sorted(folder.iterdir(), key=lambda e: e.name)
            if entry.name.endswith((".c", ".h"))}


def init_source() -> bytes:
    """All of the init's C source, for tests that look for a definition wherever it lives."""
    return b"\n".join(init_sources().values())


def find_compiler() -> str:
    """musl-gcc if installed, else gcc; raise MissingToolError naming both packages."""
    for name in COMPILERS:
        if shutil.which(name):
            return name
    raise MissingToolError(
        f"musl-gcc (Debian package musl-tools) or gcc (Debian packages gcc, libc6-dev) is required to {_PURPOSE}"
    )


def init_binary() -> Path:
    """Path of the compiled init, building it on first use.

    The file is named by the sha256 of the source, the compiler's identity and the flags, so an
    edit to ``init.c`` or a compiler upgrade builds a new one; it is written under a temporary
    name and renamed into place, so concurrent callers never see half a binary.
    """
    sources = init_sources()
    compiler = find_compiler()
    version = run([compiler, "--version"], purpose=_PURPOSE).stdout.splitlines()[:1]
    key = hashlib.sha256()
    named = (name.encode() + b"\0" + data for name, data in sources.items())
    for part in (*named, compiler.encode(), *version, *(flag.encode() for flag in CFLAGS)):
        key.update(part)
        key.update(b"\0")
    target = cache_dir() / f"init-{key.hexdigest()[:32]}"
    if target.is_file():
        return target

    with tempfile.TemporaryDirectory(prefix="imgconv-init-") as tmp:
        for name, data in sources.items():
            (Path(tmp) / name).write_bytes(data)
        src = Path(tmp) / "init.c"
        out = Path(tmp) / "init"
        run([compiler, *CFLAGS, "-o", out, src], purpose=_PURPOSE)
        atomic_write(target, out.read_bytes(), mode=0o755)
    return target
