"""The run spec the guest init reads, the environment docker would give, and the small initramfs.

Everything here is pure except :func:`build_initramfs` and :func:`needed_modules`, which read the
kernel's module tree.

Spec format (version 1), read by ``init/init.c``: a sequence of NUL-terminated byte strings taken
in pairs, ``key\\0value\\0``. The first pair is ``version`` / ``1``. Keys: ``arg`` (repeated, in
order: the whole argv, Entrypoint + Cmd), ``env`` (repeated, ``KEY=VALUE``, final except HOME),
``cwd`` (empty: ``/``), ``user`` (docker's user spec; empty: root), ``hostname``; then, so that
``imgconv boot`` can apply ``docker run``'s overrides in the guest (:mod:`converter.boot.runspec`),
``image`` (``1``) and the image's own ``image-entrypoint``, ``image-cmd`` and ``image-env`` (each
repeated, in order); ``mode`` (``system``, only for a system-mode disk: the image's init system boots, the
command runs as its service). Readers ignore unknown keys (an older init ignores the ``image`` keys).
Strings are UTF-8 with ``surrogateescape``, so bytes that are not UTF-8 in an image config come
through unchanged.
"""

from __future__ import annotations

import gzip
import io
import lzma
import stat
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from converter.errors import ImageError, ToolError

SPEC_VERSION = "1"
SPEC_KEYS = ("version", "hostname", "cwd", "user", "arg", "env", "image", "image-entrypoint", "image-cmd",
             "image-env")

# docker's default PATH for Linux containers (pkg/system DefaultPathEnv).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Block drivers a VM disk may sit behind: virtio-blk, virtio-scsi, IDE (q35/pc), AHCI, NVMe.
DISK_MODULES = ("virtio_pci", "virtio_blk", "virtio_scsi", "sd_mod", "ata_piix", "ahci", "nvme")
# The NIC of ``imgconv boot`` (virtio-net-pci; its dependencies failover and net_failover come with it), so
# that the init can bring it up; the disk drivers come first, so the disk never waits on the NIC.
NET_MODULES = ("virtio_net",)
# ``imgconv boot``'s channels to the host: virtio-serial ports carry the workload's stdin, stdout and stderr
# byte-exact (the serial console's line discipline does not); virtiofs shares host folders (``--volume``).
HOST_MODULES = ("virtio_console", "virtiofs")
# The ACPI power button, so that a system-mode guest's init hears imgconv boot's stop (system_powerdown).
SYSTEM_MODULES = ("button",)
# The root filesystem, where the kernel has it as a module (Debian's generic kernel; the cloud kernel builds them
# in, and modules.builtin skips them): ext4 brings crc16, mbcache and jbd2 through modules.dep, but the crc32c
# its metadata checksums need is only a softdep (crypto-crc32c), which nothing in the initramfs would resolve.
ROOT_MODULES = ("crc32c_generic", "ext4")
BOOT_MODULES = DISK_MODULES + NET_MODULES + HOST_MODULES + SYSTEM_MODULES + ROOT_MODULES

INITRAMFS_MARKER = "imgconv-initramfs"


@dataclass(frozen=True)
class InitSpec:
    """What the guest init runs: the container's process, as docker would start it."""

    argv: tuple[str, ...]
    env: tuple[str, ...]
    cwd: str = ""
    user: str = ""
    hostname: str = ""
    image: ImageRun | None = None  # the image's own Entrypoint, Cmd and Env, for boot's overrides
    mode: str = "container"  # or "system": the image's init system is PID 1 (oci-to-qcow2 --init)


