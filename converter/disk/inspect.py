"""The vm-to-oci side of the disk: open it safely, find its operating system, mount it, tar it out.

Safety rules, because a disk file is untrusted input:

* the format is determined once, from the file's own magic, and always passed explicitly
  afterwards (never let qemu probe: a raw disk could pretend to be a qcow2 with a backing file);
* a backing file, an external data file, or extents in other files are refused, naming them;
* qemu-img check must find no corruption (a truncated qcow2 fails here, before any work);
* the disk is attached read-only to a libguestfs appliance that has no network, and no guest
  binary is ever run; strings read from the guest are escaped wherever they are shown.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import stat
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from converter.disk.appliance import Appliance
from converter.errors import DiskError, ToolError
from converter.oci.model import ImageConfig, load_json
from converter.run import run

log = logging.getLogger("imgconv.inspect")

FORMATS = ("qcow2", "raw", "vmdk", "vhdx", "vpc", "vdi")
CHECKABLE = frozenset({"qcow2", "vmdk", "vhdx", "vdi"})


def probe_format(path: Path) -> str:
    """The disk format from its magic bytes: qcow2, vmdk, vhdx, vpc, vdi, or raw."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise DiskError(f"{path} does not exist") from None
    except OSError as exc:
        raise DiskError(f"{path} cannot be read: {exc.strerror}") from None
    if stat.S_ISDIR(mode):
        raise DiskError(f"{path} is a directory, not a disk image")
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):  # a FIFO would block the open below forever
        raise DiskError(f"{path} is not a disk image file or a block device")
    try:
        with path.open("rb") as f:
            head = f.read(1024)
            f.seek(0, 2)
            size = f.tell()
            tail = b""
            if size >= 512:
                f.seek(size - 512)
                tail = f.read(512)
    except FileNotFoundError:
        raise DiskError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise DiskError(f"{path} is a directory, not a disk image") from None
    except OSError as exc:
        raise DiskError(f"{path} cannot be read: {exc.strerror}") from None
    if size == 0:
        raise DiskError(f"{path} is empty")
    if head.startswith(b"QFI\xfb"):
        return "qcow2"
    if head.startswith(b"KDMV") or head.startswith(b"# Disk DescriptorFile") or b"# Disk DescriptorFile" in head[:512]:
        return "vmdk"
    if head.startswith(b"vhdxfile"):
        return "vhdx"
    if head[0x40:0x44] == b"\x7f\x10\xda\xbe":
        return "vdi"
    if head.startswith(b"conectix") or tail.startswith(b"conectix"):
        return "vpc"
    return "raw"


def _shown(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def check_disk(path: Path, fmt: str) -> dict[str, Any]:
    """`qemu-img info` with the format given; refuse anything that reaches outside the file."""
    proc = run(["qemu-img", "info", "-f", fmt, "--output=json", str(path)], purpose=f"read {path}", check=False)
    if proc.returncode != 0:
        said = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise DiskError(f"{path} is not a readable {fmt} disk: {said[-1] if said else 'qemu-img failed'}")
    info: dict[str, Any] = json.loads(proc.stdout)
    if info.get("encrypted"):
        raise DiskError(f"{path} is encrypted; imgconv reads plain disks only (decrypt a copy first with "
                        "qemu-img convert --object secret,... --image-opts ...)")
    backing = info.get("backing-filename") or info.get("full-backing-filename")
    if backing:
        raise DiskError(f"{path} has a backing file ({_shown(str(backing))}); convert the whole chain first "
                        "(qemu-img convert -O qcow2 DISK FLAT.qcow2)")
    data = (info.get("format-specific") or {}).get("data") or {}
    if data.get("data-file"):
        raise DiskError(f"{path} keeps its data in an external file ({_shown(str(data['data-file']))}); refused")
    me = path.resolve()
    for extent in data.get("extents") or []:
        name = extent.get("filename")
        if name and Path(name).resolve() != me:
            raise DiskError(f"{path} has an extent in another file ({_shown(str(name))}); refused")
    if fmt in CHECKABLE:
        check = run(["qemu-img", "check", "-f", fmt, "--output=json", str(path)], purpose=f"check {path}",
                    check=False)
        try:
            report = json.loads(check.stdout or b"{}")
        except ValueError:
            report = {}
        problems = int(report.get("corruptions", 0) or 0) + int(report.get("check-errors", 0) or 0)
        if problems or (check.returncode not in (0, 3) and not report):
            raise DiskError(f"{path} is truncated or corrupt: qemu-img check found {problems or 'unreadable'} "
                            "errors")
    return info


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
    g = app.g
    filesystems = app.call("list filesystems", g.list_filesystems)
    for device, fstype in sorted(filesystems.items()):
        if fstype != "ext4":
            continue
        try:
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
            raise ToolError(f"libguestfs failed to inspect the disk for operating systems: {exc}") from None
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
                    raise ToolError(f"cannot mount the root filesystem {device}: {exc}") from None
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
