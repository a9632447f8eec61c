"""`imgconv inspect`: an image's identity, layers and run configuration, every blob verified."""

from __future__ import annotations

from typing import Any

from converter.oci.blobs import drain
from converter.oci.model import Platform
from converter.oci.reference import parse_reference
from converter.oci.source import open_image
from converter.progress import Monitor


def inspect_image(reference: str, *, platform: str | None, tls_verify: bool, monitor: Monitor) -> dict[str, Any]:
    ref = parse_reference(reference)
    wanted = Platform.parse(platform) if platform else None
    with monitor.step(f"reading {ref}"), open_image(ref, platform=wanted, tls_verify=tls_verify) as image:
        total = sum(layer.descriptor.size for layer in image.layers)
        with monitor.bar("verifying layers", total) as bar:
            for layer in image.layers:
                with image.open_layer(layer) as stream:
                    drain(stream)
                bar.update(layer.descriptor.size)
        return {
            "source": image.source,
            "image_id": image.image_id,
            "manifest_digest": image.manifest_digest,
            "index_digest": image.index_digest,
            "platform": str(image.config.platform),
            "created": image.config.doc.get("created"),
            "layers": [
                {
                    "digest": layer.descriptor.digest,
                    "size": layer.descriptor.size,
                    "media_type": layer.descriptor.media_type,
                    "diff_id": layer.diff_id,
                }
                for layer in image.layers
            ],
            "config": image.config.summary(),
        }
