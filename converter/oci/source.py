"""Open any image reference as an :class:`Image`, whichever transport it names.

The one place that knows all the transports; everything after it sees only the model.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from converter.errors import ImageError, ImgconvError, ToolError
from converter.oci.image import Image
from converter.oci.model import Platform
from converter.oci.reference import Reference, Transport


@contextmanager
def scratch_dir(prefix: str = "imgconv-") -> Iterator[Path]:
    """A private temporary directory, removed however the block ends."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def open_image(ref: Reference, *, platform: Platform | None = None, tls_verify: bool = True) -> Iterator[Image]:
    """Yield the image *ref* names, its manifest and config already verified.

    Layers are verified as they are read (``Image.open_layer``). Temporary copies (a registry
    download, a daemon export) live only as long as the block.
    """
    source = str(ref)
    with scratch_dir() as scratch:
        if ref.transport is Transport.OCI:
            from converter.oci.layout import open_layout

            assert ref.path is not None
            yield open_layout(Path(ref.path), ref.tag, platform, source)
        elif ref.transport is Transport.DOCKER_ARCHIVE:
            from converter.oci.archive import open_archive

            assert ref.path is not None
            image = open_archive(Path(ref.path), ref.name, ref.index, platform, source, scratch)
            try:
                yield image
            finally:
                image.store.tar.close()  # type: ignore[attr-defined]
        elif ref.transport is Transport.DOCKER_DAEMON:
            from converter.oci.daemon import open_daemon_image

            image = open_daemon_image(ref, platform, source, scratch)
            try:
                yield image
            finally:
                image.store.tar.close()  # type: ignore[attr-defined]
        else:
            from converter.oci.registry import pull

            assert ref.name is not None
            try:
                pulled = pull(ref.name, platform, tls_verify, scratch, source)
            except ToolError as exc:
                raise registry_error(source, exc) from None
            yield pulled


def registry_error(source: str, exc: ToolError) -> ImgconvError:
    """Say what a skopeo failure means for the user, in the words they need to fix it."""
    text = str(exc)
    if any(s in text for s in ("manifest unknown", "name unknown", "not found")):
        return ImageError(f"{source}: no such image in the registry (manifest unknown)")
    if "HTTP response to HTTPS client" in text:
        return ToolError(f"{source}: the registry speaks plain HTTP; pass --no-tls-verify to allow that")
    if "unauthorized" in text or "authentication required" in text:
        return ToolError(f"{source}: the registry refused access; log in with `skopeo login` first ({text})")
    return exc
