"""Foreign VM disks, built with libguestfs (never with imgconv), and what is really on them.

One appliance launch builds every disk the vm-to-oci tests need:

    plain        MBR, one ext4 partition: a small busybox-based Linux ("alpine" by its os-release) with files
                 of several owners, setuid/setgid/sticky modes, user.* xattrs, a file capability
                 (security.capability), a POSIX ACL, hard links, symlinks, a fifo, a device node, a file name
                 that is not UTF-8, and junk in /tmp, /proc, /run, /sys, /dev, plus a kernel in /boot and
                 modules in /lib/modules;
    layered      MBR: /boot (ext4, label BOOT), an LVM PV holding the root LV (ext4), and /home on xfs; a
                 merged-/usr root whose /etc/fstab names its filesystems by UUID= and LABEL= (and has proc and
                 tmpfs lines); files hidden *under* the /boot and /home mountpoints of the root filesystem;
    noos         MBR, one ext4 partition holding a few files and no operating system;
    twoos        MBR, two small roots (alpine-like and debian-like) on two ext4 partitions;
    fakeimgconv  looks like an oci-to-qcow2 disk (root labelled imgconv-root, /.imgconv) with a broken
                 origin record.

`make bench` builds a larger layered disk alone (`build_layered_disk`: the same builder, its root LV holding a
fixture's tree too) for its vm-to-oci row on a foreign LVM disk.

The judge's view of a disk (`ForeignDisk.truth`) is read in the same appliance through guestfs' own calls
(lstatns, readlink, lgetxattrs, checksum), not through tar, with every filesystem mounted where the OS
mounts it; `inspected` is what libguestfs inspection says of each disk (see EXPECTED_OS). The disks and their
truth are cached by content hash (`foreign_disks`): a warm session pays nothing for them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.treecmp import Entry, tree_from_tar

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "cat", "ls", "id", "stat", "echo", "printf", "find", "sort", "sha256sum", "readlink", "env",
           "test", "true", "false", "wc", "head", "mount", "uname", "pwd", "xargs")
KERNEL = "6.1.0-99-imgconvtest"
BIG_SIZE = 3 * 1024 * 1024 + 123  # not a multiple of anything: streamed in several chunks

PLAIN_OS_RELEASE = """NAME="Alpine Linux"
ID=alpine
VERSION_ID=3.19.1
PRETTY_NAME="Alpine Linux v3.19 (imgconv test disk)"
HOME_URL="https://alpinelinux.org/"
"""
DEBIAN_OS_RELEASE = """PRETTY_NAME="Debian GNU/Linux 12 (bookworm) (imgconv test disk)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
VERSION="12 (bookworm)"
VERSION_CODENAME=bookworm
ID=debian
"""
PASSWD = ("root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000:Alice:/home/alice:/bin/sh\n"
          "bob:x:1001:1001::/home/bob:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
GROUP = "root:x:0:\nstaff:x:50:alice,bob\nalice:x:1000:\nbob:x:1001:\nnogroup:x:65534:\n"

# What vm-to-oci must leave out of a foreign disk without --keep-boot: the contents, not the directories.
RUNTIME_DIRS = ("proc", "sys", "dev", "run", "tmp")
BOOT_TREES = ("boot", "lib/modules", "usr/lib/modules")


@dataclass(frozen=True)
class Inspected:
    root: str
    distro: str
    version: str  # "MAJOR.MINOR", as imgconv's labels record it
    product: str
    arch: str
    mountpoints: dict[str, str]


@dataclass(frozen=True)
class ForeignDisk:
    name: str
    path: Path
    truth: dict[str, Entry]  # every filesystem mounted at its mountpoint, as guestfs reads it
    inspected: tuple[Inspected, ...]  # one per root libguestfs inspection finds (none for noos)
    fs_roots: tuple[str, ...]  # mountpoints whose filesystem roots carry a lost+found
    sha256: str
    notes: dict[str, Any]  # builder facts the tests check against (UUIDs, labels, hidden paths)

    @property
    def os(self) -> Inspected:
        assert len(self.inspected) == 1, self.inspected
        return self.inspected[0]

    def file_text(self, path: str) -> str:
        return str(self.notes["texts"][path])


def expected_export(disk: ForeignDisk, *, keep_boot: bool = False) -> dict[str, Entry]:
    """The tree vm-to-oci must produce from a foreign disk: the truth minus lost+found, minus what is
    under the runtime directories (and /boot and the modules trees, unless keep_boot); those directories stay."""
    emptied = RUNTIME_DIRS + (() if keep_boot else BOOT_TREES)
    dropped = {f"{m.strip('/')}/lost+found".lstrip("/") for m in disk.fs_roots}
    out = {}
    for path, entry in disk.truth.items():
        if path in dropped or any(path.startswith(d + "/") for d in dropped):
            continue
        if any(path.startswith(d + "/") for d in emptied):
            continue
        out[path] = entry
    return out


# -- building -----------------------------------------------------------------------------------------------


class _Builder:
    """Thin helpers over a guestfs handle; modes are applied after owners (chown clears setuid)."""

    def __init__(self, g: Any, scratch: Path) -> None:
        self.g = g
        self.scratch = scratch  # host files to upload from
        self.texts: dict[str, str] = {}

    def d(self, path: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> None:
        if not self.g.is_dir(path):
            self.g.mkdir_p(path)
        self.g.chown(uid, gid, path)
        self.g.chmod(mode, path)

    def f(self, path: str, data: str | bytes, mode: int = 0o644, uid: int = 0, gid: int = 0,
          xattrs: dict[str, str] | None = None) -> None:
        raw = data.encode() if isinstance(data, str) else data
        self.g.write(path, raw)
        self.g.chown(uid, gid, path)
        self.g.chmod(mode, path)
        for name, value in (xattrs or {}).items():
            self.g.setxattr(name, value, len(value.encode()), path)
        if isinstance(data, str):
            self.texts[path.lstrip("/")] = data

    def symlink(self, path: str, target: str) -> None:
        self.g.ln_s(target, path)

    def busybox_os(self, *, os_release: str, fstab: str, merged_usr: bool, debian_version: str | None = None) -> None:
        bindir = "/usr/bin" if merged_usr else "/bin"
        for path, mode in (("/etc", 0o755), ("/root", 0o700), ("/tmp", 0o1777), ("/var/log", 0o755),
                           ("/var/tmp", 0o1777), ("/usr/bin", 0o755), ("/usr/sbin", 0o755), ("/proc", 0o555),
                           ("/sys", 0o555), ("/dev", 0o755), ("/run", 0o755), ("/boot", 0o755), ("/home", 0o755),
                           ("/srv", 0o755)):
            self.d(path, mode)
        if merged_usr:
            self.d("/usr/lib", 0o755)
            for name in ("bin", "sbin", "lib"):
                self.symlink(f"/{name}", f"usr/{name}")
        else:
            for name in ("/bin", "/sbin", "/lib"):
                self.d(name)
        self.g.upload(str(BUSYBOX), f"{bindir}/busybox")
        self.g.chmod(0o755, f"{bindir}/busybox")
        for applet in APPLETS:
            self.symlink(f"{bindir}/{applet}", "busybox")
        self.f("/etc/os-release", os_release)
        self.f("/etc/fstab", fstab)
        self.f("/etc/passwd", PASSWD)
        self.f("/etc/group", GROUP)
        self.f("/etc/shadow", "root:*:19000:0:99999:7:::\n", 0o640, 0, 42)
        self.f("/etc/hostname", "legacy-server\n")
        if debian_version is not None:
            self.f("/etc/debian_version", debian_version)
        self.f("/var/log/messages", "Jan  1 00:00:00 legacy-server kernel: booted\n", 0o640)

    def junk(self) -> None:
        """What a stopped VM leaves where the running system mounts its runtime filesystems."""
        self.f("/tmp/junk-file", "stale temp file\n")
        self.d("/tmp/junk-dir/deeper", 0o700, 1000, 1000)
        self.f("/tmp/junk-dir/deeper/x", "x\n", 0o600, 1000, 1000)
        self.d("/tmp/.X11-unix", 0o1777)
        self.f("/proc/junk", "written while /proc was not mounted\n")
        self.d("/run/lock", 0o1777)
        self.f("/run/lock/junk.lock", "123\n")
        self.f("/run/sshd.pid", "4242\n")
        self.f("/sys/junk", "sysfs was not mounted\n")
        self.g.mknod_c(0o666, 1, 3, "/dev/null")
        self.g.mknod_c(0o600, 5, 1, "/dev/console")
        self.f("/var/tmp/kept", "only /tmp is emptied, not /var/tmp\n")

    def kernel(self, modules_dir: str) -> None:
        self.f(f"/boot/vmlinuz-{KERNEL}", b"\x7fnot really a kernel\x00" * 64)
        self.f(f"/boot/initrd.img-{KERNEL}", b"\x1f\x8bnot really an initrd" * 32)
        self.d("/boot/grub")
        self.f("/boot/grub/grub.cfg", f"linux /vmlinuz-{KERNEL} root=LABEL=root\n", 0o600)
        base = f"{modules_dir}/{KERNEL}"
        self.d(f"{base}/kernel/fs/imgconvfs")
        self.f(f"{base}/kernel/fs/imgconvfs/imgconvfs.ko", b"\x7fELF module" * 16)
        self.f(f"{base}/modules.dep", "kernel/fs/imgconvfs/imgconvfs.ko:\n")


def _big_bytes() -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < BIG_SIZE:
        out += hashlib.sha256(counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:BIG_SIZE])


CAP_NET_RAW = b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"  # =ep
LEGACY_DIR = "srv/legacy-names"  # names in latin-1, as an old server may have them
LEGACY_NAME = b"caf\xe9-men\xfc.txt"


def _extras_tars(directory: Path) -> list[Path]:
    import io
    import tarfile

    caps = directory / "caps.tar"
    with tarfile.open(caps, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("usr/bin/ping")
        info.size, info.mode = len(BUSYBOX_HEAD), 0o755
        info.pax_headers = {"SCHILY.xattr.security.capability": CAP_NET_RAW.decode("latin-1")}
        tar.addfile(info, io.BytesIO(BUSYBOX_HEAD))
    legacy = directory / "legacy.tar"
    with tarfile.open(legacy, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        folder = tarfile.TarInfo(LEGACY_DIR)
        folder.type, folder.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(folder)
        info = tarfile.TarInfo(f"{LEGACY_DIR}/{LEGACY_NAME.decode('latin-1')}")
        info.size, info.mode, info.uid, info.gid = 14, 0o644, 1000, 1000
        tar.addfile(info, io.BytesIO(b"latin-1 name\n\n"))
    return [caps, legacy]


BUSYBOX_HEAD = b"\x7fELF not really ping\n"


def _build_plain(b: _Builder) -> dict[str, Any]:
    g = b.g
    g.part_disk("/dev/sda", "mbr")
    g.mkfs("ext4", "/dev/sda1", label="root")
    uuid = g.vfs_uuid("/dev/sda1")
    g.mount("/dev/sda1", "/")
    b.busybox_os(os_release=PLAIN_OS_RELEASE, merged_usr=False,
                 fstab=f"UUID={uuid} / ext4 rw,relatime 0 1\nproc /proc proc defaults 0 0\n")
    b.junk()
    b.kernel("/lib/modules")
    # Owners, modes, xattrs, links, special files.
    b.d("/srv/owned", 0o750, 1234, 5678)
    b.f("/srv/owned/nobody", "owned by nobody\n", 0o640, 65534, 65534)
    b.f("/srv/owned/big-ids", "ids past the octal tar fields\n", 0o600, 3000000, 3000001)
    g.cp("/bin/busybox", "/usr/bin/suid-busybox")
    g.chmod(0o4755, "/usr/bin/suid-busybox")
    b.f("/usr/bin/setgid-tool", "#!/bin/sh\necho setgid\n", 0o2755, 0, 50)
    b.d("/srv/setgid-dir", 0o2775, 0, 50)
    b.d("/srv/sticky", 0o1777)
    b.f("/srv/xattr-file", "has user xattrs\n",
        xattrs={"user.imgconv.comment": "on the disk", "user.imgconv.unicode": "ünïcødé value"})
    b.d("/srv/xattr-dir")
    g.setxattr("user.imgconv.dir", "a directory's xattr", len("a directory's xattr"), "/srv/xattr-dir")
    b.f("/srv/hard-a", "one inode, three names\n", 0o640, 1000, 1000)
    g.ln("/srv/hard-a", "/srv/hard-b")
    b.d("/srv/sub")
    g.ln("/srv/hard-a", "/srv/sub/hard-c")
    b.symlink("/srv/sym-rel", "hard-a")
    b.symlink("/srv/sym-abs", "/etc/os-release")
    b.symlink("/srv/sym-dangling", "/nonexistent/target")
    g.mkfifo(0o640, "/srv/fifo")
    g.mknod_c(0o660, 1, 5, "/srv/zero-device")
    b.f("/srv/empty", "")
    b.f("/srv/with space.txt", "a name with a space\n")
    b.f("/srv/ünïcødé-名前.txt", "a non-ASCII name\n")
    b.f("/srv/big.bin", _big_bytes())
    b.d("/srv/" + "/".join(["d" * 40] * 4))
    b.f("/srv/" + "/".join(["d" * 40] * 4) + "/a-path-longer-than-one-hundred-characters.txt", "long\n")
    b.d("/home/alice", 0o700, 1000, 1000)
    b.f("/home/alice/.profile", "export EDITOR=vi\n", 0o644, 1000, 1000)
    # What the Python bindings cannot write (a binary xattr value, a name that is not UTF-8) goes in as tar.
    for tar in _extras_tars(b.scratch):
        g.tar_in(str(tar), "/", xattrs=True)
    b.f("/srv/acl-file", "has a POSIX ACL\n", 0o640)
    g.acl_set_file("/srv/acl-file", "access", "u::rw-,u:1000:r--,g::r--,m::r--,o::---")
    g.umount_all()
    return {"root_uuid": uuid}


@dataclass(frozen=True)
class Layered:
    """Where the layered disk goes and how big its root is: the tests' disk is /dev/sdb beside the others; make
    bench's (`build_layered_disk`) is alone in its appliance, with a root LV large enough for its content."""

    device: str = "/dev/sdb"
    spare: str = "/dev/sdf"  # the drive holding the empty xfs copied into /home
    lvm_mib: int = 192
    root_lv_mib: int = 160
    content: Path | None = None  # a tar unpacked into CONTENT_DIR on the root LV (make bench's payload)