@dataclass(frozen=True)
class ImageRun:
    """The image config's Entrypoint, Cmd and Env as they are: what ``docker run``'s overrides apply to."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()


def _encode(text: str, what: str) -> bytes:
    data = text.encode("utf-8", "surrogateescape")
    if b"\0" in data:
        raise ImageError(f"the image's {what} contains a NUL byte, which no process can receive: {text!r}")
    return data


def encode_spec(spec: InitSpec) -> bytes:
    """The spec file's bytes (format in the module docstring)."""
    pairs: list[tuple[str, str, str]] = [
        ("version", SPEC_VERSION, "spec version"),
        ("hostname", spec.hostname, "hostname"),
        ("cwd", spec.cwd, "working directory"),
        ("user", spec.user, "user"),
    ]
    pairs += [("arg", arg, "command") for arg in spec.argv]
    pairs += [("env", env, "environment") for env in spec.env]
    if spec.image is not None:
        pairs.append(("image", "1", "spec"))
        pairs += [("image-entrypoint", arg, "entrypoint") for arg in spec.image.entrypoint]
        pairs += [("image-cmd", arg, "command") for arg in spec.image.cmd]
        pairs += [("image-env", env, "environment") for env in spec.image.env]
    if spec.mode != "container":
        pairs.append(("mode", spec.mode, "mode"))
    out = bytearray()
    for key, value, what in pairs:
        out += key.encode() + b"\0" + _encode(value, what) + b"\0"
    return bytes(out)


def decode_spec(data: bytes) -> InitSpec:
    """Parse a spec written by :func:`encode_spec` (or a newer imgconv: unknown keys are skipped)."""
    if not data.endswith(b"\0"):
        raise ValueError("spec is truncated: it does not end with NUL")
    fields = data[:-1].split(b"\0")
    if len(fields) % 2:
        raise ValueError("spec is truncated: a key has no value")
    if fields[:2] != [b"version", SPEC_VERSION.encode()]:
        raise ValueError("not a version 1 spec")
    argv: list[str] = []
    env: list[str] = []
    single = {"cwd": "", "user": "", "hostname": "", "image": "", "mode": "container"}
    lists: dict[str, list[str]] = {"arg": argv, "env": env, "image-entrypoint": [], "image-cmd": [], "image-env": []}
    for i in range(2, len(fields), 2):
        key = fields[i].decode("utf-8", "surrogateescape")
        value = fields[i + 1].decode("utf-8", "surrogateescape")
        if key in lists:
            lists[key].append(value)
        elif key in single:
            single[key] = value
    image = None
    if single["image"] == "1":
        image = ImageRun(tuple(lists["image-entrypoint"]), tuple(lists["image-cmd"]), tuple(lists["image-env"]))
    return InitSpec(tuple(argv), tuple(env), single["cwd"], single["user"], single["hostname"], image,
                    single["mode"])


def docker_env(image_env: Sequence[str], hostname: str) -> tuple[str, ...]:
    """The environment ``docker run`` (without ``-t``) gives a container of this image, minus HOME.

    docker (container.CreateDaemonEnvironment) starts from ``PATH`` and ``HOSTNAME`` and merges the
    image's Env with ReplaceOrAppendEnvValues: an entry whose key is one of those two replaces it in
    place, an entry without ``=`` removes it, anything else is appended (an entry without ``=``
    whose key is not PATH/HOSTNAME is dropped). runc then drops duplicate keys, keeping the last
    value at the position of its last occurrence, and rejects ``=VALUE``. HOME is added by the
    guest init, from the user's passwd entry, when the result has none.
    """
    env: list[str | None] = [f"PATH={DEFAULT_PATH}", f"HOSTNAME={hostname}"]
    defaults = {"PATH": 0, "HOSTNAME": 1}  # appended entries are deliberately not indexed (as docker)
    for entry in image_env:
        key, sep, _ = entry.partition("=")
        if not sep:
            if key in defaults:
                env[defaults[key]] = None
            continue
        if key in defaults:
            env[defaults[key]] = entry
        else:
            env.append(entry)

    merged = [e for e in env if e is not None]
    seen: set[str] = set()
    final: list[str] = []
    for entry in reversed(merged):
        key = entry.partition("=")[0]
        if not key:
            raise ImageError(f"the image's environment has an entry with an empty name: {entry!r}")
        if key not in seen:
            seen.add(key)
            final.append(entry)
    final.reverse()
    for entry in final:
        _encode(entry, "environment")
    return tuple(final)


# ----------------------------------------------------------------------------------- modules --

