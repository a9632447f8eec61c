"""Bad input through the real console script: one line on stderr, `imgconv: error: ...`, exit code 2 or more, no
traceback, nothing on stdout. The layouts are built broken on purpose in a temporary directory."""

from __future__ import annotations

import functools
import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from converter.errors import ImgconvError, LayerError
from converter.oci.blobs import drain
from converter.oci.flatten import LayerInput, flatten
from converter.oci.reference import parse_reference
from converter.oci.tarutil import open_output
from converter.oci.transport import open_image
from tests.builders import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    Layout,
    config_json,
    d,
    docker_archive,
    f,
    layer,
    sha256,
    sym,
    tar_file,
)
from tests.cli import Ran, assert_one_line_error

Run = Callable[..., Ran]

GOOD_LAYER = layer(d("etc"), f("etc/hostname", "box\n"), f("bin/app", b"\x7fELF" * 1000, 0o755))


# Inspect's refusals exit 2 or more (tests/cli.py's contract, any failure code); returns the one line.
one_line_error = functools.partial(assert_one_line_error, code=None)


def inspect(imgconv: Run, ref: str, *extra: str) -> Ran:
    return imgconv("inspect", "--quiet", ref, *extra)


def test_a_good_image_inspects(imgconv: Run, oci: Layout) -> None:
    # The baseline the failures below are variations of.
    oci.image([GOOD_LAYER])
    result = inspect(imgconv, f"oci:{oci.root}", "--json")
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["layers"][0]["diff_id"] == sha256(GOOD_LAYER) and report["platform"] == "linux/amd64"


# -- references --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("ref", "needles"), [
    ("busybox", ["'busybox'", "oci:DIR"]),
    ("", ["empty"]),
    ("docker://Busybox", ["Busybox"]),
    ("docker://busybox:bad tag", ["bad tag"]),
    ("docker://busybox@sha256:123", ["sha256:123"]),
    ("oci:", ["oci:"]),
    ("ftp:x", ["'ftp'"]),
    ("docker-archive:x.tar:@nope", [":@N"]),
    ("oci:\x1b[31mred:tag", ["\\x1b"]),  # control characters come out escaped, not interpreted
])
def test_malformed_reference(imgconv: Run, ref: str, needles: list[str]) -> None:
    one_line_error(inspect(imgconv, ref), *needles)


def test_malformed_platform(imgconv: Run, oci: Layout) -> None:
    oci.image([GOOD_LAYER])
    one_line_error(inspect(imgconv, f"oci:{oci.root}", "--platform", "linux"), "OS/ARCH")


# -- OCI layouts ---------------------------------------------------------------------------------------------------


def test_missing_oci_directory(imgconv: Run, tmp_path: Path) -> None:
    one_line_error(inspect(imgconv, f"oci:{tmp_path / 'nowhere'}"), "nowhere", "does not exist")


