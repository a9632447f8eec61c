"""The image model: descriptors, manifests, indexes, configs and platforms.

Frozen dataclasses that know nothing of where an image came from. Parsing validates
structure and media types and keeps the exact bytes of manifests and configs, because
their digests are computed over those bytes.
"""

from __future__ import annotations

import hashlib
import json
import platform as _platform
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from converter.errors import ImageError
from converter.oci.reference import DIGEST_RE


class MediaType:
    OCI_INDEX = "application/vnd.oci.image.index.v1+json"
    OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
    OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
    OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
    OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
    OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
    OCI_LAYER_ND = "application/vnd.oci.image.layer.nondistributable.v1.tar"
    OCI_LAYER_ND_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
    OCI_LAYER_ND_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
    DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
    DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
    DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
    DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"  # what `docker save` holds
    DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
    DOCKER_FOREIGN_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
    DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
    DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"


INDEX_TYPES = frozenset({MediaType.OCI_INDEX, MediaType.DOCKER_LIST})
MANIFEST_TYPES = frozenset({MediaType.OCI_MANIFEST, MediaType.DOCKER_MANIFEST})
CONFIG_TYPES = frozenset({MediaType.OCI_CONFIG, MediaType.DOCKER_CONFIG})

# Layer media type -> compression of the blob.
LAYER_COMPRESSION: Mapping[str, str] = {
    MediaType.OCI_LAYER: "none",
    MediaType.OCI_LAYER_GZIP: "gzip",
    MediaType.OCI_LAYER_ZSTD: "zstd",
    MediaType.OCI_LAYER_ND: "none",
    MediaType.OCI_LAYER_ND_GZIP: "gzip",
    MediaType.OCI_LAYER_ND_ZSTD: "zstd",
    MediaType.DOCKER_LAYER: "none",
    MediaType.DOCKER_LAYER_GZIP: "gzip",
    MediaType.DOCKER_FOREIGN_GZIP: "gzip",
}


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _check_digest(value: object, what: str) -> str:
    if not isinstance(value, str) or not DIGEST_RE.match(value):
        raise ImageError(f"{what} has an invalid digest {value!r}: only sha256 digests are supported")
    return value


def load_json(data: bytes, what: str) -> dict[str, Any]:
    """Parse a JSON object, turning every failure into a one-line ImageError naming *what*."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImageError(f"{what} is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise ImageError(f"{what} is not valid JSON: nested too deeply") from exc
    if not isinstance(doc, dict):
        raise ImageError(f"{what} is not a JSON object")
    result: dict[str, Any] = doc
    try:
        json.dumps(result, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escape ("\\ud800"): rare, so only then walk the document
        try:
            result = cast(dict[str, Any], _replace_surrogates(result))
        except RecursionError as exc:
            raise ImageError(f"{what} is not valid JSON: nested too deeply") from exc
    except RecursionError as exc:
        raise ImageError(f"{what} is not valid JSON: nested too deeply") from exc
    return result


_SURROGATE = re.compile("[\ud800-\udfff]")


def _replace_surrogates(value: Any) -> Any:
    """Lone UTF-16 surrogates become U+FFFD, as Go's encoding/json (Docker, containerd) decodes them: the
    image then means the same here as there, and no string that cannot be encoded reaches the guest."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_replace_surrogates(item) for item in value]
    if isinstance(value, dict):
        return {_replace_surrogates(key): _replace_surrogates(item) for key, item in value.items()}
    return value


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        """`linux/amd64`, `linux/arm64/v8`, `linux/arm/v7`."""
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ImageError(f"invalid platform {text!r}: expected OS/ARCH[/VARIANT], e.g. linux/amd64")
        return cls(parts[0], normalise_arch(parts[1]), parts[2] if len(parts) == 3 else None).normalised()

    @classmethod
    def host(cls) -> Platform:
        return cls("linux", normalise_arch(_platform.machine())).normalised()

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Platform:
        return cls(str(doc.get("os", "")), normalise_arch(str(doc.get("architecture", ""))),
                   doc.get("variant") or None).normalised()

    def normalised(self) -> Platform:
        # arm64's only variant is v8; containerd treats "arm64" and "arm64/v8" as the same platform.
        if self.architecture == "arm64" and self.variant == "v8":
            return Platform(self.os, self.architecture, None)
        return self

    def matches(self, other: Platform) -> bool:
        if (self.os, self.architecture) != (other.os, other.architecture):
            return False
        return self.variant is None or other.variant is None or self.variant == other.variant

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")


