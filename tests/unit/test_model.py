"""The image model: manifests, indexes, configs and platforms, parsed from untrusted JSON.

Whatever the bytes, parsing either gives a model object or raises a one-line ImageError that says what is
wrong and where; the index/manifest/config chain is followed and checked the same way for every transport.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from converter.errors import EXIT_USAGE, ImageError
from converter.oci.layout import open_layout
from converter.oci.model import (
    LAYER_COMPRESSION,
    Descriptor,
    ImageConfig,
    Index,
    Manifest,
    MediaType,
    Platform,
)
from tests.builders import OCI_CONFIG, OCI_INDEX, OCI_MANIFEST, Layout, config_json, layer, sha256

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64


def desc(media_type: str = MediaType.OCI_LAYER_GZIP, digest: str = D1, size: int = 10, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest, "size": size, **extra}


def manifest(layers: list[dict[str, Any]] | None = None, media_type: str | None = MediaType.OCI_MANIFEST,
             config: Any = None, **extra: Any) -> bytes:
    doc: dict[str, Any] = {"schemaVersion": 2,
                           "config": config if config is not None else desc(MediaType.OCI_CONFIG, D2, 100),
                           "layers": layers if layers is not None else [desc()]}
    if media_type is not None:
        doc["mediaType"] = media_type
    doc.update(extra)
    return json.dumps(doc).encode()


def index(entries: list[dict[str, Any]], media_type: str | None = MediaType.OCI_INDEX) -> bytes:
    doc: dict[str, Any] = {"schemaVersion": 2, "manifests": entries}
    if media_type is not None:
        doc["mediaType"] = media_type
    return json.dumps(doc).encode()


def image_error(call: Any, *args: Any, **kwargs: Any) -> str:
    """Run *call*, expecting a one-line ImageError; return its message."""
    with pytest.raises(ImageError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert message and "\n" not in message
    assert caught.value.exit_code == EXIT_USAGE
    return message


# -- manifests -----------------------------------------------------------------------------------------------


def test_oci_manifest() -> None:
    raw = manifest([desc(), desc(MediaType.OCI_LAYER_ZSTD, D3, 5)])
    parsed = Manifest.parse(raw)
    assert parsed.media_type == MediaType.OCI_MANIFEST
    assert parsed.config == Descriptor(MediaType.OCI_CONFIG, D2, 100)
    assert [layer.digest for layer in parsed.layers] == [D1, D3]
    assert parsed.raw == raw and parsed.digest == sha256(raw)


def test_docker_schema2_manifest() -> None:
    raw = manifest([desc(MediaType.DOCKER_LAYER_GZIP), desc(MediaType.DOCKER_FOREIGN_GZIP, D3, 7,
                                                             urls=["https://example.com/x"])],
                   MediaType.DOCKER_MANIFEST, config=desc(MediaType.DOCKER_CONFIG, D2, 100))
    parsed = Manifest.parse(raw)
    assert parsed.media_type == MediaType.DOCKER_MANIFEST
    assert parsed.layers[1].urls == ("https://example.com/x",)


@pytest.mark.parametrize("declared", [None, MediaType.DOCKER_MANIFEST, MediaType.OCI_MANIFEST])
def test_missing_media_type_is_taken_from_the_descriptor(declared: str | None) -> None:
    parsed = Manifest.parse(manifest(media_type=None), media_type=declared)
    assert parsed.media_type == (declared or MediaType.OCI_MANIFEST)


@pytest.mark.parametrize("media_type", sorted(LAYER_COMPRESSION))
def test_every_known_layer_type_is_accepted(media_type: str) -> None:
    assert Manifest.parse(manifest([desc(media_type)])).layers[0].media_type == media_type


@pytest.mark.parametrize(("raw", "names"), [
    (json.dumps({"schemaVersion": 1, "name": "x", "tag": "y", "fsLayers": []}).encode(), "schema 1"),
    (manifest(media_type=MediaType.DOCKER_SCHEMA1), "schema 1"),
    (manifest(media_type=MediaType.DOCKER_SCHEMA1_SIGNED), "schema 1"),
    (manifest(media_type=MediaType.OCI_INDEX), "index"),
    (manifest(media_type="application/vnd.example+json"), "application/vnd.example+json"),
    (manifest(media_type=["not", "a", "string"]), "media type"),
    (manifest(media_type={"a": 1}), "media type"),
])
def test_manifest_kinds_refused(raw: bytes, names: str) -> None:
    assert names in image_error(Manifest.parse, raw)


def test_unknown_layer_media_type_names_the_layer() -> None:
    raw = manifest([desc(), desc("application/vnd.example.layer.v1+squashfs", D3)])
    message = image_error(Manifest.parse, raw)
    assert "layer 1" in message and D3.removeprefix("sha256:")[:12] in message
    assert "application/vnd.example.layer.v1+squashfs" in message


@pytest.mark.parametrize("config_type", [
    "application/vnd.oci.empty.v1+json",
    "application/vnd.cncf.helm.config.v1+json",
    "application/vnd.oci.image.layer.v1.tar+gzip",
])
def test_artifact_manifests_refused(config_type: str) -> None:
    message = image_error(Manifest.parse, manifest(config=desc(config_type, D2, 2)))
    assert config_type in message and "artifact" in message


@pytest.mark.parametrize(("bad", "names"), [
    ({"digest": "sha256:abc"}, "sha256:abc"),
    ({"digest": "sha512:" + "a" * 128}, "sha512"),
    ({"digest": "sha256:" + "A" * 64}, "invalid digest"),
    ({"digest": D1 + "\n"}, "invalid digest"),
    ({"digest": 12}, "invalid digest"),
    ({"digest": None}, "invalid digest"),
    ({"size": -1}, "-1"),
    ({"size": "10"}, "'10'"),
    ({"size": 1.5}, "1.5"),
    ({"size": True}, "True"),
    ({"size": None}, "size"),
    ({"mediaType": None}, "mediaType"),
    ({"mediaType": 5}, "mediaType"),
    ({"annotations": ["a"]}, "annotations"),
    ({"urls": 5}, "urls"),
    ({"urls": "https://example.com/layer"}, "urls"),
    ({"urls": [1, 2]}, "urls"),
])
def test_bad_layer_descriptor(bad: dict[str, Any], names: str) -> None:
    layer_desc = {**desc(), **bad}
    for key, value in bad.items():
        if value is None:
            del layer_desc[key]
    message = image_error(Manifest.parse, manifest([layer_desc]))
    assert names in message and "layer 0" in message


@pytest.mark.parametrize(("raw", "names"), [
    (manifest(config="nope"), "config descriptor"),
    (json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode(), "config descriptor"),
    (json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                 "config": desc(OCI_CONFIG, D2, 1)}).encode(), "layers"),
    (manifest(layers={"0": desc()}), "layers"),  # type: ignore[arg-type]
    (manifest(layers=["layer"]), "layer 0"),  # type: ignore[list-item]
    (manifest(layers=[None]), "layer 0"),  # type: ignore[list-item]
])
def test_manifest_structure_refused(raw: bytes, names: str) -> None:
    assert names in image_error(Manifest.parse, raw, "manifest sha256:feed")


# -- malformed JSON, wherever it appears -----------------------------------------------------------------------

MALFORMED = [
    (b"", "not valid JSON"),
    (b"{", "not valid JSON"),
    (b"\xff\xfe{}", "not valid JSON"),
    (b"{\"a\": 1,}", "not valid JSON"),
    (b"[]", "not a JSON object"),
    (b"\"manifest\"", "not a JSON object"),
    (b"null", "not a JSON object"),
    (b"42", "not a JSON object"),
    (b"[" * 100_000 + b"]" * 100_000, "JSON"),
    (b"{\"a\":" * 100_000 + b"1" + b"}" * 100_000, "JSON"),
]


@pytest.mark.parametrize(("raw", "names"), MALFORMED, ids=range(len(MALFORMED)))
@pytest.mark.parametrize("parse", [Manifest.parse, Index.parse, ImageConfig.parse], ids=["manifest", "index", "config"])
def test_malformed_json_is_one_line(parse: Any, raw: bytes, names: str) -> None:
    message = image_error(parse, raw, "the thing")
    assert names in message and message.startswith("the thing")
    assert len(message) <= 400


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                        st.sampled_from(["mediaType", "manifests", "config", "layers", "digest", "size", "platform",
                                         "rootfs", "diff_ids", "urls", "annotations", "schemaVersion", "os",
                                         "architecture", "variant", "Entrypoint", "Cmd", "Env"]),
                        inner, max_size=5), max_leaves=20))
def test_any_json_parses_or_gives_image_error(doc: Any) -> None:
    raw = json.dumps(doc).encode()
    for parse in (Manifest.parse, Index.parse, ImageConfig.parse):
        try:
            parsed = parse(raw)
        except ImageError as exc:
            assert "\n" not in str(exc)
            continue
        with contextlib.suppress(ImageError):
            if isinstance(parsed, ImageConfig):
                parsed.summary()
                _ = parsed.platform, parsed.diff_ids
            if isinstance(parsed, Index):
                parsed.select(Platform("linux", "amd64"))


# -- indexes and platforms -----------------------------------------------------------------------------------


def plat(os_: str, arch: str, variant: str | None = None) -> dict[str, str]:
    doc = {"os": os_, "architecture": arch}
    if variant:
        doc["variant"] = variant
    return doc


MULTI = index([
    desc(MediaType.OCI_MANIFEST, D1, 1, platform=plat("linux", "amd64")),
    desc(MediaType.OCI_MANIFEST, D2, 1, platform=plat("linux", "arm64", "v8")),
    desc(MediaType.OCI_MANIFEST, D3, 1, platform=plat("linux", "arm", "v6")),
    desc(MediaType.OCI_MANIFEST, "sha256:" + "4" * 64, 1, platform=plat("linux", "arm", "v7")),
    desc(MediaType.OCI_MANIFEST, "sha256:" + "5" * 64, 1, platform=plat("unknown", "unknown"),
         annotations={"vnd.docker.reference.type": "attestation-manifest"}),
])


@pytest.mark.parametrize(("wanted", "digest"), [
    ("linux/amd64", D1),
    ("linux/x86_64", D1),
    ("linux/arm64", D2),
    ("linux/arm64/v8", D2),
    ("linux/aarch64", D2),
    ("linux/arm/v6", D3),
    ("linux/arm/v7", "sha256:" + "4" * 64),
])
def test_platform_selection(wanted: str, digest: str) -> None:
    assert Index.parse(MULTI).select(Platform.parse(wanted)).digest == digest


def test_no_matching_platform_lists_what_the_index_offers() -> None:
    message = image_error(Index.parse(MULTI).select, Platform.parse("linux/s390x"))
    assert "linux/s390x" in message
    assert "linux/amd64, linux/arm/v6, linux/arm/v7, linux/arm64, unknown/unknown" in message
    assert "--platform" in message


def test_index_without_platforms() -> None:
    two = Index.parse(index([desc(MediaType.OCI_MANIFEST, D1, 1), desc(MediaType.OCI_MANIFEST, D2, 1)]))
    assert "none declared" in image_error(two.select, Platform("linux", "amd64"))
    one = Index.parse(index([desc(MediaType.OCI_MANIFEST, D1, 1)]))
    assert one.select(Platform("linux", "amd64")).digest == D1


def test_index_entries_that_are_not_images_are_ignored() -> None:
    raw = index([desc(MediaType.OCI_LAYER_GZIP, D1, 1, platform=plat("linux", "amd64")),
                 desc(MediaType.DOCKER_MANIFEST, D2, 1, platform=plat("linux", "amd64"))], MediaType.DOCKER_LIST)
    assert Index.parse(raw).select(Platform("linux", "amd64")).digest == D2


def test_index_media_type_inferred_and_checked() -> None:
    assert Index.parse(index([], media_type=None)).media_type == MediaType.OCI_INDEX
    assert "application/vnd.example+json" in image_error(Index.parse, index([], "application/vnd.example+json"))
    assert "media type" in image_error(Index.parse, index([], ["x"]))  # type: ignore[arg-type]
    assert "manifests" in image_error(Index.parse, json.dumps({"schemaVersion": 2}).encode())
    assert "entry 1" in image_error(Index.parse, index([desc(MediaType.OCI_MANIFEST), desc(MediaType.OCI_MANIFEST,
                                                                                             "sha256:1")]))


@pytest.mark.parametrize("text", ["linux", "linux/", "/amd64", "linux/amd64/", "linux/amd64/v1/x", "", "//"])
def test_platform_syntax(text: str) -> None:
    assert "OS/ARCH" in image_error(Platform.parse, text)


def test_platform_normalisation() -> None:
    assert Platform.parse("linux/arm64/v8") == Platform("linux", "arm64")
    assert str(Platform.parse("linux/x86_64")) == "linux/amd64"
    assert Platform.parse("linux/arm/v7").matches(Platform("linux", "arm", "v7"))
    assert not Platform.parse("linux/arm/v7").matches(Platform("linux", "arm", "v6"))
    assert Platform.parse("linux/arm").matches(Platform("linux", "arm", "v6"))
    assert not Platform.parse("linux/amd64").matches(Platform("windows", "amd64"))
    host = Platform.host()
    assert host.os == "linux" and host.architecture not in ("x86_64", "aarch64", "")


# -- configs -------------------------------------------------------------------------------------------------


def test_config_fields() -> None:
    raw = config_json([D1], "linux", "arm64", variant="v8", config={
        "Entrypoint": ["/bin/app"], "Cmd": "serve", "Env": ["A=1"], "WorkingDir": "/srv", "User": "1000:1000",
        "ExposedPorts": {"80/tcp": {}, "443/tcp": {}}, "Labels": {"a": "b"}, "StopSignal": "SIGINT"})
    config = ImageConfig.parse(raw)
    assert config.digest == sha256(raw) and config.diff_ids == (D1,)
    assert config.platform == Platform("linux", "arm64")
    assert config.summary() == {"Entrypoint": ["/bin/app"], "Cmd": ["serve"], "Env": ["A=1"], "WorkingDir": "/srv",
                                "User": "1000:1000", "ExposedPorts": ["443/tcp", "80/tcp"], "Labels": {"a": "b"}}
    assert config.stop_signal == "SIGINT"


@pytest.mark.parametrize(("doc", "names"), [
    ({"architecture": "amd64", "os": "linux"}, "rootfs.diff_ids"),
    ({"rootfs": {"type": "layers"}}, "rootfs.diff_ids"),
    ({"rootfs": "layers"}, "rootfs.diff_ids"),
    ({"rootfs": {"diff_ids": D1}}, "rootfs.diff_ids"),
    ({"rootfs": {"diff_ids": [D1, "sha256:nope"]}}, "diff_id 1"),
    ({"rootfs": {"diff_ids": [None]}}, "diff_id 0"),
    ({"rootfs": {"diff_ids": []}, "config": ["Cmd"]}, "config section"),
])
def test_bad_configs(doc: dict[str, Any], names: str) -> None:
    assert names in image_error(ImageConfig.parse, json.dumps(doc).encode())


@pytest.mark.parametrize("field", ["Entrypoint", "Cmd", "Env"])
@pytest.mark.parametrize("value", [[1, 2], {"a": "b"}, 5, [None]])
def test_bad_argv_in_config(field: str, value: Any) -> None:
    config = ImageConfig.parse(json.dumps({"rootfs": {"diff_ids": []}, "config": {field: value}}).encode())
    assert field in image_error(config.summary)


# -- the chain, as a transport follows it ----------------------------------------------------------------------


def test_diff_ids_and_layers_count_mismatch(tmp_path: Path) -> None:
    oci = Layout(tmp_path)
    oci.image([layer(), layer()], config=config_json([sha256(b"")]))
    message = image_error(open_layout, tmp_path, None, None, "oci:x")
    assert "2 layers" in message and "1 diff_ids" in message


def test_config_for_another_platform(tmp_path: Path) -> None:
    oci = Layout(tmp_path)
    oci.image([layer()], arch="arm64")
    message = image_error(open_layout, tmp_path, None, Platform.parse("linux/amd64"), "oci:x")
    assert "linux/arm64" in message and "linux/amd64" in message
    image = open_layout(tmp_path, None, Platform.parse("linux/arm64/v8"), "oci:x")
    assert image.config.platform.architecture == "arm64"


def test_nested_indexes_are_followed_but_not_forever(tmp_path: Path) -> None:
    oci = Layout(tmp_path)
    top = oci.manifest([layer()])
    for depth in range(6):
        raw = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            {**top, "platform": plat("linux", "amd64")}]}).encode()
        top = oci.blob(raw, OCI_INDEX)
        oci.index(top)
        if depth < 2:
            assert open_layout(tmp_path, None, None, "oci:x").index_digest == top["digest"]
    assert "nested too deeply" in image_error(open_layout, tmp_path, None, None, "oci:x")


def test_manifest_descriptor_type_must_match_what_is_supported(tmp_path: Path) -> None:
    oci = Layout(tmp_path)
    desc_ = oci.manifest([layer()])
    oci.index({**desc_, "mediaType": "application/vnd.example+json"})
    assert "application/vnd.example+json" in image_error(open_layout, tmp_path, None, None, "oci:x")


def test_config_descriptor_size_is_checked(tmp_path: Path) -> None:
    oci = Layout(tmp_path)
    config = oci.blob(config_json([]), OCI_CONFIG)
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {**config, "size": config["size"] + 1},
           "layers": []}
    oci.index(oci.blob(json.dumps(doc).encode(), OCI_MANIFEST))
    assert "truncated" in image_error(open_layout, tmp_path, None, None, "oci:x")


def test_lone_surrogates_read_as_docker_reads_them() -> None:
    """Go's encoding/json (Docker) decodes a lone surrogate escape as U+FFFD; a proper pair is one character."""
    from converter.oci.model import load_json

    doc = load_json(b'{"Env": ["A=x\\ud800y"], "\\udc00k": ["\\ud83d\\ude00"]}', "a config")
    assert doc == {"Env": ["A=x\ufffdy"], "\ufffdk": ["\U0001f600"]}
    json.dumps(doc, ensure_ascii=False).encode("utf-8")  # every string can now be encoded


def test_shortened_messages_keep_the_reason_at_the_end() -> None:
    from converter.errors import one_line

    text = "libguestfs failed to unpack: tar: " + "n" * 500 + ": Cannot open: File name too long"
    short = one_line(text, 300)
    assert len(short) <= 300
    assert short.startswith("libguestfs failed to unpack") and short.endswith("File name too long")
    assert one_line("a\n  b\n\nc") == "a b c"