def test_oci_directory_without_oci_layout(imgconv: Run, tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    one_line_error(inspect(imgconv, f"oci:{tmp_path / 'plain'}"), "not an OCI image layout", "oci-layout")


def test_oci_layout_that_is_a_file(imgconv: Run, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    one_line_error(inspect(imgconv, f"oci:{tmp_path / 'file'}"), "not a directory")


def test_oci_layout_without_index(imgconv: Run, oci: Layout) -> None:
    one_line_error(inspect(imgconv, f"oci:{oci.root}"), "index.json")


def test_index_json_that_is_a_directory(imgconv: Run, oci: Layout) -> None:
    (oci.root / "index.json").mkdir()
    one_line_error(inspect(imgconv, f"oci:{oci.root}"), "index.json")


def test_unknown_tag(imgconv: Run, oci: Layout) -> None:
    desc = oci.manifest([GOOD_LAYER])
    oci.index({**desc, "annotations": {"org.opencontainers.image.ref.name": "v1"}})
    one_line_error(inspect(imgconv, f"oci:{oci.root}:v2"), "'v2'", "v1")


def test_wrong_blob_digest(imgconv: Run, oci: Layout) -> None:
    manifest = oci.image([GOOD_LAYER])
    layer_desc = json.loads(oci.blob_path(manifest).read_bytes())["layers"][0]
    path = oci.blob_path(layer_desc)
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # same size, different bytes
    path.write_bytes(bytes(blob))
    one_line_error(inspect(imgconv, f"oci:{oci.root}"), layer_desc["digest"], "has digest")


def test_truncated_blob(imgconv: Run, oci: Layout) -> None:
    manifest = oci.image([GOOD_LAYER])
    layer_desc = json.loads(oci.blob_path(manifest).read_bytes())["layers"][0]
    path = oci.blob_path(layer_desc)
    path.write_bytes(path.read_bytes()[:-10])
    one_line_error(inspect(imgconv, f"oci:{oci.root}"), "truncated", f"of {layer_desc['size']} bytes")


def test_missing_blob(imgconv: Run, oci: Layout) -> None:
    manifest = oci.image([GOOD_LAYER])
    config = json.loads(oci.blob_path(manifest).read_bytes())["config"]
    oci.blob_path(config).unlink()
    one_line_error(inspect(imgconv, f"oci:{oci.root}"), config["digest"], "missing")


def test_unknown_layer_media_type(imgconv: Run, oci: Layout) -> None:
    oci.image([GOOD_LAYER], layer_type="application/vnd.example.layer.v1+squashfs")
    one_line_error(inspect(imgconv, f"oci:{oci.root}"), "layer 0", "application/vnd.example.layer.v1+squashfs")


def test_no_matching_platform(imgconv: Run, oci: Layout) -> None:
    arm = oci.manifest([GOOD_LAYER], arch="arm64")
    s390 = oci.manifest([layer(f("x"))], arch="s390x")
    index = oci.blob(json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {**arm, "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
        {**s390, "platform": {"os": "linux", "architecture": "s390x"}},
    ]}).encode(), OCI_INDEX)
    oci.index(index)
    message = one_line_error(inspect(imgconv, f"oci:{oci.root}", "--platform", "linux/amd64"), "linux/amd64")
    assert "linux/arm64, linux/s390x" in message


def test_diff_ids_do_not_match_the_layers(imgconv: Run, oci: Layout) -> None:
    oci.image([GOOD_LAYER], config=config_json([sha256(b"something else")]))
    one_line_error(inspect(imgconv, f"oci:{oci.root}"), "diff_id")


@pytest.mark.parametrize("raw", [b"{", b"[]", b"\xff\xfe", b"[" * 50_000], ids=["cut", "array", "binary", "deep"])
def test_malformed_index_json(imgconv: Run, oci: Layout, raw: bytes) -> None:
    oci.index(raw=raw)
    one_line_error(inspect(imgconv, f"oci:{oci.root}"), "index.json")


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b'{"schemaVersion": 2, "config": 7, "layers": []}',
                                 b'{"mediaType": ["x"]}'], ids=["text", "array", "config", "media-type"])
def test_malformed_manifest(imgconv: Run, oci: Layout, raw: bytes) -> None:
    oci.index(oci.blob(raw, OCI_MANIFEST))
    one_line_error(inspect(imgconv, f"oci:{oci.root}"), "manifest sha256:")


@pytest.mark.parametrize("raw", [b"{", b"null", b'{"rootfs": {"diff_ids": "sha256:x"}}',
                                 b'{"rootfs": {"diff_ids": []}, "config": "x"}'],
                         ids=["cut", "null", "diff-ids", "config-section"])
def test_malformed_config(imgconv: Run, oci: Layout, raw: bytes) -> None:
    config = oci.blob(raw, OCI_CONFIG)
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": []}
    oci.index(oci.blob(json.dumps(manifest).encode(), OCI_MANIFEST))
    one_line_error(inspect(imgconv, f"oci:{oci.root}"), "config sha256:")


def test_bad_entrypoint_type_in_config(imgconv: Run, oci: Layout) -> None:
    oci.image([GOOD_LAYER], config=config_json([sha256(GOOD_LAYER)], config={"Entrypoint": [1, 2]}))
    one_line_error(inspect(imgconv, f"oci:{oci.root}"), "Entrypoint")


# -- docker archives -----------------------------------------------------------------------------------------------


