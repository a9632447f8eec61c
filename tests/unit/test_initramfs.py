"""Run spec encoding, docker's environment rules, module selection and the initramfs archive."""

from __future__ import annotations

import gzip
import lzma
import platform
import re
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from converter.boot.initramfs import (
    DEFAULT_PATH,
    CpioEntry,
    InitSpec,
    build_initramfs,
    decode_spec,
    docker_env,
    encode_spec,
    needed_modules,
    read_cpio,
    write_cpio,
)
from converter.errors import ImageError

HOSTILE = (
    "a b",
    "'single'",
    '"double"',
    "$(echo injected)",
    "`echo injected`",
    "; echo injected",
    "& echo injected",
    "| cat",
    "line1\nline2",
    "",
    "*",
    "back\\slash",
    "tab\there",
    "\udcff\udcfe not utf-8",
    "ünïcødé",
    "=",
    "version",
    "1",
)


# ---------------------------------------------------------------------------------- spec --


def test_spec_round_trip_hostile_strings() -> None:
    spec = InitSpec(
        argv=HOSTILE,
        env=tuple(f"K{i}={s}" for i, s in enumerate(HOSTILE)),
        cwd="/work dir/$(x)",
        user="1000:staff",
        hostname="host",
    )
    assert decode_spec(encode_spec(spec)) == spec


def test_spec_bytes_are_the_documented_format() -> None:
    spec = InitSpec(argv=("sh", "-c", "echo"), env=("A=1",), cwd="", user="u", hostname="h")
    assert encode_spec(spec) == (
        b"version\x001\x00hostname\x00h\x00cwd\x00\x00user\x00u\x00"
        b"arg\x00sh\x00arg\x00-c\x00arg\x00echo\x00env\x00A=1\x00"
    )
    assert "\udcff".encode("utf-8", "surrogateescape") in encode_spec(InitSpec(("\udcff",), ()))


def test_spec_decoder_ignores_unknown_keys_and_checks_the_rest() -> None:
    data = b"version\x001\x00future\x00thing\x00arg\x00true\x00"
    assert decode_spec(data) == InitSpec(("true",), ())
    for bad in (b"", b"version\x001", b"version\x001\x00arg\x00", b"version\x002\x00", b"arg\x00x\x00"):
        with pytest.raises(ValueError):
            decode_spec(bad)


def test_spec_rejects_nul() -> None:
    with pytest.raises(ImageError, match="NUL"):
        encode_spec(InitSpec(("a\0b",), ()))


@given(
    argv=st.lists(st.text(alphabet=st.characters(blacklist_characters="\0", blacklist_categories=["Cs"]))),
    env=st.lists(st.text(alphabet=st.characters(blacklist_characters="\0", blacklist_categories=["Cs"]))),
    words=st.lists(
        st.text(alphabet=st.characters(blacklist_characters="\0", blacklist_categories=["Cs"])), min_size=3, max_size=3
    ),
)
def test_spec_round_trip_property(argv: list[str], env: list[str], words: list[str]) -> None:
    spec = InitSpec(tuple(argv), tuple(env), *words)
    assert decode_spec(encode_spec(spec)) == spec


# ----------------------------------------------------------------------------------- env --


def test_docker_env_defaults() -> None:
    assert docker_env([], "abc123") == (f"PATH={DEFAULT_PATH}", "HOSTNAME=abc123")


def test_docker_env_replaces_in_place_and_appends_in_order() -> None:
    env = docker_env(["B=2", "PATH=/bin", "A=1", "HOSTNAME=mine"], "h")
    assert env == ("PATH=/bin", "HOSTNAME=mine", "B=2", "A=1")


def test_docker_env_unset_without_equals() -> None:
    # Without "=": removes PATH/HOSTNAME; for any other key docker just drops the entry.
    assert docker_env(["PATH", "X", "Y=1"], "h") == ("HOSTNAME=h", "Y=1")
    # ... and a later PATH= puts it back where it was.
    assert docker_env(["PATH", "PATH=/x"], "h") == ("PATH=/x", "HOSTNAME=h")


