"""`imgconv oci-to-qcow2` (and `imgconv boot`) against hostile and unusual images, through the real CLI.

Every image is an OCI layout written here with handcrafted layers (tests/builders/) around a static
busybox. What a user must get is either a disk whose boot behaves like `docker run` (the expected outputs
below were taken from the test world's dockerd), or one `imgconv: error: ...` line on stderr, an exit code
>= 2, no traceback and nothing at OUTPUT; and never a file written on the host outside the disk.

    reserved      /.imgconv in the image (a symlink to /etc): refused;
    valid         what an image may legally hold and Docker runs: /tmp a file, /run and /var/run a symlink
                  loop, /dev/null a regular file, /lost+found a file, a WorkingDir through a symlink, Env
                  without '=' and with duplicate keys, a USER found only in a passwd full of garbage lines,
                  names with a newline, invalid UTF-8 and 255 bytes, a lone UTF-16 surrogate in Env (read as
                  U+FFFD, as Docker reads it);
    runtime-dirs  /dev a symlink to /etc and /proc a regular file: refused (the VM mounts its own there);
    into-reserved /lib a symlink to /.imgconv/init, where the host kernel's modules would go: refused;
    bogus-kernel  a /boot/vmlinuz-* that is not a kernel, with its /lib/modules directory: the host's boots;
    modules-dep   the image's own kernel with a modules.dep naming files outside the modules tree: refused,
                  nothing written on the host.

Conversions run as jobs, two at a time (tests/integration/judge.py: Jobs), started for the selected tests;
cheap cases run in the test thread: what is refused before the appliance starts, and the disk size planned
for 90 000 small files and for a zstd layer of zeros (their real conversions only fail after a minute of
writing under TCG).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import subprocess
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from converter.boot.kernel import host_kernel
from converter.disk.plan import MiB, content_bytes, plan_disk
from converter.errors import UsageError
from converter.oci.reference import parse_reference
from converter.oci.transport import open_image
from tests.builders import OCI_CONFIG, OCI_LAYER_ZSTD, OCI_MANIFEST, Layout, Spec, config_json, d, f, layer, sym
from tests.cli import Ran, assert_one_line_error, imgconv
from tests.integration.judge import Jobs, layer_tar, listing, manifest_of, selected

pytestmark = [pytest.mark.appliance]

BUSYBOX = Path("/bin/busybox")
BOOT_TIMEOUT = 90


# -- building images -----------------------------------------------------------------------------------------


def busybox() -> list[Spec]:
    if not BUSYBOX.is_file():
        pytest.skip(f"{BUSYBOX} is missing (busybox-static)")
    return [d("bin"), f("bin/busybox", BUSYBOX.read_bytes(), 0o755), sym("bin/sh", "busybox")]


def oci_layout(root: Path, layers: Sequence[bytes], container: dict[str, Any]) -> str:
    """An OCI layout holding one image of *layers* (gzip) with *container* as its config section."""
    diff_ids = ["sha256:" + hashlib.sha256(tar).hexdigest() for tar in layers]
    Layout(root).image(layers, config=config_json(diff_ids, config=container))
    return f"oci:{root}"


@dataclass
class Converted:
    output: Path  # alone in its directory, so that anything left beside it shows
    ran: Ran
    boot: Ran | None = None
    back: Ran | None = None  # vm-to-oci of the disk, where a test needs it

    @property
    def sidecar(self) -> dict[str, Any]:
        return dict(json.loads(self.output.with_name(self.output.name + ".json").read_text()))


def convert(root: Path, layers: Sequence[bytes], container: dict[str, Any], *flags: str,
            boot: bool = False, output_name: str = "out/disk.qcow2") -> Converted:
    """*output_name* is given to imgconv relative to *root* (its working directory), as a user types it."""
    ref = oci_layout(root / "layout", layers, container)
    output = root / output_name
    output.parent.mkdir()
    done = Converted(output, imgconv("oci-to-qcow2", "--quiet", *flags, ref, output_name, cwd=root))
    if boot and done.ran.code == 0:
        done.boot = imgconv("boot", "--timeout", str(BOOT_TIMEOUT), str(output), timeout=BOOT_TIMEOUT + 120)
    return done


def refused(done: Converted) -> str:
    """The one error line of a refused conversion, which left nothing at (or beside) OUTPUT."""
    line = assert_one_line_error(done.ran, code=None)
    assert listing(done.output.parent) == [], done.ran.describe()
    return line


def booted_like_docker(done: Converted, stdout: str, code: int) -> None:
    assert done.ran.code == 0, done.ran.describe()
    assert done.boot is not None
    assert (done.boot.stdout, done.boot.code) == (stdout, code), done.boot.describe()


# -- the images ----------------------------------------------------------------------------------------------------

VALID_PASSWD = (b"garbage line without colons\n::::::\nroot:x:0:0:root:/root:/bin/sh\n\xff\xfe:junk\n"
                b"app:x:4000:4001:App:/home/app:/bin/sh\n")  # no /etc/group at all
NOT_UTF8 = b"bad\xff".decode("utf-8", "surrogateescape")
LONG = "n" * 255
VALID_NAMES = ("new\nline", NOT_UTF8, LONG, "sp ace", "-dash", "tab\there")
VALID_SCRIPT = rf"""
echo "uid=$(id -u 2>/dev/null) gid=$(id -g 2>/dev/null) groups=$(id -G 2>/dev/null) HOME=$HOME"
echo "cwd=$(pwd -P)"
busybox tr '\0' '\n' < /proc/1/environ
for p in /tmp /run /var/run /dev/null /lost+found; do busybox stat -c '%n %F' "$p"; done
echo "run -> $(busybox readlink /run), var/run -> $(busybox readlink /var/run)"
busybox ls /names | busybox wc -l
[ -f "$(printf '/names/new\nline')" ] && echo newline-name
[ -f "$(printf '/names/bad\377')" ] && echo not-utf8-name
[ -f /names/{LONG} ] && echo long-name
exit 42
"""
VALID_EXPECTED = """uid=4000 gid=4001 groups=4001 HOME=/home/app
cwd=/data/sub
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
DUP=2
EMPTY=
SPACE=a b
SURROGATE=a\ufffdb
HOME=/home/app
/tmp regular file
/run symbolic link
/var/run symbolic link
/dev/null character special file
/lost+found regular file
run -> var/run, var/run -> ../run
6
newline-name
not-utf8-name
long-name
"""


def valid_image(root: Path) -> Converted:
    specs = [*busybox(), d("etc"), f("etc/passwd", VALID_PASSWD), f("tmp", "a file where /tmp should be"),
             sym("run", "var/run"), d("var"), sym("var/run", "../run"), d("dev"), f("dev/null", "not a device"),
             f("lost+found", "a file"), d("data"), sym("wd", "/data"), d("names"),
             *(f(f"names/{name}", name.encode("utf-8", "surrogateescape")) for name in VALID_NAMES),
             f("xattrs", "x", pax={f"SCHILY.xattr.{name}": value for name, value in XATTRS.items()})]
    container = {"Entrypoint": ["/bin/busybox", "sh", "-c", VALID_SCRIPT, "argv0"],
                 "Env": ["NOEQ", "DUP=1", "HOSTNAME", "DUP=2", "EMPTY=", "SPACE=a b", "SURROGATE=a\ud800b"],
                 "WorkingDir": "/wd/sub", "User": "app"}
    done = convert(root, [layer(*specs)], container, "--no-kernel-modules", boot=True)
    if done.ran.code == 0:
        done.back = imgconv("vm-to-oci", "--quiet", str(done.output), f"oci:{root / 'back'}:t")
    return done


# GNU tar (the appliance's) escapes "%" in xattr names; a literal "%25" must survive both ways too.
XATTRS = {"user.per%cent": "v1", "user.literal%25": "v2", "user.plain": "v3"}


def reserved_image(root: Path) -> Converted:
    return convert(root, [layer(*busybox(), sym(".imgconv", "/etc"))], {"Entrypoint": ["/bin/sh", "-c", "echo hi"]},
                   "--no-kernel-modules")


def runtime_dirs_image(root: Path) -> Converted:
    specs = [*busybox(), d("etc"), f("etc/keep", "kept\n"), sym("dev", "/etc"), f("proc", "not a directory")]
    script = "cat /etc/keep; [ -d /proc/self ] && echo proc; [ -c /dev/null ] && echo dev; exit 3"
    return convert(root, [layer(*specs)], {"Entrypoint": ["/bin/sh", "-c", script]}, "--no-kernel-modules",
                   boot=True)


def into_reserved_image(root: Path) -> Converted:
    # The host kernel's modules (asked for) go to /lib/modules/RELEASE, resolved through the image's symlinks.
    specs = [*busybox(), sym("lib", "/.imgconv/init")]
    return convert(root, [layer(*specs)], {"Entrypoint": ["/bin/sh", "-c", "echo ok; exit 3"]}, "--kernel-modules",
                   boot=True)


BOGUS_RELEASE = "9.9.9-bogus"


def bogus_kernel_image(root: Path) -> Converted:
    specs = [*busybox(), d("boot"), f(f"boot/vmlinuz-{BOGUS_RELEASE}", "not a kernel"), d("lib"), d("lib/modules"),
             d(f"lib/modules/{BOGUS_RELEASE}"), f(f"lib/modules/{BOGUS_RELEASE}/modules.dep", "")]
    # and a relative OUTPUT whose directory and name qemu-img would read as protocols if it were given them
    done = convert(root, [layer(*specs)], {"Entrypoint": ["/bin/sh", "-c", "echo hi; exit 5"]},
                   "--no-kernel-modules", output_name="vm:1/disk:2.qcow2")
    if done.ran.code == 0:
        done.boot = imgconv("boot", "--timeout", str(BOOT_TIMEOUT), str(done.output), timeout=BOOT_TIMEOUT + 120)
    return done


def host_kernel_or_skip() -> tuple[str, bytes]:
    try:
        kernel = host_kernel()
    except UsageError as exc:
        pytest.skip(str(exc))
    assert kernel.host_path is not None
    return kernel.release, kernel.host_path.read_bytes()


def escapes(root: Path) -> tuple[Path, Path]:
    """Host paths an image's modules.dep names: absolute, and through `..` from imgconv's scratch directory."""
    return root / "outside-abs" / "pwned", root / "outside-rel" / "pwned"


def modules_dep_image(root: Path) -> Converted:
    release, vmlinuz = host_kernel_or_skip()
    absolute, relative = escapes(root)
    mods = f"lib/modules/{release}"
    up = "../" * 24  # from /tmp/imgconv-*/modules/RELEASE on the host and /lib/modules/RELEASE in the guest: "/"
    dep = f"kernel/virtio_blk.ko: {up}{str(relative).lstrip('/')} {absolute}\n"
    specs = [*busybox(), d("boot"), f(f"boot/vmlinuz-{release}", vmlinuz), d("lib"), d("lib/modules"), d(mods),
             f(f"{mods}/modules.dep", dep), d(f"{mods}/kernel"), f(f"{mods}/kernel/virtio_blk.ko", "not a module"),
             # what the guest holds at those names (the guest resolves them in the image)
             f(f"{mods}/{str(absolute).lstrip('/')}", "from the image\n"),
             f(str(relative).lstrip("/"), "from the image\n")]
    return convert(root, [layer(*specs)], {"Entrypoint": ["/bin/sh", "-c", "echo hi"]})


JOBS = {
    # longest first: two run at a time
    "into-reserved": into_reserved_image,
    "runtime-dirs": runtime_dirs_image,
    "valid": valid_image,
    "modules-dep": modules_dep_image,
    "bogus-kernel": bogus_kernel_image,
    "reserved": reserved_image,
}
USES = {  # test -> the job it needs
    "test_reserved_path_is_refused": "reserved",
    "test_refusal_after_the_stream_started_is_one_line": "reserved",
    "test_hostile_but_valid_image_boots_like_docker_run": "valid",
    "test_xattr_names_with_percent_signs_survive_the_round_trip": "valid",
    "test_runtime_dirs_that_are_not_directories": "runtime-dirs",
    "test_image_symlink_into_the_reserved_directory": "into-reserved",
    "test_image_file_named_like_a_kernel_is_not_booted": "bogus-kernel",
    "test_image_modules_dep_cannot_write_on_the_host": "modules-dep",
}


@pytest.fixture(scope="module")
def jobs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jobs]:
    root = tmp_path_factory.mktemp("hostile-images")
    pool = Jobs()
    for key, build in JOBS.items():
        (root / key).mkdir()
        pool.define(key, build, root / key)
    wanted = {USES[test] for test, _ in selected(request) if test in USES}
    pool.start(*(key for key in JOBS if key in wanted))
    try:
        yield pool
    finally:
        pool.close()
        shutil.rmtree(root, ignore_errors=True)


# -- refused during the conversion -------------------------------------------------------------------------------


def test_reserved_path_is_refused(jobs: Jobs) -> None:
    done: Converted = jobs["reserved"]
    assert done.ran.code == 2, done.ran.describe()
    first = done.ran.stderr.splitlines()[0]
    assert first.startswith("imgconv: error: ") and "/.imgconv" in first, done.ran.describe()
    assert listing(done.output.parent) == []


def test_refusal_after_the_stream_started_is_one_line(jobs: Jobs) -> None:
    assert "/.imgconv" in refused(jobs["reserved"])


# -- converted and booted: what the workload sees ----------------------------------------------------------------


@pytest.mark.boot
def test_hostile_but_valid_image_boots_like_docker_run(jobs: Jobs) -> None:
    booted_like_docker(jobs["valid"], VALID_EXPECTED, 42)


def test_xattr_names_with_percent_signs_survive_the_round_trip(jobs: Jobs) -> None:
    done: Converted = jobs["valid"]
    assert done.back is not None and done.back.code == 0, (done.back or done.ran).describe()
    layout = done.output.parent.parent / "back"
    _digest, manifest, _config = manifest_of(layout, "t")
    data = layer_tar(layout, manifest["layers"][-1])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        info = tar.getmember("xattrs")
    found = {k.removeprefix("SCHILY.xattr."): v for k, v in info.pax_headers.items() if k.startswith("SCHILY.xattr.")}
    assert found == XATTRS


def test_runtime_dirs_that_are_not_directories(jobs: Jobs) -> None:
    """/dev a symlink (to /etc) and /proc a file: the VM mounts devtmpfs and proc there, which through the link
    would land on /etc. Docker hides them under its init layer's directories; imgconv refuses, saying why."""
    line = refused(jobs["runtime-dirs"])
    assert "/dev is a symbolic link" in line and "'/etc'" in line, line


