"""KVM or TCG: which accelerator qemu (and the libguestfs appliance) can really use here.

``/dev/kvm`` existing is not enough: on some hosts (nested virtualisation, odd CPU models) qemu
aborts or hangs under KVM. A cheap probe answers for sure: start qemu paused with KVM and no
devices, and ask it over QMP on stdin to quit; a healthy KVM exits 0 within milliseconds. The
answer is cached per host kernel and qemu version. ``IMGCONV_ACCEL=kvm|tcg`` overrides it all.
"""

from __future__ import annotations

import json
import logging
import os
import platform
from pathlib import Path
from typing import Literal, Protocol

from converter.artifact import atomic_write
from converter.boot.cachedir import cache_dir
from converter.errors import ToolError, UsageError
from converter.run import run

log = logging.getLogger("imgconv.boot.accel")

Accel = Literal["kvm", "tcg"]

QEMU = "qemu-system-x86_64"
KVM_DEVICE = Path("/dev/kvm")
PROBE_TIMEOUT = 10.0
PROBE_ARGV = (
    QEMU, "-accel", "kvm", "-cpu", "host", "-S", "-nodefaults", "-display", "none",
    "-machine", "pc", "-m", "64", "-qmp", "stdio",
)  # fmt: skip
PROBE_INPUT = b'{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n'
_CACHE_NAME = "kvm-probe.json"


def _probe_key() -> str:
    version = run([QEMU, "--version"], purpose="find the qemu version").stdout.decode(errors="replace")
    first = version.splitlines()[0] if version else "unknown"
    return f"{platform.release()} | {first}"


def _probe() -> bool:
    try:
        proc = run(PROBE_ARGV, purpose="check that KVM works", input=PROBE_INPUT, timeout=PROBE_TIMEOUT, check=False)
    except ToolError as exc:  # hung: as bad as failing
        log.debug("kvm probe: %s", exc)
        return False
    log.debug("kvm probe: exit %d: %s", proc.returncode, proc.stderr.decode(errors="replace").strip())
    return proc.returncode == 0


def kvm_usable() -> bool:
    """True if qemu runs under KVM on this host (probed once per kernel and qemu version)."""
    if not KVM_DEVICE.exists() or not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        return False
    key = _probe_key()
    cache_file = cache_dir() / _CACHE_NAME
    try:
        cached = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cached = {}
    if not isinstance(cached, dict):
        cached = {}
    if isinstance(cached.get(key), bool):
        return bool(cached[key])
    usable = _probe()
    cached[key] = usable
    atomic_write(cache_file, json.dumps(cached, indent=1, sort_keys=True).encode())
    return usable


def choose_accel() -> Accel:
    """``IMGCONV_ACCEL`` if set (``kvm`` or ``tcg``), else KVM when it works, else TCG."""
    forced = os.environ.get("IMGCONV_ACCEL", "").strip().lower()
    if forced in ("kvm", "tcg"):
        return "kvm" if forced == "kvm" else "tcg"
    if forced:
        raise UsageError(f"IMGCONV_ACCEL must be kvm or tcg, not {forced!r}")
    return "kvm" if kvm_usable() else "tcg"


class GuestfsBackend(Protocol):
    """The part of a ``guestfs.GuestFS`` handle that chooses how the appliance runs."""

    def get_backend_settings(self) -> list[str]: ...

    def set_backend_settings(self, settings: list[str]) -> None: ...


def configure_guestfs(handle: GuestfsBackend, accel: Accel | None = None) -> None:
    """Make a libguestfs handle (not yet launched) use *accel* (default: :func:`choose_accel`).

    libguestfs tries KVM by itself and has no fallback when KVM is present but broken; under TCG
    it must be told with the ``force_tcg`` backend setting (honoured by the ``direct`` backend).
    """
    accel = accel or choose_accel()
    settings = [s for s in handle.get_backend_settings() if s != "force_tcg"]
    if accel == "tcg":
        settings.append("force_tcg")
    handle.set_backend_settings(settings)