CONTENT_DIR = "/srv/content"


def _build_layered(b: _Builder, where: Layered = Layered()) -> dict[str, Any]:
    g = b.g
    dev = where.device
    lvm_end = 64 + where.lvm_mib  # MiB, after the 1 MiB before the first partition
    g.part_init(dev, "mbr")
    g.part_add(dev, "p", 2048, 2048 + 64 * 2048 - 1)  # /boot: 64 MiB
    g.part_add(dev, "p", 2048 + 64 * 2048, 2048 + lvm_end * 2048 - 1)  # LVM: 192 MiB for the tests
    g.part_add(dev, "p", 2048 + lvm_end * 2048, -1)  # /home: the rest (xfs needs 300 MiB)
    g.pvcreate(f"{dev}2")
    g.vgcreate("legacyvg", [f"{dev}2"])
    g.lvcreate("root", "legacyvg", where.root_lv_mib)
    root_dev = "/dev/legacyvg/root"
    g.mkfs("ext4", f"{dev}1", label="BOOT")
    g.mkfs("ext4", root_dev, label="root")
    # The appliance has no mkfs.xfs (that is Debian's libguestfs-xfs): the host's made an empty xfs on the
    # spare drive, which is copied into the partition and then wiped, so its UUID is not seen twice.
    g.copy_device_to_device(where.spare, f"{dev}3", sparse=True)
    g.wipefs(where.spare)
    root_uuid, home_uuid = g.vfs_uuid(root_dev), g.vfs_uuid(f"{dev}3")
    fstab = (
        "# /etc/fstab: static file system information.\n"
        f"UUID={root_uuid}  /      ext4  errors=remount-ro  0 1\n"
        "LABEL=BOOT        /boot  ext4  defaults,nodev     0 2\n"
        f"UUID={home_uuid}  /home  xfs   defaults           0 2\n"
        "proc              /proc  proc  defaults           0 0\n"
        "tmpfs             /tmp   tmpfs defaults,nosuid    0 0\n"
    )
    g.mount(root_dev, "/")
    b.busybox_os(os_release=DEBIAN_OS_RELEASE, fstab=fstab, merged_usr=True, debian_version="12.4\n")
    b.junk()
    # Hidden by the filesystems mounted over them: a running system never shows these.
    b.f("/boot/HIDDEN-under-boot-mount", "shadowed by the /boot filesystem\n")
    b.d("/home/HIDDEN-dir")
    b.f("/home/HIDDEN-dir/file", "shadowed by the /home filesystem\n")
    g.chmod(0o700, "/home")  # the mountpoint's own mode is hidden too: the mounted root's mode counts
    g.cp("/usr/bin/busybox", "/usr/bin/su")
    g.chmod(0o4755, "/usr/bin/su")
    b.f("/usr/bin/wall", "#!/bin/sh\n", 0o2755, 0, 5)
    b.d("/var/lib/app", 0o750, 1001, 50)
    b.f("/var/lib/app/state.json", '{"ok": true}\n', 0o640, 1001, 50,
        xattrs={"user.imgconv.origin": "root LV"})
    b.f("/etc/hard-one", "linked on the LVM root\n")
    g.ln("/etc/hard-one", "/etc/hard-two")
    g.mkfifo(0o600, "/var/lib/app/control")
    if where.content is not None:
        b.d(CONTENT_DIR)
        g.tar_in(str(where.content), CONTENT_DIR, xattrs=True)
    g.mount(f"{dev}1", "/boot")
    b.kernel("/usr/lib/modules")
    b.f(f"/boot/config-{KERNEL}", "CONFIG_IMGCONV=y\n")
    g.mount(f"{dev}3", "/home")
    g.chmod(0o755, "/home")
    b.d("/home/alice", 0o700, 1000, 1000)
    b.f("/home/alice/notes.txt", "alice's notes on xfs\n", 0o600, 1000, 1000,
        xattrs={"user.imgconv.note": "xattr on xfs"})
    b.d("/home/bob", 0o750, 1001, 1001)
    b.f("/home/bob/script.sh", "#!/bin/sh\necho bob\n", 0o4750, 1001, 1001)
    b.d("/home/shared", 0o2770, 0, 50)
    b.f("/home/shared/team.txt", "shared\n", 0o660, 1000, 50)
    g.ln("/home/shared/team.txt", "/home/shared/team-link.txt")
    b.symlink("/home/alice/link-to-etc", "/etc/hostname")
    g.umount_all()
    return {"root_uuid": root_uuid, "home_uuid": home_uuid, "root_device": root_dev, "boot_label": "BOOT",
            "hidden": ["boot/HIDDEN-under-boot-mount", "home/HIDDEN-dir", "home/HIDDEN-dir/file"]}