def test_image_symlink_into_the_reserved_directory(jobs: Jobs) -> None:
    """/lib -> /.imgconv/init: the host kernel's modules would land on imgconv's own init. Refused."""
    line = refused(jobs["into-reserved"])
    assert "/lib/modules/" in line and "/.imgconv" in line, line


@pytest.mark.boot
def test_image_file_named_like_a_kernel_is_not_booted(jobs: Jobs) -> None:
    """A /boot/vmlinuz-* that is no bzImage is not a kernel: the host's boots the image instead."""
    done: Converted = jobs["bogus-kernel"]
    assert done.ran.code == 0, done.ran.describe()
    assert done.sidecar["kernel"]["origin"] == "host", done.sidecar["kernel"]
    booted_like_docker(done, "hi\n", 5)


def test_image_modules_dep_cannot_write_on_the_host(jobs: Jobs) -> None:
    """The image's own kernel, with a modules.dep naming an absolute path and a ../ path: refused, and
    nothing written on the host outside imgconv's scratch directory."""
    done: Converted = jobs["modules-dep"]
    root = done.output.parent.parent
    written = [str(p) for p in escapes(root) if p.parent.exists()]
    assert written == [], f"the image wrote on the host: {written}"
    line = refused(done)
    assert "modules.dep" in line and "outside its modules tree" in line, line