def normalise_arch(arch: str) -> str:
    return {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "armhf": "arm", "i686": "386",
            "i386": "386"}.get(arch, arch)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)
    urls: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, doc: object, what: str) -> Descriptor:
        if not isinstance(doc, dict):
            raise ImageError(f"{what} is not a JSON object")
        media_type = doc.get("mediaType")
        size = doc.get("size")
        if not isinstance(media_type, str):
            raise ImageError(f"{what} has no mediaType")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ImageError(f"{what} has an invalid size {size!r}")
        plat = doc.get("platform")
        annotations = doc.get("annotations") or {}
        if not isinstance(annotations, dict):
            raise ImageError(f"{what} has invalid annotations")
        urls = doc.get("urls") or []
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            raise ImageError(f"{what} has invalid urls: expected a list of strings")
        return cls(
            media_type=media_type,
            digest=_check_digest(doc.get("digest"), what),
            size=size,
            platform=Platform.from_json(plat) if isinstance(plat, dict) else None,
            annotations={str(k): str(v) for k, v in annotations.items()},
            urls=tuple(urls),
        )

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.urls:
            doc["urls"] = list(self.urls)
        if self.annotations:
            doc["annotations"] = dict(self.annotations)
        if self.platform:
            plat = {"architecture": self.platform.architecture, "os": self.platform.os}
            if self.platform.variant:
                plat["variant"] = self.platform.variant
            doc["platform"] = plat
        return doc

    @property
    def short(self) -> str:
        return self.digest.removeprefix("sha256:")[:12]


@dataclass(frozen=True)
class Index:
    media_type: str
    manifests: tuple[Descriptor, ...]
    raw: bytes

    @classmethod
    def parse(cls, raw: bytes, what: str = "image index") -> Index:
        doc = load_json(raw, what)
        media_type = doc.get("mediaType") or MediaType.OCI_INDEX
        if not isinstance(media_type, str) or media_type not in INDEX_TYPES:
            raise ImageError(f"{what} has unsupported media type {media_type!r}")
        entries = doc.get("manifests")
        if not isinstance(entries, list):
            raise ImageError(f"{what} has no manifests list")
        return cls(media_type, tuple(Descriptor.from_json(d, f"{what} entry {i}") for i, d in enumerate(entries)), raw)

    def select(self, wanted: Platform) -> Descriptor:
        """The manifest for *wanted*; an index with one untagged entry is taken as is."""
        images = [d for d in self.manifests if d.media_type in MANIFEST_TYPES | INDEX_TYPES]
        for desc in images:
            if desc.platform is not None and wanted.matches(desc.platform):
                return desc
        if len(images) == 1 and images[0].platform is None:
            return images[0]
        offered = ", ".join(sorted({str(d.platform) for d in images if d.platform})) or "none declared"
        raise ImageError(f"no image for platform {wanted} in the index (it offers: {offered}); use --platform")


@dataclass(frozen=True)
class Manifest:
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    raw: bytes | None  # None for a manifest synthesised from a legacy `docker save` archive

    @classmethod
    def parse(cls, raw: bytes, what: str = "image manifest", media_type: str | None = None) -> Manifest:
        doc = load_json(raw, what)
        declared = doc.get("mediaType") or media_type or MediaType.OCI_MANIFEST
        if not isinstance(declared, str):
            raise ImageError(f"{what} has unsupported media type {declared!r}")
        if declared in (MediaType.DOCKER_SCHEMA1, MediaType.DOCKER_SCHEMA1_SIGNED) or doc.get("schemaVersion") == 1:
            raise ImageError(f"{what} is Docker schema 1, which is deprecated and not supported")
        if declared in INDEX_TYPES:
            raise ImageError(f"{what} is an index, not a manifest")
        if declared not in MANIFEST_TYPES:
            raise ImageError(f"{what} has unsupported media type {declared!r}")
        config = Descriptor.from_json(doc.get("config"), f"{what} config descriptor")
        if config.media_type not in CONFIG_TYPES:
            raise ImageError(
                f"{what} describes a {config.media_type!r} artifact, not a container image "
                "(config media type must be an OCI or Docker image config)"
            )
        layers_doc = doc.get("layers")
        if not isinstance(layers_doc, list):
            raise ImageError(f"{what} has no layers list")
        layers = tuple(Descriptor.from_json(d, f"{what} layer {i}") for i, d in enumerate(layers_doc))
        for i, layer in enumerate(layers):
            if layer.media_type not in LAYER_COMPRESSION:
                raise ImageError(f"{what} layer {i} ({layer.short}) has unknown media type {layer.media_type!r}")
        return cls(declared, config, layers, raw)

    @property
    def digest(self) -> str | None:
        return sha256_digest(self.raw) if self.raw is not None else None