def test_docker_env_duplicates_keep_the_last_value_at_its_last_place() -> None:
    # docker appends both; runc keeps only the last, where it is.
    assert docker_env(["A=1", "B=2", "A=3"], "h") == (f"PATH={DEFAULT_PATH}", "HOSTNAME=h", "B=2", "A=3")


def test_docker_env_values_are_opaque() -> None:
    values = [f"V{i}={s}" for i, s in enumerate(HOSTILE)] + ["EMPTY=", "EQ=a=b"]
    assert docker_env(values, "h")[2:] == tuple(values)


def test_docker_env_rejects_what_runc_rejects() -> None:
    with pytest.raises(ImageError, match="empty name"):
        docker_env(["=x"], "h")
    with pytest.raises(ImageError, match="NUL"):
        docker_env(["A=\0"], "h")


# ------------------------------------------------------------------------------- modules --


def installed_modules() -> Path:
    """A kernel module tree on this machine (the running kernel's may not be installed)."""
    trees = sorted(p.parent for p in Path("/lib/modules").glob("*/modules.dep"))
    running = Path("/lib/modules") / platform.release()
    return running if running in trees else (trees[-1] if trees else running)


HOST_MODULES = installed_modules()


def fake_modules(root: Path) -> Path:
    (root / "kernel/a").mkdir(parents=True)
    (root / "modules.dep").write_text(
        "kernel/a/virtio.ko.xz: kernel/a/virtio_ring.ko.zst\n"
        "kernel/a/virtio_ring.ko.zst:\n"
        "kernel/a/virtio_pci.ko: kernel/a/virtio-pci-modern-dev.ko.gz"
        " kernel/a/virtio.ko.xz kernel/a/virtio_ring.ko.zst\n"
        "kernel/a/virtio-pci-modern-dev.ko.gz:\n"
        "kernel/a/virtio_blk.ko: kernel/a/virtio.ko.xz kernel/a/virtio_ring.ko.zst\n"
        "kernel/a/unrelated.ko:\n"
    )
    (root / "modules.builtin").write_text("kernel/drivers/nvme/host/nvme.ko\n")
    (root / "kernel/a/virtio.ko.xz").write_bytes(lzma.compress(b"virtio"))
    (root / "kernel/a/virtio_ring.ko.zst").write_bytes(zstandard.ZstdCompressor().compress(b"virtio_ring"))
    (root / "kernel/a/virtio_pci.ko").write_bytes(b"virtio_pci")
    (root / "kernel/a/virtio-pci-modern-dev.ko.gz").write_bytes(gzip.compress(b"modern"))
    (root / "kernel/a/virtio_blk.ko").write_bytes(b"virtio_blk")
    return root


def test_needed_modules_order_and_skips(tmp_path: Path) -> None:
    root = fake_modules(tmp_path / "6.1.0-test")
    assert needed_modules(root, ["virtio_pci", "virtio_blk", "nvme", "ahci"]) == [
        "kernel/a/virtio_ring.ko.zst",
        "kernel/a/virtio.ko.xz",
        "kernel/a/virtio-pci-modern-dev.ko.gz",
        "kernel/a/virtio_pci.ko",
        "kernel/a/virtio_blk.ko",
    ]


@pytest.mark.skipif(not (HOST_MODULES / "modules.dep").exists(), reason="no modules for the running kernel")
def test_needed_modules_against_the_real_kernel() -> None:
    mods = needed_modules(HOST_MODULES)
    names = [Path(m).name.split(".ko")[0].replace("-", "_") for m in mods]
    assert len(names) == len(set(names))
    deps = {
        line.split(":")[0]: line.split(":")[1].split()
        for line in (HOST_MODULES / "modules.dep").read_text().splitlines()
    }
    for i, module in enumerate(mods):  # every dependency is loaded before its user
        for dep in deps[module]:
            assert dep in mods[:i], f"{dep} must come before {module}"
    builtin = {
        Path(line).name.split(".ko")[0].replace("-", "_")
        for line in (HOST_MODULES / "modules.builtin").read_text().split()
    }
    assert not builtin & set(names)
    assert "virtio_blk" in names or "virtio_blk" in builtin