# -- the disk's size -----------------------------------------------------------------------------------------------


MANY_FILES = 90_000


def test_disk_planned_for_many_small_files_has_an_inode_for_each(tmp_path: Path) -> None:
    """Checked on the plan, formatted here as build.py formats it (`mke2fs -n` writes nothing): a real
    conversion of 80 000 empty files ran out of inodes when they were sized by bytes, after a minute of TCG."""
    if shutil.which("mke2fs") is None:
        pytest.skip("mke2fs is missing (e2fsprogs)")
    specs = [*busybox(), d("many"), *(d(f"many/{i:03d}") for i in range(100)),
             *(f(f"many/{i % 100:03d}/{i:06d}") for i in range(MANY_FILES))]
    ref = oci_layout(tmp_path / "layout", [layer(*specs)], {"Entrypoint": ["/bin/sh", "-c", "echo hi"]})
    with open_image(parse_reference(ref)) as image:
        plan = plan_disk(content_bytes(image), None, 64 * MiB, 64)  # no --size; extra: as convert()
    partition = tmp_path / "partition.img"  # part_disk starts the partition at 1 MiB
    with partition.open("wb") as out:
        out.truncate(plan.size - MiB)
    made = subprocess.run(["mke2fs", "-n", "-F", "-t", "ext4", "-b", "4096", "-N", str(plan.inodes), "-m", "1",
                           str(partition)], capture_output=True, text=True, check=True)
    found = re.search(r"and (\d+) inodes", made.stdout)
    assert found, made.stdout
    inodes, entries = int(found.group(1)), len(specs) + 1  # lost+found
    assert inodes >= entries, f"{plan.size >> 20} MiB planned: {inodes} inodes for {entries}"
    # and the inode tables take at most an eighth of the disk: the bytes keep their room
    assert inodes * 256 <= plan.size // 8, plan