def test_missing_archive(imgconv: Run, tmp_path: Path) -> None:
    one_line_error(inspect(imgconv, f"docker-archive:{tmp_path / 'none.tar'}"), "none.tar", "does not exist")


def test_archive_that_is_not_a_tar(imgconv: Run, tmp_path: Path) -> None:
    (tmp_path / "x.tar").write_bytes(b"this is not a tar" * 100)
    one_line_error(inspect(imgconv, f"docker-archive:{tmp_path / 'x.tar'}"), "x.tar")


@pytest.mark.parametrize("manifest", [b"{", b"[]", b"[" * 50_000, b'[{"Config": 1}]'],
                         ids=["cut", "empty", "deep", "config"])
def test_archive_with_malformed_manifest_json(imgconv: Run, tmp_path: Path, manifest: bytes) -> None:
    path = tar_file(tmp_path / "img.tar", {"manifest.json": manifest})
    one_line_error(inspect(imgconv, f"docker-archive:{path}"), "img.tar")


# -- layers that escape the root -------------------------------------------------------------------------------------
#
# `inspect` verifies every blob but does not read the tars; the command that flattens (`oci-to-qcow2`) does it while
# streaming into its libguestfs appliance, which is integration-test territory. Here the same library path runs
# without the appliance: reference -> open_image -> verified layers -> flatten.


def flatten_reference(ref: str) -> None:
    with open_image(parse_reference(ref)) as image:
        layers = [LayerInput(item.what, functools.partial(image.open_layer, item)) for item in image.layers]
        with open_output(io.BytesIO()) as out:
            flatten(layers, out)


@pytest.mark.parametrize(("layers", "needles"), [
    ([layer(f("../etc/passwd", "root::0:0::/:/bin/sh\n"))], ["'../etc/passwd'", "'..'"]),
    ([layer(f("/etc/passwd", "x"))], ["'/etc/passwd'", "absolute"]),
    ([layer(d("etc"), f("etc/../../x"))], ["'etc/../../x'"]),
    ([layer(sym("etc", "/")), layer(f("etc/passwd", "x"))], ["'etc'", "symlink"]),
    ([layer(sym("etc", "/"), f("etc/passwd", "x"))], ["'etc/passwd'", "symlink"]),
], ids=["dotdot", "absolute", "inner-dotdot", "older-symlink", "same-layer-symlink"])
def test_escaping_layer_paths_are_refused(oci: Layout, layers: list[bytes], needles: list[str]) -> None:
    oci.image(layers)
    with pytest.raises(LayerError) as caught:
        flatten_reference(f"oci:{oci.root}")
    message = str(caught.value)
    assert "\n" not in message and caught.value.exit_code >= 2
    assert re.match(r"layer \d \(sha256:[0-9a-f]{64}\)", message), message
    for needle in needles:
        assert needle in message


def test_inspect_does_not_read_layer_contents(imgconv: Run, oci: Layout) -> None:
    # Documented behaviour: inspect checks blobs (digest, size, diff_id), not what the tars hold.
    oci.image([layer(f("../etc/passwd", "x"))])
    assert inspect(imgconv, f"oci:{oci.root}").code == 0


ARCHIVE_CONFIG = config_json([sha256(GOOD_LAYER)])
ARCHIVE_CONFIG_NAME = sha256(ARCHIVE_CONFIG).removeprefix("sha256:") + ".json"


@pytest.mark.parametrize("links", [
    {"l1/layer.tar": "../missing/layer.tar"},
    {"l1/layer.tar": "../l2/layer.tar", "l2/layer.tar": "../l1/layer.tar"},
    {"l1/layer.tar": "layer.tar"},
], ids=["dangling", "cycle", "self"])
def test_archive_with_broken_layer_symlinks(imgconv: Run, tmp_path: Path, links: dict[str, str]) -> None:
    path = docker_archive(tmp_path / "img.tar",
                          [{"Config": ARCHIVE_CONFIG_NAME, "RepoTags": ["x:1"], "Layers": ["l1/layer.tar"]}],
                          {ARCHIVE_CONFIG_NAME: ARCHIVE_CONFIG}, symlinks=links)
    one_line_error(inspect(imgconv, f"docker-archive:{path}"), "layer.tar")


