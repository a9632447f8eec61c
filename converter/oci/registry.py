"""`docker://REGISTRY/NAME[:TAG|@DIGEST]`: registries, through skopeo.

Authentication, mirrors, proxies and TLS are skopeo's job (containers-auth.json(5),
containers-registries.conf(5)); imgconv only passes `--tls-verify`. Reading copies the chosen
manifest into a `dir:` directory, which keeps the manifest bytes (and so its digest) exactly as
the registry served them; the blobs are then verified like any other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import BinaryIO

from converter.errors import BlobError, ImageError
from converter.oci.image import Image, resolve
from converter.oci.model import INDEX_TYPES, Descriptor, Index, MediaType, Platform, load_json, sha256_digest
from converter.oci.reference import DockerName
from converter.run import run


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
        except FileNotFoundError:
            raise BlobError(f"blob {digest} was not fetched from the registry") from None

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


def registry_manifest(name: DockerName, tls_verify: bool) -> dict[str, object]:
    raw = run(["skopeo", "inspect", "--raw", *_tls(tls_verify), f"docker://{name}"],
              purpose=f"read {name} from its registry").stdout
    doc: dict[str, object] = json.loads(raw)
    return doc