class _Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


class _HashingWriter:
    def __init__(self, inner: Any) -> None:
        self.inner, self.hash, self.size = inner, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        self.inner.write(data)
        return len(data)


def test_disk_planned_for_a_zstd_layer_holds_its_content(tmp_path: Path) -> None:
    """Checked on the plan (the real conversion fails the same way after ~65 s of writing zeros)."""
    import zstandard

    compressed = io.BytesIO()
    writer = zstandard.ZstdCompressor().stream_writer(compressed, closefd=False)  # streamed: no content size
    counted = _HashingWriter(writer)
    with tarfile.open(fileobj=counted, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for info, data in busybox():
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
        zeros = tarfile.TarInfo("var/lib/preallocated")
        zeros.size = 1 << 30
        tar.addfile(zeros, _Zeros(zeros.size))
    writer.flush(zstandard.FLUSH_FRAME)
    layout = Layout(tmp_path / "layout")
    config = layout.blob(config_json(["sha256:" + counted.hash.hexdigest()]), OCI_CONFIG)
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config,
                "layers": [layout.blob(compressed.getvalue(), OCI_LAYER_ZSTD)]}
    layout.index(layout.blob(json.dumps(manifest).encode(), OCI_MANIFEST))
    with open_image(parse_reference(f"oci:{tmp_path / 'layout'}")) as image:
        planned = plan_disk(content_bytes(image), None, 0, 0).size
    assert planned >= counted.size, f"{planned >> 20} MiB planned for {counted.size >> 20} MiB of files"