def test_archive_with_a_good_layer_symlink(imgconv: Run, tmp_path: Path) -> None:
    path = docker_archive(tmp_path / "img.tar",
                          [{"Config": ARCHIVE_CONFIG_NAME, "RepoTags": ["x:1"], "Layers": ["l2/layer.tar"]}],
                          {ARCHIVE_CONFIG_NAME: ARCHIVE_CONFIG, "l1/layer.tar": GOOD_LAYER},
                          symlinks={"l2/layer.tar": "../l1/layer.tar"})
    result = inspect(imgconv, f"docker-archive:{path}", "--json")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["layers"][0]["diff_id"] == sha256(GOOD_LAYER)


def test_archive_with_a_symlinked_config_cycle(imgconv: Run, tmp_path: Path) -> None:
    path = docker_archive(tmp_path / "img.tar", [{"Config": "a.json", "RepoTags": ["x:1"], "Layers": []}],
                          symlinks={"a.json": "b.json", "b.json": "a.json"})
    one_line_error(inspect(imgconv, f"docker-archive:{path}"), "json")


def test_archive_with_malformed_tags_still_finds_the_named_image(imgconv: Run, tmp_path: Path) -> None:
    path = docker_archive(tmp_path / "img.tar", [
        {"Config": ARCHIVE_CONFIG_NAME, "RepoTags": ["Not A Tag", "UPPER:1", "x:1"], "Layers": ["l/layer.tar"]}],
        {ARCHIVE_CONFIG_NAME: ARCHIVE_CONFIG, "l/layer.tar": GOOD_LAYER})
    result = inspect(imgconv, f"docker-archive:{path}:x:1")
    assert result.code == 0, result.stderr
    one_line_error(inspect(imgconv, f"docker-archive:{path}:y:1"), "y:1", "x:1")


@pytest.mark.parametrize("config", [b'{"rootfs": ["x"]}', b'{"rootfs": {"diff_ids": "abc"}}', b"[]"],
                         ids=["rootfs-list", "diff-ids-string", "array"])
def test_archive_with_malformed_config(imgconv: Run, tmp_path: Path, config: bytes) -> None:
    name = sha256(config).removeprefix("sha256:") + ".json"
    path = docker_archive(tmp_path / "img.tar", [{"Config": name, "Layers": ["l/layer.tar"]}],
                          {name: config, "l/layer.tar": GOOD_LAYER})
    one_line_error(inspect(imgconv, f"docker-archive:{path}"), "config")


_ARCHIVE_NAMES = st.sampled_from([ARCHIVE_CONFIG_NAME, "l/layer.tar", "missing", "", "manifest.json", "l",
                                  "./l/layer.tar", "/l/layer.tar", "../x"])
_ARCHIVE_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | _ARCHIVE_NAMES | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["Config", "Layers", "RepoTags", "x"]), inner, max_size=3),
    max_leaves=10)
_ARCHIVE_ENTRIES = st.fixed_dictionaries({}, optional={"Config": _ARCHIVE_VALUES, "Layers": _ARCHIVE_VALUES,
                                                       "RepoTags": _ARCHIVE_VALUES})


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(manifest=st.lists(_ARCHIVE_ENTRIES, max_size=3) | _ARCHIVE_VALUES,
       position=st.sampled_from([None, 0, 1, 5]), name=st.sampled_from([None, "x:1", "busybox"]))
def test_any_archive_manifest_opens_or_gives_one_line_error(tmp_path: Path, manifest: Any, position: int | None,
                                                            name: str | None) -> None:
    path = docker_archive(tmp_path / "fuzz.tar", manifest, {ARCHIVE_CONFIG_NAME: ARCHIVE_CONFIG,
                                                            "l/layer.tar": GOOD_LAYER}, dirs=["l"])
    ref = f"docker-archive:{path}" + (f":{name}" if name else f":@{position}" if position is not None else "")
    try:
        with open_image(parse_reference(ref)) as image:
            for layer in image.layers:  # as `imgconv inspect` verifies every blob
                with image.open_layer(layer) as stream:
                    drain(stream)
    except ImgconvError as exc:
        assert "\n" not in str(exc)
