"""`imgconv inspect`: an image's identity, layers and run configuration, every blob verified.

    read-image      manifest and config verified
    verify-layers   every layer read through its verifier (size, digest, diff_id), so a corrupt image is an
                    error here rather than half-way through a conversion
    report          the typed record the CLI renders
"""

from __future__ import annotations

from dataclasses import dataclass

from converter.oci.blobs import drain
from converter.oci.image import Image
from converter.oci.model import Platform
from converter.oci.reference import parse_reference
from converter.oci.transport import open_image
from converter.pipeline import Context, Pipeline, Slot, Step
from converter.progress import Monitor
from converter.records import ImageIdentity, InspectRecord


@dataclass(frozen=True)
class InspectOptions:
    reference: str
    platform: Platform | None = None
    tls_verify: bool = True


OPTIONS: Slot[InspectOptions] = Slot("options")


def read_image(ctx: Context) -> Image:
    options = ctx[OPTIONS]
    return ctx.enter(open_image(parse_reference(options.reference), platform=options.platform,
                                tls_verify=options.tls_verify))


def verify_layers(ctx: Context) -> None:
    image = ctx[read_image]
    with ctx.monitor.bar("verifying layers", sum(layer.descriptor.size for layer in image.layers)) as bar:
        for layer in image.layers:
            with image.open_layer(layer) as stream:
                drain(stream)
            bar.update(layer.descriptor.size)


def report(ctx: Context) -> InspectRecord:
    image = ctx[read_image]
    return InspectRecord(ImageIdentity.of(image), str(image.config.platform), image.config.doc.get("created"),
                         image.config.summary())


PIPELINE: Pipeline[InspectRecord] = Pipeline("inspect", (
    Step("read-image", "reading the image", read_image, needs=(OPTIONS,)),
    Step("verify-layers", "verifying the layers", verify_layers, needs=(read_image,)),
    Step("report", "reporting", report, needs=(read_image,)),
), result=report, given=(OPTIONS,))


def inspect_image(reference: str, *, platform: str | None, tls_verify: bool, monitor: Monitor) -> InspectRecord:
    options = InspectOptions(reference, Platform.parse(platform) if platform else None, tls_verify)
    return PIPELINE.run(monitor, options=options)