_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def _module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for suffix in _MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def _read_modules_dep(modules_root: Path) -> dict[str, list[str]]:
    dep_file = modules_root / "modules.dep"
    try:
        text = dep_file.read_text()
    except OSError as exc:
        raise ToolError(f"cannot read {dep_file} to find the disk drivers for the initramfs: {exc}") from exc
    deps: dict[str, list[str]] = {}
    for line in text.splitlines():
        module, sep, rest = line.partition(":")
        if sep:
            deps[module.strip()] = rest.split()
    return deps


def needed_modules(modules_root: Path, names: Sequence[str] = DISK_MODULES) -> list[str]:
    """Module files (relative to *modules_root*, which holds ``modules.dep``) to load for *names*.

    Dependencies come first and nothing twice, in the order modprobe would load them. Names that
    are built into the kernel (``modules.builtin``) or absent from this kernel are skipped.
    """
    deps = _read_modules_dep(modules_root)
    by_name = {_module_name(path): path for path in deps}
    builtin_file = modules_root / "modules.builtin"
    builtin = (
        {_module_name(line.strip()) for line in builtin_file.read_text().splitlines() if line.strip()}
        if builtin_file.exists()
        else set()
    )

    order: list[str] = []
    seen: set[str] = set()

    def visit(start: str) -> None:
        """Depth-first, dependencies before their user; a loop instead of recursion, since an image's
        modules.dep is untrusted and may chain further than Python's stack goes."""
        if start in seen:
            return
        seen.add(start)
        # modules.dep lists a module's dependencies so that loading them last-to-first works.
        stack = [(start, iter(reversed(deps.get(start, []))))]
        while stack:
            path, pending = stack[-1]
            for dep in pending:
                if dep not in seen:
                    seen.add(dep)
                    stack.append((dep, iter(reversed(deps.get(dep, [])))))
                    break
            else:
                stack.pop()
                order.append(path)

    for name in names:
        key = name.replace("-", "_")
        if key in builtin or key not in by_name:
            continue
        visit(by_name[key])
    return order


MiB = 1 << 20
# A real module is a few MiB and the initramfs's drivers with their dependencies a few more; an image's
# modules are image data, inflated only this far (a 61 KB .ko.xz inflated to 400 MiB otherwise).
MAX_MODULE = 64 * MiB
MAX_MODULES_TOTAL = 128 * MiB


def _inflate(name: str, data: bytes, most: int) -> bytes:
    """At most *most* bytes of the module file *name* holding *data*, decompressed as its suffix says."""
    if name.endswith(".ko.xz"):
        xz = lzma.LZMADecompressor()
        out = xz.decompress(data, max_length=most)
        if not xz.eof and len(out) < most:
            raise ValueError("the xz data ends before its end-of-stream marker")
        return out
    if name.endswith(".ko.gz"):
        gz = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip framing
        out = gz.decompress(data, most)
        if not gz.eof and len(out) < most:
            raise ValueError("the gzip data ends before its trailer")
        return out
    if name.endswith(".ko.zst"):
        import zstandard

        chunks: list[bytes] = []
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)) as reader:
            while most > 0 and (chunk := reader.read(min(most, MiB))):
                chunks.append(chunk)
                most -= len(chunk)
        return b"".join(chunks)
    return data[:most]


def _module_bytes(modules_dir: Path, rel: str, limit: int = MAX_MODULE) -> bytes:
    """The module *rel* uncompressed; more than *limit* bytes of it, or a corrupt file, is an ImageError."""
    path = modules_dir / rel
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)  # the image's were found no larger than the cap; a plain .ko is its bytes
        out = _inflate(path.name, data, limit + 1)
    except (lzma.LZMAError, zlib.error, EOFError, ValueError) as exc:
        raise ImageError(f"the kernel module {rel} cannot be decompressed: {exc}") from exc
    except OSError as exc:
        raise ToolError(f"cannot read the kernel module {rel}: {exc}") from exc
    except Exception as exc:  # zstandard.ZstdError has no useful base class
        if type(exc).__name__ != "ZstdError":
            raise
        raise ImageError(f"the kernel module {rel} cannot be decompressed: {exc}") from exc
    if len(out) > limit:
        raise ImageError(f"the kernel module {rel} inflates to more than {limit // MiB} MiB; "
                         "a real module is a few MiB")
    return out


# -------------------------------------------------------------------------------------- cpio --


