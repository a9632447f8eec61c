"""Malformed pax headers in a layer: each one is either refused with a one-line LayerError naming the layer, or
flattened to exactly the tree the layer's ustar header describes. Which of the two is decided per input below,
so that a change in either direction (a traceback, a silent new tree, a newly refused harmless header) fails.

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
    # tarfile cannot parse the sparse map: the layer is not a tar archive a reader can trust.
    ({"GNU.sparse.map": "abc", "GNU.sparse.size": "3"}, "not a tar archive"),
    ({"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "a", "GNU.sparse.realsize": "x"},
     "not a tar archive"),
    # A negative size cannot be read: the file it names is the one refused.
    ({"size": "-5"}, "cannot read 'a'"),
], ids=["sparse-map", "sparse-1.0", "size"])
def test_malformed_pax_headers_that_cannot_be_read_are_layer_errors(pax: dict[str, str], needle: str) -> None:
    with pytest.raises(LayerError) as caught:
        flatten_bytes(_layer_with(pax))
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message, message
    assert message.startswith("layer 0: "), message
    assert needle in message, message


def test_an_unparsable_pax_uid_over_a_root_ustar_header_flattens_to_the_header_s_file() -> None:
    # The pax uid "abc" is not a number; the ustar header says uid 0 and the pax path repeats the name, so the
    # layer means one root-owned file `a`, and that is exactly what comes out.
    tree = flat(_layer_with({"uid": "abc", "path": "a"}))
    assert list(tree) == ["a"]
    node = tree["a"]
    assert (node.kind, node.content, node.mode, node.uid, node.gid, node.xattrs) == ("file", b"xyz", 0o644, 0, 0, {})
