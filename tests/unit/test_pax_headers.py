"""Malformed pax headers in a layer: each one is either refused with a one-line LayerError naming the layer, or
flattened to exactly the tree the layer's ustar header describes. Which of the two is decided per input below
(as Go's archive/tar, which Docker reads layers with, decides), so that a change in either direction (a
traceback, a silent new tree, a newly refused harmless header) fails.

Replaces test_flatten.py's `test_malformed_pax_headers_are_layer_errors_or_harmless`, which suppressed the
error and asserted nothing.
"""

from __future__ import annotations

import pytest

from converter.errors import LayerError
from tests.builders import f, flat, flatten_bytes, layer


def _layer_with(pax: dict[str, str]) -> bytes:
    """A layer of one file `a` holding b"xyz" (mode 0644, root:root), its pax header replaced by *pax*."""
    info, _ = f("a", "xyz")
    info.pax_headers = pax
    return layer((info, b"xyz"))


@pytest.mark.parametrize(("pax", "needle"), [
    # A sparse map or size that does not parse: Go refuses the layer (ErrHeader).
    ({"GNU.sparse.map": "abc", "GNU.sparse.size": "3"}, "'a': its sparse map"),
    ({"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "a", "GNU.sparse.realsize": "x"},
     "'a': its sparse size 'x' is not a number"),
    # A negative size cannot be read: the file it names is the one refused.
    ({"size": "-5"}, "'a' declares a negative size"),
    # Numbers Go's ParseInt refuses (tarfile read them as 0: a root-owned file).
    ({"uid": "abc", "path": "a"}, "'a': its PAX uid 'abc' is not a number"),
    ({"gid": " 7"}, "'a': its PAX gid ' 7' is not a number"),
    ({"mtime": "1e9"}, "'a': its PAX mtime '1e9' is not a time"),
], ids=["sparse-map", "sparse-1.0", "size", "uid", "gid", "mtime"])
def test_malformed_pax_headers_that_cannot_be_read_are_layer_errors(pax: dict[str, str], needle: str) -> None:
    with pytest.raises(LayerError) as caught:
        flatten_bytes(_layer_with(pax))
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message, message
    assert message.startswith("layer 0: "), message
    assert needle in message, message


def test_an_empty_pax_uid_keeps_the_ustar_uid() -> None:
    # POSIX and Go: an empty record means the header's own value (tarfile read it as 0, a root-owned file).
    info, _ = f("a", "xyz")
    info.uid = 1000
    info.pax_headers = {"uid": ""}
    node = flat(layer((info, b"xyz")))["a"]
    assert (node.kind, node.content, node.uid) == ("file", b"xyz", 1000)
