"""Hostile images and disks against the conversion steps, without an appliance (issue 9, items 7-9, 11, 12, 14).

Each test builds the hostile input and asserts the safe outcome: a one-line error, or a bounded result.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import tracemalloc
from contextlib import ExitStack
from pathlib import Path

import pytest

from converter.boot.extlinux import boot_entry, extlinux_conf
from converter.boot.kernel import MAX_KERNEL_CANDIDATES, image_kernel
from converter.disk.export import _read_again
from converter.disk.plan import content_bytes
from converter.disk.rootfs import ApplianceSink
from converter.errors import DiskError, ImageError
from converter.oci.config import ConfigFile, ConfigOverrides, HistoryEntry
from converter.oci.model import canonical_json
from converter.oci.reference import parse_reference
from converter.oci.transport import open_image
from converter.oci.tree import Signature
from converter.pipeline import Context
from converter.progress import NullMonitor
from tests.builders import OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST, Layout, config_json, f, layer, sha256
from tests.cli import assert_one_line_error, imgconv


def _bzimage(release: str) -> bytes:
    """The first 64 KiB of a bzImage whose setup header names *release*."""
    head = bytearray(0x10000)
    head[0x202:0x206] = b"HdrS"
    head[0x20E:0x210] = (0x1000 - 0x200).to_bytes(2, "little")
    head[0x1000:0x1000 + len(release)] = release.encode()
    return bytes(head)


def test_many_files_named_like_kernels_cost_no_memory() -> None:
    """Item 7: 4000 files named like kernels kept 64 KiB each (250 MiB); now only a release of the first few."""
    sink = ApplianceSink(tarfile.open(fileobj=open(os.devnull, "wb"), mode="w|", format=tarfile.PAX_FORMAT))
    head = _bzimage("6.1.0-9-amd64")
    tracemalloc.start()
    try:
        for i in range(4000):
            info = tarfile.TarInfo(f"boot/vmlinuz-{i}")
            info.size = len(head)
            sink.addfile(info, io.BytesIO(head))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak >> 20} MiB"
    assert len(sink.kernel_releases()) == MAX_KERNEL_CANDIDATES
    assert set(sink.kernel_releases().values()) == {"6.1.0-9-amd64"}


def test_files_below_a_kernel_named_directory_are_not_kernels() -> None:
    sink = ApplianceSink(tarfile.open(fileobj=open(os.devnull, "wb"), mode="w|", format=tarfile.PAX_FORMAT))
    head = _bzimage("6.1.0-9-amd64")
    info = tarfile.TarInfo("boot/vmlinuz-x/f0")
    info.size = len(head)
    sink.addfile(info, io.BytesIO(head))
    assert sink.kernel_releases() == {}


def _empty_gzip_member_after(data: bytes) -> bytes:
    """Valid gzip (Docker reads it): the layer, then an empty member whose trailer says ISIZE 0."""
    return gzip.compress(data, mtime=0) + gzip.compress(b"", mtime=0)


def test_a_gzip_trailer_that_lies_does_not_size_the_disk(tmp_path: Path) -> None:
    """Item 8: an empty gzip member after each of 100 tiny layers read as 4 GiB each (a 763 GiB disk)."""
    layout = Layout(tmp_path / "layout")
    tars = [layer(f(f"file{i}", b"x" * 100)) for i in range(100)]
    descs = [layout.blob(_empty_gzip_member_after(tar), OCI_LAYER_GZIP) for tar in tars]
    config = layout.blob(config_json([sha256(tar) for tar in tars]), OCI_CONFIG)
    manifest = layout.blob(
        b'{"schemaVersion":2,"mediaType":"%s","config":%s,"layers":[%s]}' % (
            OCI_MANIFEST.encode(), _desc(config), b",".join(_desc(d) for d in descs)), OCI_MANIFEST)
    layout.index(manifest)
    with open_image(parse_reference(f"oci:{layout.root}")) as image:
        planned = content_bytes(image)
    actual = sum(len(tar) for tar in tars)
    assert actual <= planned <= 2 * actual, (planned, actual)


def _desc(desc: dict[str, object]) -> bytes:
    return b'{"mediaType":"%s","digest":"%s","size":%d}' % (str(desc["mediaType"]).encode(),
                                                            str(desc["digest"]).encode(), int(str(desc["size"])))


def test_a_kernel_name_cannot_add_boot_parameters() -> None:
    """Item 9: `LINUX /boot/vmlinuz-x imgconv.x=1 panic=1` would boot with the extra parameters."""
    hostile = "boot/vmlinuz-x imgconv.x=1 panic=1"
    kinds = {"boot": "dir", hostile: "nondir", "lib": "dir", "lib/modules": "dir", "lib/modules/6.1.0-9": "dir"}
    kernel = image_kernel(kinds, {}, {hostile: "6.1.0-9"})
    assert kernel is not None and kernel.guest_path == hostile  # chosen: so the boot entry must refuse it
    with pytest.raises(ImageError, match="whitespace or control characters"):
        boot_entry(hostile, ".imgconv/boot/initramfs-6.1.0-9.img", "0-1-2-3-4")
    for bad in ("boot/vmlinuz-x\nAPPEND init=/bin/sh", "boot/vmlinuz-\tx", "boot/vmlinuz-x\x7f"):
        with pytest.raises(ImageError):
            boot_entry(bad, "initrd", "0-1-2-3-4")
    entry = boot_entry("boot/vmlinuz-6.1.0-9", ".imgconv/boot/initramfs-6.1.0-9.img", "0-1-2-3-4")
    assert f"LINUX {entry.kernel}\n" in extlinux_conf(entry) and entry.kernel == "/boot/vmlinuz-6.1.0-9"


def test_an_existing_sidecar_is_not_replaced_without_force(tmp_path: Path) -> None:
    """Item 11: OUTPUT=package replaced package.json."""
    (tmp_path / "package.json").write_text('{"name": "mine"}')
    ran = imgconv("oci-to-qcow2", f"oci:{tmp_path / 'nothing'}", "package", cwd=tmp_path)
    assert_one_line_error(ran, "package.json already exists", code=2)
    assert (tmp_path / "package.json").read_text() == '{"name": "mine"}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["package.json"]


@pytest.mark.parametrize(("doc", "needle"), [
    ({"history": "abc"}, "history must be a list"),
    ({"history": [1, 2]}, "history must be a list"),
    ({"config": {"Labels": ["a", "b"]}}, "Labels must be an object"),
    ({"config": {"Labels": {"a": 1}}}, "Labels values must be strings"),
    ({"config": {"Env": "PATH=/bin"}}, "Env must be a list of strings"),
    ({"config": {"Cmd": [1]}}, "Cmd must be a list of strings"),
    ({"config": []}, "config must be an object"),
])
def test_a_hostile_base_config_is_a_one_line_image_error(doc: dict[str, object], needle: str) -> None:
    """Item 12: `vm-to-oci --base` with such a base config gave a traceback."""
    with pytest.raises(ImageError, match=needle):
        ConfigFile.from_doc(doc, "the base image's config")


def test_only_json_is_written() -> None:
    """Item 12: a config number 1e999 was written back as Infinity, which is not JSON."""
    config = ConfigFile.parse(b'{"architecture":"amd64","os":"linux","config":{"Healthcheck":{"Interval":1e999}}}',
                              "config")
    changed = config.with_overrides(ConfigOverrides(cmd=("/bin/true",))).with_layers(
        ["sha256:" + "0" * 64], HistoryEntry("1970-01-01T00:00:00Z", "imgconv", "test"), replaces_history=True)
    with pytest.raises(ImageError, match="number JSON cannot represent"):
        changed.to_json()
    with pytest.raises(ImageError):
        canonical_json({"n": float("nan")})


def test_base_rereads_never_reach_the_appliances_dev() -> None:
    """Item 14: libguestfs' download does not look up /dev/* in the guest; a deferred dev/zero read the
    appliance's own /dev/zero. The refusal comes before the appliance is touched (this context has none)."""
    with ExitStack() as stack:
        ctx = Context(NullMonitor(), stack)
        for path in ("dev/zero", "dev/console", "dev"):
            with pytest.raises(DiskError, match="nothing under /dev can be read again"), \
                    _read_again(ctx, Path("/nonexistent"), path, Signature(b"0", 0o644, 0, 0, 0, "", "", (0, 0), ())):
                pass