@dataclass(frozen=True)
class ImageConfig:
    """An image config, exact bytes kept (its digest is the image ID)."""

    raw: bytes
    doc: Mapping[str, Any]

    @classmethod
    def parse(cls, raw: bytes, what: str = "image config") -> ImageConfig:
        doc = load_json(raw, what)
        rootfs = doc.get("rootfs")
        if not isinstance(rootfs, dict) or not isinstance(rootfs.get("diff_ids"), list):
            raise ImageError(f"{what} has no rootfs.diff_ids")
        for i, d in enumerate(rootfs["diff_ids"]):
            _check_digest(d, f"{what} diff_id {i}")
        cfg = doc.get("config")
        if cfg is not None and not isinstance(cfg, dict):
            raise ImageError(f"{what} has an invalid config section")
        return cls(raw, doc)

    @property
    def digest(self) -> str:
        return sha256_digest(self.raw)

    @property
    def container(self) -> Mapping[str, Any]:
        cfg = self.doc.get("config")
        return cfg if isinstance(cfg, dict) else {}

    @property
    def diff_ids(self) -> tuple[str, ...]:
        return tuple(self.doc["rootfs"]["diff_ids"])

    @property
    def platform(self) -> Platform:
        return Platform(str(self.doc.get("os", "")), normalise_arch(str(self.doc.get("architecture", ""))),
                        self.doc.get("variant") or None).normalised()

    def _strings(self, key: str) -> tuple[str, ...] | None:
        value = self.container.get(key)
        if value is None:
            return None
        if isinstance(value, str):  # tolerated by Docker for Cmd/Entrypoint written by hand
            return (value,)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ImageError(f"image config {key} must be a list of strings")
        return tuple(value)

    @property
    def entrypoint(self) -> tuple[str, ...] | None:
        return self._strings("Entrypoint")

    @property
    def cmd(self) -> tuple[str, ...] | None:
        return self._strings("Cmd")

    @property
    def env(self) -> tuple[str, ...]:
        return self._strings("Env") or ()

    @property
    def working_dir(self) -> str:
        return str(self.container.get("WorkingDir") or "")

    @property
    def user(self) -> str:
        return str(self.container.get("User") or "")

    @property
    def exposed_ports(self) -> tuple[str, ...]:
        ports = self.container.get("ExposedPorts") or {}
        return tuple(sorted(ports)) if isinstance(ports, dict) else ()

    @property
    def labels(self) -> Mapping[str, str]:
        labels = self.container.get("Labels") or {}
        return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}

    @property
    def stop_signal(self) -> str | None:
        sig = self.container.get("StopSignal")
        return str(sig) if sig else None

    def summary(self) -> dict[str, Any]:
        """The parts of the config a user cares about when inspecting or running an image."""
        return {
            "Entrypoint": list(self.entrypoint) if self.entrypoint is not None else None,
            "Cmd": list(self.cmd) if self.cmd is not None else None,
            "Env": list(self.env),
            "WorkingDir": self.working_dir,
            "User": self.user,
            "ExposedPorts": list(self.exposed_ports),
            "Labels": dict(self.labels),
        }


def canonical_json(doc: Mapping[str, Any] | Sequence[Any]) -> bytes:
    """Stable JSON bytes for documents imgconv writes (so equal content has equal digests).

    Only JSON: a number JSON cannot carry (an image's ``1e999`` reads as infinity) is refused rather than
    written as ``Infinity``, which no other tool would read."""
    try:
        text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError as exc:
        raise ImageError(f"cannot write the image's JSON: it holds a number JSON cannot represent ({exc})") from exc
    return text.encode()