def _build_noos(b: _Builder) -> dict[str, Any]:
    g = b.g
    g.part_disk("/dev/sdc", "mbr")
    g.mkfs("ext4", "/dev/sdc1", label="data")
    g.mount("/dev/sdc1", "/")
    b.d("/photos")
    b.f("/photos/cat.txt", "not an operating system\n")
    b.f("/README", "just data\n")
    g.umount_all()
    return {}


def _build_twoos(b: _Builder) -> dict[str, Any]:
    g = b.g
    dev = "/dev/sdd"
    g.part_init(dev, "mbr")
    g.part_add(dev, "p", 2048, 2048 + 48 * 2048 - 1)
    g.part_add(dev, "p", 2048 + 48 * 2048, -1)
    for part, release, marker in ((f"{dev}1", PLAIN_OS_RELEASE, "first"), (f"{dev}2", DEBIAN_OS_RELEASE, "second")):
        g.mkfs("ext4", part)
        g.mount(part, "/")
        for name in ("/bin", "/etc", "/usr/bin", "/root"):
            b.d(name)
        g.upload(str(BUSYBOX), "/bin/busybox")
        g.chmod(0o755, "/bin/busybox")
        b.symlink("/bin/sh", "busybox")
        b.symlink("/bin/cat", "busybox")
        b.f("/etc/os-release", release)
        b.f("/etc/fstab", f"{part.replace('/dev/sdd', '/dev/sda')} / ext4 defaults 0 1\n")
        b.f("/etc/which-root", f"{marker}\n")
        g.umount_all()
    return {}


