"""The vm-to-oci side of the disk, inside the appliance: find its operating system, mount it, tar it out.

The disk was opened by :func:`converter.disk.safety.open_disk` (format from the magic, nothing outside its own
file) and is attached read-only to a libguestfs appliance that has no network; no guest binary is ever run, and
strings read from the guest are escaped wherever they are shown.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from converter.disk.appliance import Appliance
from converter.errors import DiskError, ToolError
from converter.oci.model import ImageConfig, load_json

log = logging.getLogger("imgconv.inspect")


def _shown(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


# -- inside the appliance ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class OsInfo:
    root: str
    distro: str
    version: str
    product: str
    arch: str
    mountpoints: tuple[tuple[str, str], ...]  # (mountpoint, device), shortest first


@dataclass
class Opened:
    """What was found and mounted: an imgconv disk (with its origin record) or a foreign one."""

    origin: dict[str, Any] | None = None
    config: bytes | None = None
    os: OsInfo | None = None
    mountpoints: list[str] = field(default_factory=lambda: ["/"])


def clean_label(text: str, limit: int = 200) -> str:
    """A guest-supplied string made safe for a label: no control characters, bounded length."""
    kept = "".join(ch if unicodedata.category(ch)[0] != "C" else "?" for ch in text)
    return kept[:limit]


def _imgconv_root(app: Appliance) -> Opened | None:
    """imgconv's root filesystem is an ext4 partition labelled imgconv-root. The partitions are asked for by name
    and label, which costs a few round trips; list_filesystems probes every device of the disk (and LVM) and took
    2-4 s of a busybox disk's export under TCG."""
    g = app.g
    for device in sorted(app.call("list partitions", g.list_partitions)):
        try:
            if g.vfs_type(device) != "ext4":
                continue
            label = g.vfs_label(device)
        except RuntimeError:
            continue
        if label != "imgconv-root":
            continue
        app.call(f"mount {device}", g.mount_ro, device, "/")
        if g.is_file("/.imgconv/origin.json") and g.is_file("/.imgconv/config.json"):
            origin = origin_record(app.call("read the origin record", g.read_file, "/.imgconv/origin.json"))
            config = app.call("read the embedded config", g.read_file, "/.imgconv/config.json")
            # checked now, before the whole disk is read, not when the image is assembled at the end
            ImageConfig.parse(config, "the disk's embedded image config (/.imgconv/config.json)")
            return Opened(origin=origin, config=config)
        app.call(f"unmount {device}", g.umount_all)
    return None


def origin_record(raw: bytes) -> dict[str, Any]:
    """The disk's /.imgconv/origin.json, checked: it is read from an untrusted disk like everything else."""
    origin = load_json(raw, "the disk's origin record (/.imgconv/origin.json)")
    injected = origin.get("injected", [])
    if not isinstance(injected, list) or not all(isinstance(p, str) for p in injected):
        raise DiskError("the disk's origin record (/.imgconv/origin.json) has an invalid \"injected\" list")
    return origin


def _roots_described(app: Appliance, roots: Sequence[str]) -> str:
    g = app.g
    parts = []
    for root in roots:
        try:
            product = g.inspect_get_product_name(root)
        except RuntimeError:
            product = "unknown"
        parts.append(f"{root} ({_shown(clean_label(product, 80))})")
    return ", ".join(parts)