CLOUD_MODULES = sorted(p.parent for p in Path("/lib/modules").glob("6.1.0-*-cloud-amd64/modules.dep"))


@pytest.mark.skipif(not CLOUD_MODULES, reason="Debian 12 cloud kernel (linux-image-cloud-amd64) not installed")
def test_needed_modules_debian_cloud_kernel() -> None:
    mods = needed_modules(CLOUD_MODULES[-1])
    assert [Path(m).stem for m in mods] == [
        "virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
        "virtio_blk", "scsi_common", "scsi_mod", "virtio_scsi", "sd_mod", "libata", "ata_piix",
    ]  # fmt: skip


# ---------------------------------------------------------------------------------- cpio --


def test_cpio_round_trip_and_determinism() -> None:
    entries = [
        CpioEntry("dir", stat.S_IFDIR | 0o755),
        CpioEntry("dir/file", stat.S_IFREG | 0o644, b"x" * 5),
        CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
    ]
    data = write_cpio(entries)
    assert data == write_cpio(entries)
    assert read_cpio(data) == entries
    assert len(data) % 4 == 0


def test_build_initramfs(tmp_path: Path) -> None:
    root = fake_modules(tmp_path / "6.1.0-test")
    init = tmp_path / "init"
    init.write_bytes(b"\x7fELF fake init")
    image = build_initramfs("6.1.0-test", tmp_path, init)  # /lib/modules-style root works too
    assert image == build_initramfs("6.1.0-test", root, init)
    members = {e.name: e for e in read_cpio(gzip.decompress(image))}
    assert members["init"].data == b"\x7fELF fake init"
    assert members["init"].mode == stat.S_IFREG | 0o755
    assert "imgconv-initramfs" in members
    assert members["dev/console"].rdev == (5, 1)
    for directory in ("dev", "proc", "sys", "newroot"):
        assert stat.S_ISDIR(members[directory].mode)
    load = members["load.list"].data.decode().splitlines()
    assert load == [
        "/modules/virtio_ring.ko",
        "/modules/virtio.ko",
        "/modules/virtio_pci_modern_dev.ko",
        "/modules/virtio_pci.ko",
        "/modules/virtio_blk.ko",
    ]
    assert members["modules/virtio_ring.ko"].data == b"virtio_ring"  # zstd, xz, gzip: all unpacked
    assert members["modules/virtio.ko"].data == b"virtio"
    assert members["modules/virtio_pci_modern_dev.ko"].data == b"modern"


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio tool not installed")
def test_initramfs_parses_with_cpio_tool(tmp_path: Path) -> None:
    fake_modules(tmp_path / "r")
    init = tmp_path / "init"
    init.write_bytes(b"init")
    archive = gzip.decompress(build_initramfs("r", tmp_path / "r", init))
    listing = subprocess.run(["cpio", "-it", "--quiet"], input=archive, capture_output=True, check=True)
    assert listing.stdout.decode().split() == [e.name for e in read_cpio(archive)]


@pytest.mark.skipif(not (HOST_MODULES / "modules.dep").exists(), reason="no modules for the running kernel")
def test_real_initramfs_is_small(tmp_path: Path) -> None:
    init = tmp_path / "init"
    init.write_bytes(b"\0" * 100_000)
    assert len(build_initramfs(HOST_MODULES.name, HOST_MODULES, init)) < 1_000_000


# -------------------------------------------------------------------- bounded inflation (issue 9 item 6) --

MiB = 1 << 20


def _one_module_tree(root: Path, name: str, data: bytes) -> Path:
    (root / "kernel/a").mkdir(parents=True)
    (root / "modules.dep").write_text(f"kernel/a/{name}:\n")
    (root / "kernel/a" / name).write_bytes(data)
    return root