def _build_fakeimgconv(b: _Builder) -> dict[str, Any]:
    """Looks like a disk oci-to-qcow2 made (the root's label, /.imgconv), but its origin record is broken."""
    g = b.g
    g.part_disk("/dev/sde", "mbr")
    g.mkfs("ext4", "/dev/sde1", label="imgconv-root")
    g.mount("/dev/sde1", "/")
    b.d("/.imgconv")
    b.f("/.imgconv/origin.json", '{"imgconv": "0.1.0", "injected": [".imgconv", ')
    b.f("/.imgconv/config.json", '{"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", '
        '"diff_ids": []}, "config": {"Cmd": ["/bin/sh"]}}')
    b.d("/etc")
    b.f("/etc/hostname", "fake\n")
    g.umount_all()
    return {}


XFS_SIZE = 320 << 20  # mkfs.xfs refuses less than 300 MiB

BUILDERS: dict[str, tuple[str, int, Callable[[_Builder], dict[str, Any]]]] = {
    # name: (device, virtual size, builder)
    "plain": ("/dev/sda", 256 << 20, _build_plain),
    "layered": ("/dev/sdb", 1 << 30, _build_layered),
    "noos": ("/dev/sdc", 64 << 20, _build_noos),
    "twoos": ("/dev/sdd", 128 << 20, _build_twoos),
    "fakeimgconv": ("/dev/sde", 64 << 20, _build_fakeimgconv),
}

