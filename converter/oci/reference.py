"""Image references in the syntax users know from skopeo and podman (containers-transports(5)).

Accepted forms::

    oci:DIR[:TAG]                      an OCI image layout directory
    docker-archive:PATH[:NAME[:TAG]]   a `docker save` tarball (or `:@N` for the Nth image in it)
    docker-daemon:NAME[:TAG|@DIGEST]   an image in the Docker engine at DOCKER_HOST (or sha256:ID)
    docker://[REGISTRY/]NAME[:TAG|@DIGEST]   an image in a registry (through skopeo)

Parsing is pure: nothing here touches the filesystem or the network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from converter.errors import ReferenceError_

ACCEPTED_FORMS = (
    "oci:DIR[:TAG], docker-archive:PATH[:NAME:TAG|:@N], docker-daemon:NAME[:TAG|@DIGEST] or docker-daemon:sha256:ID, "
    "docker://[REGISTRY/]NAME[:TAG|@DIGEST]"
)

DEFAULT_REGISTRY = "docker.io"
DEFAULT_TAG = "latest"

# From the distribution reference grammar (github.com/distribution/reference).
_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|-+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
# \Z, not $: `$` also matches before a trailing newline. ASCII: Go's \w (Docker's tag grammar) is ASCII only.
_NAME_RE = re.compile(rf"^(?:(?P<domain>{_DOMAIN})/)?(?P<path>{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*)\Z")
_PATH_RE = re.compile(rf"^{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*\Z")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}\Z", re.ASCII)
DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}\Z")
_IMAGE_ID_RE = re.compile(r"^[a-f0-9]{64}\Z")
_INDEX_RE = re.compile(r"^@[0-9]+\Z")
_OCI_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._:@/+-]*\Z")
NAME_MAX = 255  # Docker's limit on a repository name


class Transport(StrEnum):
    OCI = "oci"
    DOCKER_ARCHIVE = "docker-archive"
    DOCKER_DAEMON = "docker-daemon"
    DOCKER = "docker"


@dataclass(frozen=True)
class DockerName:
    """A normalised docker reference: registry domain, repository path, and tag and/or digest."""

    domain: str
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def repository(self) -> str:
        return f"{self.domain}/{self.path}"

    def familiar(self) -> str:
        """The short form Docker shows: `busybox:latest` rather than `docker.io/library/busybox:latest`."""
        repo = self.repository
        if self.domain == DEFAULT_REGISTRY:
            short = self.path.removeprefix("library/")
            # docker.io/library/a/b is not a/b (that is docker.io/a/b): only one component may drop library/.
            repo = short if "/" not in short else self.path
            if "/" in repo and _looks_like_host(repo.split("/", 1)[0]):
                repo = self.repository  # docker.io/0.0/x shown as 0.0/x would name the registry 0.0
        return repo + self.suffix()

    def suffix(self) -> str:
        return (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")

    def __str__(self) -> str:
        return self.repository + self.suffix()


def _looks_like_host(component: str) -> bool:
    """Docker's rule for the first component of a name: a registry host, not part of the repository's path."""
    return "." in component or ":" in component or component == "localhost" or component.startswith("[")


def parse_docker_name(text: str, *, default_tag: bool = True) -> DockerName:
    """Parse `[REGISTRY/]NAME[:TAG][@DIGEST]` and normalise it the way Docker does."""
    rest, digest = text, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not DIGEST_RE.match(digest):
            raise ReferenceError_(f"invalid digest {digest!r} in {text!r}: expected sha256: and 64 hex digits")
    tag = None
    slash, colon = rest.rfind("/"), rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG_RE.match(tag):
            raise ReferenceError_(f"invalid tag {tag!r} in {text!r}")
    match = _NAME_RE.match(rest)
    domain, path = (match.group("domain"), match.group("path")) if match else (None, "")
    # A first component counts as a registry only if it looks like a host (Docker's rule).
    if domain is not None and not _looks_like_host(domain):
        domain, path = None, f"{domain}/{path}"
    if not match or not _PATH_RE.match(path):
        raise ReferenceError_(
            f"invalid image name {rest!r}: names are lowercase letters, digits and separators, "
            "optionally after a registry host"
        )
    if len(rest) > NAME_MAX:
        raise ReferenceError_(f"image name {rest[:40]!r}... is longer than {NAME_MAX} characters")
    if _IMAGE_ID_RE.match(text):
        raise ReferenceError_(f"invalid image name {rest!r}: a 64-hex-digit name would be mistaken for an image ID")
    if domain is None or domain == "index.docker.io":
        domain = DEFAULT_REGISTRY
    if domain == DEFAULT_REGISTRY and "/" not in path:
        path = f"library/{path}"
    if tag is None and digest is None and default_tag:
        tag = DEFAULT_TAG
    return DockerName(domain=domain, path=path, tag=tag, digest=digest)


@dataclass(frozen=True)
class Reference:
    """Where an image lives. Exactly the fields its transport uses are set."""

    transport: Transport
    path: str | None = None  # oci, docker-archive: the directory or tarball
    tag: str | None = None  # oci: the ref.name in index.json (None: the only image there)
    name: DockerName | None = None  # docker, docker-daemon, and docker-archive's optional NAME:TAG
    index: int | None = None  # docker-archive `:@N`
    image_id: str | None = None  # docker-daemon by image ID (sha256:...)

    def __str__(self) -> str:
        t = self.transport
        if t is Transport.OCI:
            return f"oci:{self.path}" + (f":{self.tag}" if self.tag else "")
        if t is Transport.DOCKER_ARCHIVE:
            extra = f":{self.name.familiar()}" if self.name else (f":@{self.index}" if self.index is not None else "")
            return f"docker-archive:{self.path}{extra}"
        if t is Transport.DOCKER_DAEMON:
            return f"docker-daemon:{self.image_id or (self.name.familiar() if self.name else '')}"
        return f"docker://{self.name}"


def parse_reference(text: str) -> Reference:
    """Parse a reference string; any malformed input raises a one-line ReferenceError_."""
    if not text:
        raise ReferenceError_(f"empty image reference; expected one of {ACCEPTED_FORMS}")
    if text.startswith("docker://"):
        body = text[len("docker://") :]
        if not body:
            raise ReferenceError_(f"{text!r} names no image; expected docker://[REGISTRY/]NAME[:TAG|@DIGEST]")
        return Reference(Transport.DOCKER, name=parse_docker_name(body))
    transport_name, sep, body = text.partition(":")
    if not sep:
        raise ReferenceError_(f"{text!r} has no transport; expected one of {ACCEPTED_FORMS}")
    try:
        transport = Transport(transport_name)
    except ValueError as exc:
        raise ReferenceError_(
            f"unknown transport {transport_name!r} in {text!r}; expected one of {ACCEPTED_FORMS}"
        ) from exc
    if transport is Transport.DOCKER:
        raise ReferenceError_(f"{text!r}: the registry transport is written docker://NAME")
    if not body:
        raise ReferenceError_(f"{text!r} is missing its {'name' if transport is Transport.DOCKER_DAEMON else 'path'}")
    if transport is Transport.OCI:
        return _parse_oci(text, body)
    if transport is Transport.DOCKER_ARCHIVE:
        return _parse_archive(text, body)
    return _parse_daemon(text, body)


def _parse_oci(text: str, body: str) -> Reference:
    # Like containers/image: the path ends at the first colon.
    path, _, tag = body.partition(":")
    if not path:
        raise ReferenceError_(f"{text!r} is missing the layout directory; expected oci:DIR[:TAG]")
    if tag and not _OCI_TAG_RE.match(tag):
        raise ReferenceError_(f"invalid tag {tag!r} in {text!r}")
    return Reference(Transport.OCI, path=path, tag=tag or None)


def _parse_archive(text: str, body: str) -> Reference:
    path, _, rest = body.partition(":")
    if not path:
        raise ReferenceError_(f"{text!r} is missing the archive path; expected docker-archive:PATH[:NAME:TAG]")
    if not rest:
        return Reference(Transport.DOCKER_ARCHIVE, path=path)
    if rest.startswith("@"):
        if not _INDEX_RE.match(rest):
            raise ReferenceError_(f"invalid image index {rest!r} in {text!r}; expected :@N")
        return Reference(Transport.DOCKER_ARCHIVE, path=path, index=int(rest[1:]))
    name = parse_docker_name(rest)
    if name.digest:
        raise ReferenceError_(f"{text!r}: a docker-archive reference takes NAME:TAG, not a digest")
    return Reference(Transport.DOCKER_ARCHIVE, path=path, name=name)


def _parse_daemon(text: str, body: str) -> Reference:
    if DIGEST_RE.match(body):
        return Reference(Transport.DOCKER_DAEMON, image_id=body)
    name = parse_docker_name(body)
    if name.domain == DEFAULT_REGISTRY and name.path == "library/sha256":
        # containers/image's rule: "sha256:abc" is a short or mistyped image ID, not the image sha256:abc.
        raise ReferenceError_(f"invalid image ID {body!r} in {text!r}; expected docker-daemon:sha256:<64 hex digits>")
    return Reference(Transport.DOCKER_DAEMON, name=name)