def open_guest(app: Appliance, disk: Path, root: str | None) -> Opened:
    """Mount the disk's operating system read-only at its own mountpoints (or imgconv's root)."""
    mine = _imgconv_root(app) if root is None else None
    if mine is not None:
        return mine
    g = app.g
    try:
        roots = g.inspect_os()
    except RuntimeError as exc:
        if "augeas" not in str(exc):
            raise ToolError(f"libguestfs failed to inspect the disk for operating systems: {exc}") from exc
        return _without_inspection(app, disk, root, str(exc))
    if root is not None:
        if root not in roots:
            found = _roots_described(app, roots) if roots else "none"
            raise DiskError(f"--root {_shown(root)} is not an operating system root on {disk} (found: {found})")
        roots = [root]
    if not roots:
        raise DiskError(f"no operating system found on {disk}")
    if len(roots) > 1:
        raise DiskError(f"{disk} holds {len(roots)} operating systems: {_roots_described(app, roots)}; "
                        "choose one with --root DEVICE")
    chosen = roots[0]
    mounts = app.call("read the guest's mountpoints", g.inspect_get_mountpoints, chosen)
    ordered = sorted(mounts.items(), key=lambda item: (item[0].count("/") if item[0] != "/" else 0, item[0]))
    mounted = []
    for mountpoint, device in ordered:
        where = mountpoint if mountpoint == "/" else _inside_guest(app, mountpoint)
        if where is None:
            continue  # the guest could not mount it either
        try:
            g.mount_ro(device, where)
        except RuntimeError:
            try:  # an xfs or ext4 journal that needs replaying cannot be replayed read-only
                g.mount_options("ro,norecovery", device, where)
            except RuntimeError as exc:
                if mountpoint == "/":
                    raise ToolError(f"cannot mount the root filesystem {device}: {exc}") from exc
                continue
        mounted.append(where)

    def text(fn: Any) -> str:
        try:
            return clean_label(str(fn(chosen)))
        except RuntimeError:
            return "unknown"

    version = f"{text(g.inspect_get_major_version)}.{text(g.inspect_get_minor_version)}"
    info = OsInfo(root=chosen, distro=text(g.inspect_get_distro), version=version,
                  product=text(g.inspect_get_product_name), arch=text(g.inspect_get_arch),
                  mountpoints=tuple((m, d) for m, d in ordered if m in mounted))
    return Opened(os=info, mountpoints=mounted)


def _without_inspection(app: Appliance, disk: Path, root: str | None, why: str) -> Opened:
    """Inspection stops at a configuration file it cannot parse (an fstab line with too few fields, say),
    which the guest's own boot would shrug off. With --root, that filesystem alone is exported (the others
    its fstab names cannot be known); without, the user is told so and shown the filesystems."""
    g = app.g
    filesystems = app.call("list filesystems", g.list_filesystems)
    reason = why.split(": ", 1)[-1] if ": " in why else why
    if root is None or root not in filesystems:
        found = ", ".join(f"{dev} ({kind})" for dev, kind in sorted(filesystems.items())
                          if kind not in ("swap", "unknown", "")) or "none"
        said = f"--root {_shown(root)} is not a filesystem on {disk}" if root else \
            f"the operating system on {disk} cannot be inspected"
        raise DiskError(f"{said}: a configuration file of the guest does not parse ({clean_label(reason, 120)}); "
                        f"pass --root DEVICE to export that filesystem alone (filesystems: {found})")
    with contextlib.suppress(RuntimeError):
        g.umount_all()  # a failed inspection can leave what it was reading mounted
    try:
        g.mount_ro(root, "/")
    except RuntimeError:
        app.call(f"mount {root}", g.mount_options, "ro,norecovery", root, "/")
    log.warning("the guest's configuration does not parse (%s): exporting %s alone, without the filesystems "
                "its /etc/fstab would mount", clean_label(reason, 120), root)
    arch = "unknown"
    with contextlib.suppress(RuntimeError):
        arch = str(g.file_architecture(g.realpath("/bin/sh")))
    info = OsInfo(root=root, distro="unknown", version="unknown", product="unknown", arch=arch,
                  mountpoints=(("/", root),))
    return Opened(os=info, mountpoints=["/"])


def _inside_guest(app: Appliance, mountpoint: str) -> str | None:
    """Where the guest's own kernel would mount *mountpoint*: its symlinks and `..` resolved inside the guest,
    as mounted so far, or None if it names no directory there.

    libguestfs mounts at /sysroot + the path given and resolves that in the appliance, where a symlink of
    the guest's (`/srv/x -> /usr/bin`) or a `..` leads out of the guest: a disk's fstab could then cover
    the appliance's own programs with its own. realpath runs chrooted into the guest, so its answer
    stays inside.
    """
    g = app.g
    try:
        where = str(g.realpath(mountpoint))
        return where if where.startswith("/") and g.is_dir(where) else None
    except RuntimeError:
        return None


def exclude_patterns(paths: Sequence[str]) -> list[str]:
    """GNU tar exclude patterns (as libguestfs passes them) matching exactly these archive paths."""
    out = []
    for path in paths:
        escaped = re.sub(r"([*?\[\]\\])", r"\\\1", path.strip("/"))
        out.append(f"./{escaped}")
    return out