MOUNTS: dict[str, list[tuple[str, str]]] = {
    # how the judge mounts each disk (device, mountpoint): from the builder's knowledge, not from inspection
    "plain": [("/dev/sda1", "/")],
    "layered": [("/dev/legacyvg/root", "/"), ("/dev/sdb1", "/boot"), ("/dev/sdb3", "/home")],
    "noos": [("/dev/sdc1", "/")],
    "twoos": [("/dev/sdd1", "/")],
    "fakeimgconv": [("/dev/sde1", "/")],
}
FS_ROOTS: dict[str, tuple[str, ...]] = {"plain": ("/",), "layered": ("/", "/boot"), "noos": ("/",), "twoos": ("/",),
                                        "fakeimgconv": ("/",)}


# -- reading the truth ----------------------------------------------------------------------------------------


def read_tree(g: Any, scratch: Path) -> dict[str, Entry]:
    """Every path under the mounted /, through guestfs' stat, readlink, xattr and checksum calls.

    The Python bindings pass names as UTF-8 strings, so a directory holding other names (LEGACY_DIR) is
    read with guestfs' tar-out instead (the one place the judge reads as imgconv does)."""
    listing = scratch / "find0"
    g.find0("/", str(listing))
    names = [raw.decode("utf-8", "surrogateescape") for raw in listing.read_bytes().split(b"\0") if raw]
    listing.unlink()
    legacy = {n for n in names if n.startswith(LEGACY_DIR + "/")}
    paths = sorted(n for n in names if n not in legacy)
    stats: dict[str, dict[str, int]] = {p: g.lstatns(f"/{p}") for p in paths}
    by_inode: dict[tuple[int, int], list[str]] = {}
    for path, st in stats.items():
        if stat.S_ISREG(st["st_mode"]) and st["st_nlink"] > 1:
            by_inode.setdefault((st["st_dev"], st["st_ino"]), []).append(path)
    first_of = {p: sorted(group)[0] for group in by_inode.values() for p in group}
    tree: dict[str, Entry] = {}
    for path in paths:
        st = stats[path]
        mode = st["st_mode"]
        xattrs = tuple(sorted((x["attrname"], bytes(x["attrval"]) if not isinstance(x["attrval"], str)
                               else x["attrval"].encode("utf-8", "surrogateescape"))
                              for x in g.lgetxattrs(f"/{path}")))
        perms, uid, gid = stat.S_IMODE(mode), st["st_uid"], st["st_gid"]
        if stat.S_ISREG(mode):
            leader = first_of.get(path)
            tree[path] = Entry("file", perms, uid, gid, st["st_size"], g.checksum("sha256", f"/{path}"),
                               hardlink=leader if leader is not None and leader != path else None, xattrs=xattrs)
        elif stat.S_ISDIR(mode):
            tree[path] = Entry("dir", perms, uid, gid, xattrs=xattrs)
        elif stat.S_ISLNK(mode):
            tree[path] = Entry("symlink", perms, uid, gid, linkname=g.readlink(f"/{path}"), xattrs=xattrs)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            rdev = st["st_rdev"]
            tree[path] = Entry("char" if stat.S_ISCHR(mode) else "block", perms, uid, gid,
                               devmajor=os.major(rdev), devminor=os.minor(rdev), xattrs=xattrs)
        elif stat.S_ISFIFO(mode):
            tree[path] = Entry("fifo", perms, uid, gid, xattrs=xattrs)
        else:
            raise AssertionError(f"unexpected file type {mode:o} at {path}")
    if legacy:
        archive = scratch / "legacy-truth.tar"
        g.tar_out(f"/{LEGACY_DIR}", str(archive), numericowner=True, xattrs=True)
        for name, entry in tree_from_tar(archive).items():
            tree[f"{LEGACY_DIR}/{name}"] = entry
        archive.unlink()
        assert {p for p in tree if p.startswith(LEGACY_DIR + "/")} == legacy
    return tree


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _appliance(disks: dict[Path, int], directory: Path) -> tuple[Any, Path]:
    """A launched guestfs handle with a new qcow2 of each size in *disks* (in order: /dev/sda, /dev/sdb, ...),
    then the spare drive holding an empty xfs made by the host (returned, to be removed after)."""
    import subprocess

    import guestfs  # type: ignore[import-not-found]

    from converter.boot.accel import configure_guestfs  # the host's accelerator choice, nothing else

    os.environ.setdefault("LIBGUESTFS_BACKEND", "direct")
    g = guestfs.GuestFS(python_return_dict=True)
    configure_guestfs(g)
    g.set_network(False)
    g.set_memsize(768)
    for path, size in disks.items():
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True)
        g.add_drive_opts(str(path), format="qcow2", readonly=False)
    spare = directory / "home.xfs"
    with spare.open("wb") as f:
        f.truncate(XFS_SIZE)
    subprocess.run(["mkfs.xfs", "-q", "-f", "-L", "home", str(spare)], check=True)
    g.add_drive_opts(str(spare), format="raw", readonly=False)
    g.launch()
    return g, spare