def _xz_zeros(size: int) -> bytes:
    packer = lzma.LZMACompressor(preset=0)
    return b"".join([*(packer.compress(b"\0" * MiB) for _ in range(size // MiB)), packer.flush()])


def _build(root: Path, tmp_path: Path) -> bytes:
    init = tmp_path / "init"
    init.write_bytes(b"init")
    return build_initramfs(root.name, root, init)


def test_a_module_that_inflates_without_bound_is_refused_in_bounds(tmp_path: Path) -> None:
    """The reproduction: a 61 KB virtio_blk.ko.xz that inflates to 400 MiB. Refused, having held at most twice the
    cap (the decompressor's last resize)."""
    import tracemalloc

    packed = _xz_zeros(400 * MiB)
    assert len(packed) < 100_000
    root = _one_module_tree(tmp_path / "6.1.0-bomb", "virtio_blk.ko.xz", packed)
    tracemalloc.start()
    try:
        with pytest.raises(ImageError) as caught:
            _build(root, tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(caught.value)
    assert "kernel/a/virtio_blk.ko.xz" in message and "64 MiB" in message and "\n" not in message
    assert peak < 140 * MiB, f"{peak / MiB:.0f} MiB held"


@pytest.mark.parametrize("name, pack", [
    ("virtio_blk.ko.gz", lambda data: gzip.compress(data, compresslevel=1)),
    ("virtio_blk.ko.zst", lambda data: zstandard.ZstdCompressor(level=1).compress(data)),
    ("virtio_blk.ko", lambda data: data),
], ids=["gzip", "zstd", "plain"])
def test_every_module_format_is_bounded(tmp_path: Path, name: str, pack: Any) -> None:
    root = _one_module_tree(tmp_path / "6.1.0-big", name, pack(b"\0" * (64 * MiB + 1)))
    with pytest.raises(ImageError, match=f"kernel/a/{re.escape(name)} inflates to more than 64 MiB"):
        _build(root, tmp_path)


def test_a_module_of_exactly_the_cap_is_kept(tmp_path: Path) -> None:
    root = _one_module_tree(tmp_path / "6.1.0-cap", "virtio_blk.ko.zst",
                            zstandard.ZstdCompressor(level=1).compress(b"\0" * (64 * MiB)))
    members = {e.name: e for e in read_cpio(gzip.decompress(_build(root, tmp_path)))}
    assert len(members["modules/virtio_blk.ko"].data) == 64 * MiB


def test_modules_are_bounded_together(tmp_path: Path) -> None:
    """Each under the cap, but a modules.dep chain of many of them: the initramfs holds them all in memory."""
    root = tmp_path / "6.1.0-many"
    (root / "kernel/a").mkdir(parents=True)
    packed = _xz_zeros(40 * MiB)
    chain = [f"kernel/a/m{i}.ko.xz" for i in range(5)]
    lines = [f"kernel/a/virtio_blk.ko.xz: {' '.join(chain)}"] + [f"{m}:" for m in chain]
    (root / "modules.dep").write_text("\n".join(lines) + "\n")
    for module in [*chain, "kernel/a/virtio_blk.ko.xz"]:
        (root / module).write_bytes(packed)
    with pytest.raises(ImageError, match="more than 128 MiB together"):
        _build(root, tmp_path)


@pytest.mark.parametrize("name, data", [
    ("virtio_blk.ko.xz", lzma.compress(b"module")[:-8]),
    ("virtio_blk.ko.xz", b"not xz at all"),
    ("virtio_blk.ko.gz", gzip.compress(b"module")[:-4]),
    ("virtio_blk.ko.gz", b"\x1f\x8bnot gzip"),
    ("virtio_blk.ko.zst", b"(\xb5/\xfdnot zstd"),
], ids=["xz-truncated", "xz-garbage", "gzip-truncated", "gzip-garbage", "zstd-garbage"])
def test_a_corrupt_module_is_a_one_line_image_error(tmp_path: Path, name: str, data: bytes) -> None:
    root = _one_module_tree(tmp_path / "6.1.0-bad", name, data)
    with pytest.raises(ImageError, match=f"kernel module kernel/a/{re.escape(name)} cannot be decompressed") as caught:
        _build(root, tmp_path)
    assert "\n" not in str(caught.value)
