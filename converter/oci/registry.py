"""`docker://REGISTRY/NAME[:TAG|@DIGEST]`: registries, through skopeo.

Authentication, mirrors, proxies and TLS are skopeo's job (containers-auth.json(5),
containers-registries.conf(5)); imgconv only passes `--tls-verify`. Reading copies the chosen
manifest into a `dir:` directory, which keeps the manifest bytes (and so its digest) exactly as
the registry served them; the blobs are then verified like any other. Writing pushes the private
layout with `skopeo copy --preserve-digests`, so the registry stores the manifest imgconv made.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from converter.errors import BlobError, ImageError, ImgconvError, ToolError
from converter.oci.image import Image, resolve
from converter.oci.model import INDEX_TYPES, Descriptor, Index, MediaType, Platform, load_json, sha256_digest
from converter.oci.reference import DockerName, Reference
from converter.run import run
from converter.scratch import scratch_dir

if TYPE_CHECKING:
    from converter.oci.transport import Built


class RegistryTransport:
    """`docker://[REGISTRY/]NAME[:TAG|@DIGEST]`."""

    @contextmanager
    def open(self, ref: Reference, *, platform: Platform | None, tls_verify: bool) -> Iterator[Image]:
        source = str(ref)
        with scratch_dir() as scratch:
            try:
                image = pull(_name(ref), platform, tls_verify, scratch, source)
            except ToolError as exc:
                raise registry_error(source, exc) from exc
            yield image

    def check_destination(self, ref: Reference, force: bool) -> None:
        """Nothing to check before the work: whether a push is allowed only the registry can say, at push time."""

    def write(self, built: Built, ref: Reference, *, tls_verify: bool, scratch: Path) -> str | None:
        return push(built.layout, built.tag, _name(ref), tls_verify, scratch)


TRANSPORT = RegistryTransport()


def _name(ref: Reference) -> DockerName:
    assert ref.name is not None  # parse_reference sets it for every docker:// reference
    return ref.name


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


class DirStore:
    """skopeo's `dir:` transport: blobs stored by hex digest, the manifest as manifest.json."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def open_blob(self, digest: str) -> BinaryIO:
        path = self.root / digest.removeprefix("sha256:")
        if digest == self.manifest_digest():
            path = self.root / "manifest.json"
        try:
            return path.open("rb")
        except FileNotFoundError as exc:
            raise BlobError(f"blob {digest} was not fetched from the registry") from exc

    def manifest_digest(self) -> str:
        return sha256_digest((self.root / "manifest.json").read_bytes())

    def describe(self) -> str:
        return "registry download"


def _tls(tls_verify: bool, prefix: str = "") -> list[str]:
    return [] if tls_verify else [f"--{prefix}tls-verify=false"]


def _media_type(raw: bytes, what: str) -> str:
    doc = load_json(raw, what)
    declared = doc.get("mediaType")
    if isinstance(declared, str):
        return declared
    if "manifests" in doc:
        return MediaType.OCI_INDEX
    return MediaType.OCI_MANIFEST


def pull(name: DockerName, platform: Platform | None, tls_verify: bool, scratch: Path, source: str) -> Image:
    purpose = f"read {name} from its registry"
    url = f"docker://{name}"
    top_raw = run(["skopeo", "inspect", "--raw", *_tls(tls_verify), url], purpose=purpose).stdout
    top_type = _media_type(top_raw, f"{source} manifest")
    index_digest = None
    target = url
    if top_type in INDEX_TYPES:
        index = Index.parse(top_raw, f"{source} index")
        index_digest = sha256_digest(top_raw)
        chosen = index.select(platform or Platform.host())
        target = f"docker://{name.repository}@{chosen.digest}"
    dest = scratch / "registry"
    run(["skopeo", "copy", "--quiet", *_tls(tls_verify, "src-"), target, f"dir:{dest}"], purpose=purpose)
    manifest_raw = (dest / "manifest.json").read_bytes()
    top = Descriptor(_media_type(manifest_raw, f"{source} manifest"), sha256_digest(manifest_raw), len(manifest_raw))
    if top.media_type in INDEX_TYPES:
        raise ImageError(f"{source}: the registry returned an index where a manifest was expected")
    return resolve(DirStore(dest), top, platform, source, index_digest=index_digest)


def push(layout: Path, tag: str, name: DockerName, tls_verify: bool, scratch: Path) -> str:
    """Copy `oci:layout:tag` to the registry; returns the manifest digest the registry stored."""
    digest_file = scratch / "pushed-digest"
    run(
        ["skopeo", "copy", "--quiet", "--preserve-digests", *_tls(tls_verify, "dest-"),
         "--digestfile", str(digest_file), f"oci:{layout}:{tag}", f"docker://{name}"],
        purpose=f"push to {name.repository}",
    )
    return digest_file.read_text().strip()

