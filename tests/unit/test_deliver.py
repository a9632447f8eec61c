"""Delivery into `oci:` layouts: complete or absent, and concurrent writers of one layout lose nothing."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import threading
from pathlib import Path
from typing import Any

import pytest

from converter.oci.layout import LayoutWriter
from converter.oci.reference import parse_reference
from converter.oci.transport import WORK_TAG, Built, deliver
from converter.oci.writer import LayerWriter, write_image


def _built(root: Path, text: str) -> Built:
    """A one-layer image in a private layout, as vm-to-oci leaves it before delivery."""
    layout = LayoutWriter(root)
    with LayerWriter(layout) as layer:
        info = tarfile.TarInfo("file")
        data = text.encode()
        info.size = len(data)
        layer.add(info, io.BytesIO(data))
    assert layer.result is not None
    config = {"architecture": "amd64", "os": "linux", "config": {},
              "rootfs": {"type": "layers", "diff_ids": [layer.result.diff_id]}}
    manifest, config_desc = write_image(layout, config, [layer.result.descriptor], WORK_TAG)
    return Built(root, manifest, config_desc, (layer.result.descriptor,))


def _deliver(built: Built, dest: Path, tag: str, scratch: Path) -> None:
    deliver(built, parse_reference(f"oci:{dest}:{tag}"), tls_verify=True, scratch=scratch)


def _tags(layout: Path) -> dict[str, str]:
    index = json.loads((layout / "index.json").read_text())
    return {m["annotations"]["org.opencontainers.image.ref.name"]: m["digest"] for m in index["manifests"]}


def _blobs_complete(layout: Path) -> None:
    for blob in (layout / "blobs" / "sha256").iterdir():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name, blob


def test_fresh_layout_and_a_second_tag(tmp_path: Path) -> None:
    one, two = _built(tmp_path / "one", "1"), _built(tmp_path / "two", "2")
    dest = tmp_path / "out" / "layout"
    dest.parent.mkdir()
    _deliver(one, dest, "a", tmp_path)
    _deliver(two, dest, "b", tmp_path)
    _deliver(one, dest, "b", tmp_path)  # a tag moves to the image delivered last
    assert _tags(dest) == {"a": one.manifest.digest, "b": one.manifest.digest}
    assert sorted(p.name for p in dest.parent.iterdir()) == ["layout"]
    assert not [p for p in (dest / "blobs" / "sha256").iterdir() if p.name.startswith(".")]
    _blobs_complete(dest)
    assert _tags(one.layout) == {WORK_TAG: one.manifest.digest}  # the private layout is left as it was


@pytest.mark.parametrize("round_", range(4))
def test_concurrent_writers_of_one_layout(round_: int, tmp_path: Path) -> None:
    """Eight runs delivering to one new layout at once: every tag lands, nothing is left beside it."""
    images = [_built(tmp_path / f"src{i}", f"image {i} of round {round_}") for i in range(8)]
    dest = tmp_path / "out" / "shared"
    dest.parent.mkdir()
    errors: list[BaseException] = []
    start = threading.Barrier(len(images))

    def run(i: int) -> None:
        try:
            start.wait()
            _deliver(images[i], dest, f"t{i}", tmp_path)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(images))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert _tags(dest) == {f"t{i}": image.manifest.digest for i, image in enumerate(images)}
    assert sorted(p.name for p in dest.parent.iterdir()) == ["shared"]
    _blobs_complete(dest)


def test_interrupted_fresh_delivery_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built = _built(tmp_path / "src", "x")
    out = tmp_path / "out"
    out.mkdir()
    real = shutil.copytree
    depth = []

    def copy_then_stop(*args: Any, **kwargs: Any) -> Any:
        depth.append(1)  # shutil.copytree calls itself for subdirectories
        try:
            real(*args, **kwargs)
        finally:
            depth.pop()
        if not depth:
            raise KeyboardInterrupt  # as if SIGINT arrived after the copy, before the rename

    monkeypatch.setattr(shutil, "copytree", copy_then_stop)
    with pytest.raises(KeyboardInterrupt):
        _deliver(built, out / "layout", "t", tmp_path)
    assert list(out.iterdir()) == []


def test_interrupted_addition_keeps_the_layout_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = _built(tmp_path / "one", "1"), _built(tmp_path / "two", "2")
    dest = tmp_path / "layout"
    _deliver(first, dest, "a", tmp_path)
    before = sorted(p.name for p in (dest / "blobs" / "sha256").iterdir())
    real = shutil.copyfile
    calls = []

    def copy_then_stop(src: Any, dst: Any, **kwargs: Any) -> Any:
        calls.append(dst)
        real(src, dst, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "copyfile", copy_then_stop)
    with pytest.raises(KeyboardInterrupt):
        _deliver(second, dest, "b", tmp_path)
    assert calls
    assert _tags(dest) == {"a": first.manifest.digest}
    assert sorted(p.name for p in (dest / "blobs" / "sha256").iterdir()) == before
