"""``imgconv boot``'s ``docker run`` overrides: command, ``--entrypoint``, ``-e``/``--env-file``, ``-w``, ``-u``,
``--hostname``, ``-i``, ``-t``, handed to the guest at boot as the QEMU firmware config file ``opt/imgconv/run.spec``.

Why the guest init merges, not the host: Docker's rules need the image's Entrypoint, Cmd and Env separately
(arguments replace Cmd but keep Entrypoint; ``-e`` replaces the image's entries of the same key; ``--hostname``
changes ``HOSTNAME``), and the host cannot read them from the disk without starting an appliance (seconds per
boot). So the disk's ``/.imgconv/init.spec`` carries them (keys ``image``, ``image-entrypoint``, ``image-cmd``,
``image-env``, written at conversion beside the final ``arg``/``env``, which older inits keep using), and the
init applies the overrides given here; the same read-only disk serves every invocation. A disk converted
before those keys existed still boots: with ``--entrypoint`` everything is known; arguments without it are
refused by the init (it does not know the Entrypoint), and ``-e``/``--hostname`` merge over the final
environment (an image-set ``HOSTNAME`` is then lost).

Format: the init spec's (``key\\0value\\0`` pairs, first ``version``/``1``); a key present is an override:
``entrypoint`` (once; empty clears it), ``cmd`` (repeated: the arguments after DISK), ``env`` (repeated, in
Docker's order: ``--env-file`` lines, then ``-e``; ``KEY`` alone unsets, as Docker passes it when the host has
no such variable), ``cwd``, ``user``, ``hostname``, ``interactive`` (``1``: stdin comes from the host), ``tty``
(``ROWS COLS``: the workload gets a terminal of that size). Values are data: nothing parses them with a shell.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from converter.errors import UsageError
from converter.oci.localfile import read_user_file

RUN_SPEC_FW_CFG = "opt/imgconv/run.spec"
MAX_VALUE = 128 * 1024 - 1  # Linux's MAX_ARG_STRLEN, less the NUL: no process could receive a longer string
MAX_TOTAL = 1 << 20  # the whole spec; far more than any command line (ARG_MAX is 2 MiB with the environment)
MAX_ENV_FILE = 1 << 20


@dataclass(frozen=True)
class RunOverrides:
    """What ``docker run``'s flags replace; ``None`` (or empty *cmd*/*env*) means the image's."""

    cmd: tuple[str, ...] = ()
    entrypoint: str | None = None
    env: tuple[str, ...] = ()
    cwd: str | None = None
    user: str | None = None
    hostname: str | None = None
    interactive: bool = False  # -i: stdin from the host (converter.boot.streams)
    tty_size: tuple[int, int] | None = None  # -t: a terminal of (rows, columns); None: pipes

    @property
    def empty(self) -> bool:
        return self == RunOverrides()


def _check(value: str, what: str) -> bytes:
    data = value.encode("utf-8", "surrogateescape")
    if b"\0" in data:
        raise UsageError(f"{what} contains a NUL byte, which no process can receive: {value[:60]!r}")
    if len(data) > MAX_VALUE:
        raise UsageError(f"{what} is {len(data)} bytes; at most {MAX_VALUE} (what Linux passes to a process)")
    return data


def env_entry(entry: str, environ: Mapping[str, str]) -> str:
    """One ``-e`` value as the docker CLI passes it (opts.ValidateEnv): ``KEY=VALUE`` as is, ``KEY`` alone with
    the host's value, or alone (the daemon then unsets it) when the host has none."""
    key, sep, _ = entry.partition("=")
    if not key:
        raise UsageError(f"invalid environment variable: {entry!r}")
    if sep:
        return entry
    value = environ.get(key)
    return entry if value is None else f"{key}={value}"


def parse_env_file(data: bytes, name: str, environ: Mapping[str, str]) -> list[str]:
    """Docker's ``--env-file`` format (opts.ParseEnvFile): lines of ``KEY=VALUE`` (the value verbatim), ``KEY``
    alone for the host's value, blank lines and ``#`` comments skipped; a name with whitespace is an error."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"env file {name} is not valid UTF-8 (byte {exc.start})") from exc
    entries: list[str] = []
    for number, raw in enumerate(text.removeprefix("\ufeff").splitlines(), 1):
        line = raw.lstrip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if any(ch.isspace() for ch in key):
            raise UsageError(f"env file {name}, line {number}: variable {key!r} contains whitespaces")
        entries.append(env_entry(f"{key}={value}" if sep else key, environ))
    return entries


def read_env_file(path: Path, environ: Mapping[str, str]) -> list[str]:
    return parse_env_file(read_user_file(path, MAX_ENV_FILE, "env file"), str(path), environ)


def build_overrides(
    *,
    cmd: Sequence[str],
    entrypoint: str | None,
    env: Sequence[str],
    env_files: Sequence[Path],
    workdir: str | None,
    user: str | None,
    hostname: str | None,
    environ: Mapping[str, str] | None = None,
    interactive: bool = False,
    tty_size: tuple[int, int] | None = None,
) -> RunOverrides:
    """The overrides from the command line, checked (usage errors are one line). Env files come first, then
    ``-e``, as the docker CLI orders them."""
    environ = os.environ if environ is None else environ
    entries: list[str] = []
    for path in env_files:
        entries += read_env_file(path, environ)
    entries += [env_entry(e, environ) for e in env]
    if workdir is not None and not workdir.startswith("/"):
        raise UsageError(f"the working directory {workdir!r} is invalid, it needs to be an absolute path")
    if user is not None and not user:
        raise UsageError("--user must not be empty")
    overrides = RunOverrides(tuple(cmd), entrypoint, tuple(entries), workdir, user, hostname, interactive, tty_size)
    encode_overrides(overrides)  # refuses NUL bytes and absurd sizes now, as a usage error
    return overrides


def encode_overrides(o: RunOverrides) -> bytes:
    """The run spec's bytes (format in the module docstring)."""
    pairs: list[tuple[str, str | None, str]] = [("version", "1", "version")]
    pairs += [("entrypoint", o.entrypoint, "--entrypoint"), ("cwd", o.cwd, "--workdir"),
              ("user", o.user, "--user"), ("hostname", o.hostname, "--hostname")]
    if o.interactive:
        pairs.append(("interactive", "1", "-i"))
    if o.tty_size is not None:
        pairs.append(("tty", f"{o.tty_size[0]} {o.tty_size[1]}", "-t"))
    pairs += [("cmd", arg, "an argument after DISK") for arg in o.cmd]
    pairs += [("env", entry, "an environment variable") for entry in o.env]
    out = bytearray()
    for key, value, what in pairs:
        if value is not None:
            out += key.encode() + b"\0" + _check(value, what) + b"\0"
    if len(out) > MAX_TOTAL:
        raise UsageError(f"the command, environment and options take {len(out)} bytes; at most {MAX_TOTAL}")
    return bytes(out)


def check_hostname(name: str) -> str:
    """``--hostname``: dot-separated labels of letters, digits and '-', at most 64 bytes (Linux's limit)."""
    label = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    if len(name) > 64 or not re.fullmatch(rf"{label}(\.{label})*", name):
        raise UsageError(f"invalid hostname {name[:80]!r}: dot-separated letters, digits and '-', at most 64 bytes")
    return name