@dataclass(frozen=True)
class CpioEntry:
    """One member of a newc archive; *mode* includes the file type bits."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def write_cpio(entries: Iterable[CpioEntry]) -> bytes:
    """A deterministic newc ("070701") archive: inode numbers in order, mtime 0, owner root."""
    out = bytearray()
    all_entries = [*entries, CpioEntry("TRAILER!!!", 0)]
    for ino, entry in enumerate(all_entries, start=1):
        name = entry.name.encode() + b"\0"
        is_trailer = entry.name == "TRAILER!!!"
        fields = (
            0 if is_trailer else ino,
            entry.mode,
            0,  # uid
            0,  # gid
            2 if stat.S_ISDIR(entry.mode) else 1,
            0,  # mtime
            len(entry.data),
            0,  # devmajor
            0,  # devminor
            entry.rdev[0],
            entry.rdev[1],
            len(name),
            0,  # check
        )
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        out += header + name + _pad4(len(header) + len(name))
        out += entry.data + _pad4(len(entry.data))
    return bytes(out)


def read_cpio(data: bytes) -> list[CpioEntry]:
    """Parse a newc archive (for tests and inspection); stops at the trailer."""
    entries: list[CpioEntry] = []
    pos = 0
    while True:
        if data[pos : pos + 6] != b"070701":
            raise ValueError(f"not a newc cpio header at offset {pos}")
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = fields[1], fields[6], fields[9], fields[10], fields[11]
        name_start = pos + 110
        name = data[name_start : name_start + namesize - 1].decode()
        pos = name_start + namesize
        pos += -pos % 4
        body = data[pos : pos + size]
        pos += size
        pos += -pos % 4
        if name == "TRAILER!!!":
            return entries
        entries.append(CpioEntry(name, mode, body, (rmaj, rmin)))


def _resolve_modules_dir(kernel_release: str, modules_root: Path) -> Path:
    for candidate in (modules_root, modules_root / kernel_release):
        if (candidate / "modules.dep").is_file():
            return candidate
    raise ToolError(
        f"no modules.dep for kernel {kernel_release} under {modules_root}: "
        "the initramfs needs the kernel's modules (run depmod, or install the kernel's modules)"
    )


def build_initramfs(kernel_release: str, modules_root: Path, init: Path) -> bytes:
    """A gzip-compressed newc initramfs: the init (stage 1 and 2), the disk and NIC drivers, ``/load.list``.

    *modules_root* is the kernel's module directory (``/lib/modules/<release>``, or
    ``/lib/modules`` to which *kernel_release* is appended). The output is byte-for-byte
    reproducible from the same inputs.
    """
    modules_dir = _resolve_modules_dir(kernel_release, modules_root)
    entries = [
        CpioEntry("dev", stat.S_IFDIR | 0o755),
        # The kernel opens /dev/console for init before any devtmpfs is mounted.
        CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        CpioEntry("proc", stat.S_IFDIR | 0o555),
        CpioEntry("sys", stat.S_IFDIR | 0o555),
        CpioEntry("newroot", stat.S_IFDIR | 0o755),
        CpioEntry("modules", stat.S_IFDIR | 0o755),
        CpioEntry("init", stat.S_IFREG | 0o755, init.read_bytes()),
        CpioEntry(INITRAMFS_MARKER, stat.S_IFREG | 0o644),
    ]
    load_list: list[str] = []
    total = 0
    for rel in needed_modules(modules_dir, BOOT_MODULES):
        name = f"modules/{_module_name(rel)}.ko"
        data = _module_bytes(modules_dir, rel)
        total += len(data)
        if total > MAX_MODULES_TOTAL:
            raise ImageError(f"the kernel modules the initramfs needs (up to {rel}) inflate to more than "
                             f"{MAX_MODULES_TOTAL // MiB} MiB together; real ones take a few MiB")
        entries.append(CpioEntry(name, stat.S_IFREG | 0o644, data))
        load_list.append("/" + name)
    entries.append(CpioEntry("load.list", stat.S_IFREG | 0o644, "".join(f"{m}\n" for m in load_list).encode()))
    return gzip.compress(write_cpio(entries), compresslevel=9, mtime=0)