def build_layered_disk(path: Path, content: Path, root_lv_mib: int) -> dict[str, Any]:
    """The layered disk alone at *path*, its root LV (*root_lv_mib*) holding the tar *content* under
    CONTENT_DIR: `make bench`'s foreign LVM disk, built by the same code as the tests' one. Returns the notes."""
    lvm_mib = root_lv_mib + 32  # the PV's metadata and the 4 MiB extents' rounding
    size = (1 + 64 + lvm_mib + 2) * (1 << 20) + XFS_SIZE
    g, spare = _appliance({path: size}, path.parent)
    notes = _build_layered(_Builder(g, path.parent), Layered("/dev/sda", "/dev/sdb", lvm_mib, root_lv_mib, content))
    g.sync()
    g.shutdown()
    g.close()
    spare.unlink()
    return notes


def _build(directory: Path) -> None:
    """Build every disk in one appliance and record what each holds in DIRECTORY/disks.json."""
    g, spare = _appliance({directory / f"{name}.qcow2": size for name, (_device, size, _fn) in BUILDERS.items()},
                          directory)
    record: dict[str, Any] = {}
    for name, (_device, _size, fn) in BUILDERS.items():
        builder = _Builder(g, directory)
        notes = fn(builder)
        record[name] = {"notes": {**notes, "texts": builder.texts}}
    g.sync()
    for name in BUILDERS:
        for device, mountpoint in MOUNTS[name]:
            g.mount_ro(device, mountpoint)
        record[name]["truth"] = {path: _entry_json(e) for path, e in read_tree(g, directory).items()}
        g.umount_all()
    g.shutdown()
    g.close()
    spare.unlink()
    for name in BUILDERS:
        path = directory / f"{name}.qcow2"
        path.chmod(0o444)  # the tests only read these
        record[name]["sha256"] = _sha256(path)
    for tar in ("caps.tar", "legacy.tar"):
        (directory / tar).unlink(missing_ok=True)
    # names that are not UTF-8 stay surrogate-escaped in the JSON (ensure_ascii writes them as \\udcXX)
    (directory / "disks.json").write_text(json.dumps(record, indent=1, sort_keys=True))


