"""Hostile docker archives (issue 9 items 3 and 4), through the real console script: each is refused with one
`imgconv: error:` line and exit 2, or read correctly, in bounded time, memory and scratch space.

Every run is limited by prlimit: no file imgconv writes may pass 64 MiB (scratch space included: the reader that
inflated a compressed archive whole wrote 1 GiB for 32 KiB of zstd), and a run that would loop is killed by the
timeout (tarfile's CVE-2025-8194 loop on a negative member size never ends).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import zstandard

from converter.oci.archive import MAX_MEMBERS, MAX_RATIO
from tests.cli import Ran, assert_one_line_error, imgconv

SCRATCH_LIMIT = 64 << 20
MEMORY_LIMIT_KIB = 400 << 10
ZEROS = b"\0" * (1 << 20)


def inspect(path: Path, *extra: str) -> Ran:
    ran = imgconv("inspect", "--quiet", f"docker-archive:{path}", *extra,
                  prefix=("prlimit", f"--fsize={SCRATCH_LIMIT}", "--"), timeout=60, watch_memory=True)
    assert ran.peak_rss_kib is None or ran.peak_rss_kib < MEMORY_LIMIT_KIB, ran.describe()
    return ran


def member(name: str, data: bytes = b"", **pax: str) -> bytes:
    """One tar member (header, data, padding); *pax* records are written as given (a negative size, say)."""
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    info.pax_headers = dict(pax)
    return info.tobuf(tarfile.PAX_FORMAT) + data + b"\0" * (-len(data) % 512)


def symlink(name: str, target: str) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info.tobuf(tarfile.PAX_FORMAT)


END = b"\0" * 1024


def zstd_stream(parts: Iterator[bytes]) -> bytes:
    out = io.BytesIO()
    writer = zstandard.ZstdCompressor().stream_writer(out, closefd=False)
    for part in parts:
        writer.write(part)
    writer.flush(zstandard.FLUSH_FRAME)
    return out.getvalue()


def compressed(data: bytes, compression: str) -> bytes:
    return gzip.compress(data, mtime=0) if compression == "gzip" else zstd_stream(iter([data]))


def image_members(*, manifest_first: bool) -> dict[str, bytes]:
    """A legacy `docker save` archive of one image, with the bookkeeping files docker writes beside it."""
    layer_io = io.BytesIO()
    with tarfile.open(fileobj=layer_io, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("etc/hostname")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"box\n"))
    layer = layer_io.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
                         "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    layer_dir = "a" * 64
    manifest = json.dumps([{"Config": config_name, "RepoTags": ["box:1"],
                            "Layers": [f"{layer_dir}/layer.tar"]}]).encode()
    members = {config_name: config, f"{layer_dir}/layer.tar": layer, f"{layer_dir}/json": b"{}",
               f"{layer_dir}/VERSION": b"1.0", "repositories": b"{}"}
    return {"manifest.json": manifest, **members} if manifest_first else {**members, "manifest.json": manifest}


def tar_of(members: Mapping[str, bytes]) -> bytes:
    return b"".join(member(name, data) for name, data in members.items()) + END


# -- item 3: compressed archives are read as a stream, and only what a manifest could name is kept ----------------


def test_a_compressed_tar_of_zeros_is_an_empty_archive_found_at_once(tmp_path: Path) -> None:
    bomb = tmp_path / "zeros.tar.zst"
    bomb.write_bytes(zstd_stream(ZEROS for _ in range(1024)))  # 1 GiB of zeros in about 32 KiB
    assert bomb.stat().st_size < 64 << 10
    ran = inspect(bomb)
    assert_one_line_error(ran, "zeros.tar.zst", "no manifest.json")
    assert ran.seconds < 20, ran.describe()


def test_a_member_declaring_more_than_the_archive_can_hold_is_refused_at_its_header(tmp_path: Path) -> None:
    # Named like a blob, so it would be kept: its 1 GiB of zeros must not reach the scratch space.
    info = tarfile.TarInfo("blobs/sha256/" + "b" * 64)
    info.size = 1 << 30
    header = info.tobuf(tarfile.PAX_FORMAT)
    bomb = tmp_path / "blob.tar.zst"
    bomb.write_bytes(zstd_stream(iter([header, *(ZEROS for _ in range(1024)), END])))
    assert_one_line_error(inspect(bomb), "blob.tar.zst", "declares 1073741824 bytes", f"{MAX_RATIO} times")


def test_members_inflating_past_the_ratio_are_refused(tmp_path: Path) -> None:
    # Many members, each small and plausible, that add up to far more than the compressed size allows. (Only zstd
    # can do this: deflate never inflates more than the ratio, so no gzip archive is ever refused by it.)
    bomb = tmp_path / "many.tar.zst"
    bomb.write_bytes(zstd_stream(member(f"layer{i}.tar", ZEROS) for i in range(200)))
    assert_one_line_error(inspect(bomb), bomb.name, f"{MAX_RATIO} times")


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
@pytest.mark.parametrize("manifest_first", [False, True], ids=["manifest-last", "manifest-first"])
def test_a_compressed_archive_reads_as_the_plain_one(tmp_path: Path, compression: str, manifest_first: bool) -> None:
    members = image_members(manifest_first=manifest_first)
    plain = tmp_path / "image.tar"
    plain.write_bytes(tar_of(members))
    packed = tmp_path / f"image.tar.{compression}"
    packed.write_bytes(compressed(plain.read_bytes(), compression))
    expected = inspect(plain, "--json").ok().json
    got = inspect(packed, "--json").ok().json
    assert {**got, "source": None} == {**expected, "source": None}
    assert got["config"]["Cmd"] == ["/bin/sh"] and len(got["layers"]) == 1


def test_a_compressed_archive_keeps_links_to_the_blobs_it_needs(tmp_path: Path) -> None:
    # Docker 25+ archives name layers through symlinks into blobs/sha256 (and dedup identical layers so).
    members = image_members(manifest_first=False)
    layer = members.pop("a" * 64 + "/layer.tar")
    blob = "blobs/sha256/" + hashlib.sha256(layer).hexdigest()
    data = member(blob, layer) + symlink("a" * 64 + "/layer.tar", f"../{blob}") + tar_of(members)
    packed = tmp_path / "linked.tar.gz"
    packed.write_bytes(gzip.compress(data, mtime=0))
    assert inspect(packed, "--json").ok().json["layers"][0]["size"] == len(layer)


def test_a_truncated_compressed_archive_is_a_one_line_error(tmp_path: Path) -> None:
    data = gzip.compress(tar_of(image_members(manifest_first=False)), mtime=0)
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(data[: len(data) // 2])
    assert_one_line_error(inspect(cut), "cut.tar.gz")


def test_an_archive_of_too_many_members_is_refused(tmp_path: Path) -> None:
    many = tmp_path / "many.tar.zst"
    many.write_bytes(zstd_stream(member(f"{i}/json") for i in range(MAX_MEMBERS + 1)))
    assert_one_line_error(inspect(many), "many.tar.zst", f"more than {MAX_MEMBERS} members")


def test_an_archive_that_is_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "image.tar"
    os.mkfifo(fifo)
    assert_one_line_error(inspect(fifo), "image.tar", "FIFO")


# -- item 4: a negative member size (CPython tarfile CVE-2025-8194) is refused, not looped on ---------------------


def _base256_negative_header(name: str, size: int) -> bytes:
    """A ustar header whose size field holds *size* (negative) in GNU base-256, which tarfile decodes as such."""
    block = bytearray(tarfile.TarInfo(name).tobuf(tarfile.USTAR_FORMAT))
    block[124:136] = b"\xff" + (256**11 + size).to_bytes(11, "big")
    block[148:156] = b" " * 8
    block[148:156] = f"{sum(block):06o}".encode() + b"\0 "
    return bytes(block)


def negative_size_archive(kind: str) -> bytes:
    """manifest.json (one block of data), then a member whose negative size leads tarfile back to offset 0."""
    first = member("manifest.json", b"[]")
    # pax: its header at 1024, its record block at 1536, the member's header at 2048, its data at 2560.
    # base256: the member's header at 1024, its data at 1536.
    evil = member("evil", b"", size=str(-2560)) if kind == "pax" else _base256_negative_header("evil", -1536)
    return first + evil + END


@pytest.mark.parametrize("compression", ["none", "gzip"])
@pytest.mark.parametrize("kind", ["pax", "base256"])
def test_a_negative_member_size_is_refused(tmp_path: Path, kind: str, compression: str) -> None:
    data = negative_size_archive(kind)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:  # the input is what it claims: tarfile sees it
        assert [m.size for m in (tar.next(), tar.next())] == [2, -2560 if kind == "pax" else -1536]
    path = tmp_path / ("evil.tar" + (".gz" if compression == "gzip" else ""))
    path.write_bytes(compressed(data, compression) if compression != "none" else data)
    ran = inspect(path)
    assert_one_line_error(ran, path.name, "'evil'", "negative size")
    assert ran.seconds < 20, ran.describe()


def test_an_oversized_extended_header_is_refused_before_it_is_read(tmp_path: Path) -> None:
    record = "x" * (2 << 20)
    path = tmp_path / "pax.tar"
    path.write_bytes(member("manifest.json", b"[]", comment=record) + END)
    assert_one_line_error(inspect(path), "pax.tar", "PAX header of", "at most 1 MiB")



# -- the JSON documents of an archive: parsed whole, so bounded by the archive's size and plausible for theirs -------


def test_a_config_of_millions_of_tiny_values_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    """8 MiB of `{},` in a plain archive would take about 200 MiB once parsed (400 MiB of RSS is the limit here)."""
    members = image_members(manifest_first=False)
    manifest = json.loads(members.pop("manifest.json"))
    config = b'{"history": [' + b"{}," * ((8 << 20) // 3) + b'{}]}'
    members.pop(manifest[0]["Config"])
    manifest[0]["Config"] = "config.json"
    members["config.json"] = config
    members["manifest.json"] = json.dumps(manifest).encode()
    path = tmp_path / "image.tar"
    path.write_bytes(tar_of(members))
    assert_one_line_error(inspect(path), "image.tar", "config.json holds implausibly many JSON values")


def test_a_manifest_larger_than_its_compressed_archive_is_refused_unread(tmp_path: Path) -> None:
    members = image_members(manifest_first=True)
    entries = json.loads(members["manifest.json"])
    members["manifest.json"] = json.dumps(entries + [{"RepoTags": ["x" * 100]}] * 2000).encode()  # 250 KB
    path = tmp_path / "image.tar.zst"
    path.write_bytes(zstd_stream(iter([tar_of(members)])))
    assert path.stat().st_size < 64 << 10
    assert_one_line_error(inspect(path), "image.tar.zst", "manifest.json is implausibly large")
