"""KVM or TCG: which accelerator qemu (and the libguestfs appliance) can really use here.

``/dev/kvm`` existing is not enough: on some hosts (nested virtualisation, odd CPU models) qemu
aborts under KVM as soon as a vCPU is set up, and on others a guest's vCPU spins forever in the host's
kernel once it leaves real mode (seen: a firecracker host where a paused qemu was fine and every guest
kernel hung without printing a line). So the probe boots a real kernel: this machine's newest under
/boot, with no initramfs and ``panic=-1``, under KVM; a healthy KVM prints the kernel's banner and
exits within a second or two, after the panic for want of a root filesystem. Without a readable
kernel it falls back to starting qemu paused and asking it over QMP to quit. The answer is cached per
host kernel and qemu version. ``IMGCONV_ACCEL=kvm|tcg`` overrides it all.
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
BOOT_PROBE_ARGV = (
    QEMU, "-accel", "kvm", "-cpu", "host", "-nodefaults", "-display", "none", "-machine", "pc", "-m", "256",
    "-serial", "stdio", "-no-reboot", "-append", "console=ttyS0 panic=-1 quiet loglevel=1",
)  # fmt: skip
BOOT_PROBE_TIMEOUT = 20.0  # a healthy KVM takes about a second; a hung one never ends
HOST_BOOT = Path("/boot")
_CACHE_NAME = "kvm-boot-probe.json"  # not the paused probe's kvm-probe.json: its answers cannot be trusted


def _probe_key() -> str:
    version = run([QEMU, "--version"], purpose="find the qemu version").stdout.decode(errors="replace")
    first = version.splitlines()[0] if version else "unknown"
    return f"{platform.release()} | {first}"


def _probe_kernel() -> Path | None:
    """The newest readable kernel under /boot (any will do: only KVM is being tested)."""
    kernels = sorted((p for p in HOST_BOOT.glob("vmlinuz-*") if p.is_file() and os.access(p, os.R_OK)),
                     key=lambda p: p.stat().st_mtime)
    return kernels[-1] if kernels else None


def _probe() -> bool:
    kernel = _probe_kernel()
    if kernel is None:
        return _probe_paused()
    try:
        proc = run([*BOOT_PROBE_ARGV, "-kernel", str(kernel)], purpose="check that KVM boots a kernel",
                   timeout=BOOT_PROBE_TIMEOUT, check=False)
    except ToolError as exc:  # hung: as bad as failing
        log.debug("kvm boot probe: %s", exc)
        return False
    # quiet loglevel=1 still prints the panic; an exit without it means the guest never ran Linux
    ran = b"Kernel panic" in proc.stdout
    log.debug("kvm boot probe: exit %d, panic seen: %s", proc.returncode, ran)
    return proc.returncode == 0 and ran


def _probe_paused() -> bool:
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