def _entry_json(entry: Entry) -> dict[str, Any]:
    doc = {k: v for k, v in entry.__dict__.items() if v is not None and k != "xattrs"}
    doc["xattrs"] = [[k, base64.b64encode(v).decode()] for k, v in entry.xattrs]
    return doc


def _entry_from(doc: dict[str, Any]) -> Entry:
    xattrs = tuple((k, base64.b64decode(v)) for k, v in doc.pop("xattrs"))
    return Entry(**doc, xattrs=xattrs)


def cache_key() -> str:
    """Changes when what the disks are made of changes: this file, busybox, libguestfs, xfsprogs."""
    import subprocess

    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(_sha256(BUSYBOX).encode())
    versions = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${Version}\n", "libguestfs0", "xfsprogs"],
                              capture_output=True, text=True, check=False).stdout
    digest.update(versions.encode())
    return digest.hexdigest()[:20]


def foreign_disks(cache: Path) -> dict[str, ForeignDisk]:
    """The disks, from CACHE/foreign/disks-KEY (built there first, under a lock, if missing)."""
    import contextlib
    import fcntl
    import shutil
    import tempfile
    import time

    key = cache_key()
    entry = cache / "foreign" / f"disks-{key}"
    if not (entry / "disks.json").exists():
        entry.parent.mkdir(parents=True, exist_ok=True)
        with open(cache / "foreign" / f".disks-{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (entry / "disks.json").exists():
                tmp = Path(tempfile.mkdtemp(prefix=".tmp-disks-", dir=entry.parent))
                try:
                    _build(tmp)
                    os.rename(tmp, entry)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                for other in entry.parent.glob("disks-*"):  # other recipes, unused for two days
                    with contextlib.suppress(OSError):
                        if other != entry and time.time() - (other / "disks.json").stat().st_mtime > 2 * 86400:
                            shutil.rmtree(other, ignore_errors=True)
    os.utime(entry / "disks.json")  # in use
    record = json.loads((entry / "disks.json").read_text())
    disks = {}
    for name, doc in record.items():
        truth = {path: _entry_from(e) for path, e in doc["truth"].items()}
        disks[name] = ForeignDisk(name, entry / f"{name}.qcow2", truth, EXPECTED_OS[name], FS_ROOTS[name],
                                  doc["sha256"], doc["notes"])
    return disks


# What libguestfs 1.48 inspection says of these disks (device names as when each disk is attached alone).
# Checked once by hand with guestfs' inspect_os; asking it again in every session costs ~30 s of TCG time.
_ALPINE = ("alpinelinux", "3.19", "Alpine Linux v3.19 (imgconv test disk)", "x86_64")
EXPECTED_OS: dict[str, tuple[Inspected, ...]] = {
    "plain": (Inspected("/dev/sda1", *_ALPINE, {"/": "/dev/sda1"}),),
    "layered": (Inspected("/dev/legacyvg/root", "debian", "12.4", "12.4", "x86_64",
                          {"/": "/dev/legacyvg/root", "/boot": "/dev/sda1", "/home": "/dev/sda3"}),),
    "noos": (),
    "fakeimgconv": (),
    "twoos": (Inspected("/dev/sda1", *_ALPINE, {"/": "/dev/sda1"}),
              Inspected("/dev/sda2", "debian", "12.0", "Debian GNU/Linux 12 (bookworm) (imgconv test disk)", "x86_64",
                        {"/": "/dev/sda2"})),
}
