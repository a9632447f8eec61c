"""Test inputs, built in one place:

    layers.py      layer tars from entries (f, d, sym, hl, dev, fifo, wh, opq, entry -> layer()), raw headers
    oci.py         OCI image layouts (Layout: blobs, manifests, index.json), config_json, media types
    archives.py    docker archives (docker_archive, tar_file)
    flattening.py  layers flattened in memory and read back strictly (flat, extract, summary, link_groups)

Everything is importable from `tests.builders` itself. Fixture images (real distributions, built once and
cached) are fixtures/'s; foreign VM disks are tests/integration/foreign.py's.
"""

from tests.builders.archives import docker_archive, tar_file
from tests.builders.flattening import (
    Node,
    NotExtractable,
    extract,
    flat,
    flatten_bytes,
    inputs,
    link_groups,
    summary,
)
from tests.builders.layers import END, MTIME, Spec, d, dev, entry, f, fifo, hl, layer, opq, pad, raw_header, sym, wh
from tests.builders.oci import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    REF_NAME,
    Layout,
    compress,
    config_json,
    manifest_doc,
    sha256,
)

__all__ = [
    "END", "MTIME", "OCI_CONFIG", "OCI_INDEX", "OCI_LAYER", "OCI_LAYER_GZIP", "OCI_LAYER_ZSTD", "OCI_MANIFEST",
    "REF_NAME", "Layout", "Node", "NotExtractable", "Spec", "compress", "config_json", "d", "dev", "docker_archive",
    "entry", "extract", "f", "fifo", "flat", "flatten_bytes", "hl", "inputs", "layer", "link_groups", "manifest_doc",
    "opq", "pad", "raw_header", "sha256", "summary", "sym", "tar_file", "wh",
]
