"""Image references: the containers-transports(5) syntax and Docker's name normalisation.

Every malformed reference must be refused with a one-line ReferenceError_ that names the accepted forms or the
part that is wrong; nothing else may escape the parser.
"""

from __future__ import annotations

import string

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from converter.errors import EXIT_USAGE, ReferenceError_
from converter.oci.reference import DockerName, Reference, Transport, parse_docker_name, parse_reference

DIGEST = "sha256:" + "ab" * 32
OTHER_DIGEST = "sha256:" + "0123456789abcdef" * 4


def refused(text: str) -> str:
    """The message parse_reference refuses *text* with."""
    with pytest.raises(ReferenceError_) as caught:
        parse_reference(text)
    message = str(caught.value)
    assert "\n" not in message and message.strip() == message and message
    assert caught.value.exit_code == EXIT_USAGE
    return message


# -- oci: ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "path", "tag"), [
    ("oci:layout", "layout", None),
    ("oci:./layout", "./layout", None),
    ("oci:/abs/dir/layout", "/abs/dir/layout", None),
    ("oci:layout:latest", "layout", "latest"),
    ("oci:layout:v1.2-rc_3", "layout", "v1.2-rc_3"),
    # containers/image: the directory ends at the first colon, so the tag may hold colons (and slashes).
    ("oci:layout:example.com/app:1", "layout", "example.com/app:1"),
    ("oci:layout:", "layout", None),
])
def test_oci_references(text: str, path: str, tag: str | None) -> None:
    assert parse_reference(text) == Reference(Transport.OCI, path=path, tag=tag)


@pytest.mark.parametrize(("text", "names"), [
    ("oci:", "oci:"),
    ("oci::latest", "oci:DIR"),
    ("oci:layout:-dash", "-dash"),
    ("oci:layout:has space", "has space"),
    ("oci:layout:.hidden", ".hidden"),
])
def test_oci_malformed(text: str, names: str) -> None:
    assert names in refused(text)


# -- docker-archive: -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("docker-archive:img.tar", Reference(Transport.DOCKER_ARCHIVE, path="img.tar")),
    ("docker-archive:/tmp/img.tar:busybox:1.36",
     Reference(Transport.DOCKER_ARCHIVE, path="/tmp/img.tar",
               name=DockerName("docker.io", "library/busybox", "1.36"))),
    ("docker-archive:img.tar:busybox",
     Reference(Transport.DOCKER_ARCHIVE, path="img.tar", name=DockerName("docker.io", "library/busybox", "latest"))),
    ("docker-archive:img.tar:localhost:5000/team/app:v2",
     Reference(Transport.DOCKER_ARCHIVE, path="img.tar", name=DockerName("localhost:5000", "team/app", "v2"))),
    ("docker-archive:img.tar:@0", Reference(Transport.DOCKER_ARCHIVE, path="img.tar", index=0)),
    ("docker-archive:img.tar:@12", Reference(Transport.DOCKER_ARCHIVE, path="img.tar", index=12)),
])
def test_archive_references(text: str, expected: Reference) -> None:
    assert parse_reference(text) == expected


@pytest.mark.parametrize(("text", "names"), [
    ("docker-archive:", "docker-archive:"),
    ("docker-archive::busybox:1", "PATH"),
    ("docker-archive:img.tar:@", ":@N"),
    ("docker-archive:img.tar:@x", ":@N"),
    ("docker-archive:img.tar:@-1", ":@N"),
    ("docker-archive:img.tar:@1.5", ":@N"),
    # Unicode digits are digits to str.isdigit() but not to a user typing :@N.
    ("docker-archive:img.tar:@\u00b2", ":@N"),
    ("docker-archive:img.tar:@\u0661", ":@N"),
    ("docker-archive:img.tar:busybox@" + DIGEST, "not a digest"),
    ("docker-archive:img.tar:BusyBox:1", "BusyBox"),
])
def test_archive_malformed(text: str, names: str) -> None:
    assert names in refused(text)


# -- docker-daemon: ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("docker-daemon:busybox", Reference(Transport.DOCKER_DAEMON,
                                        name=DockerName("docker.io", "library/busybox", "latest"))),
    ("docker-daemon:busybox:1.36", Reference(Transport.DOCKER_DAEMON,
                                             name=DockerName("docker.io", "library/busybox", "1.36"))),
    ("docker-daemon:busybox@" + DIGEST, Reference(Transport.DOCKER_DAEMON,
                                                  name=DockerName("docker.io", "library/busybox", None, DIGEST))),
    ("docker-daemon:busybox:1@" + DIGEST, Reference(Transport.DOCKER_DAEMON,
                                                    name=DockerName("docker.io", "library/busybox", "1", DIGEST))),
    ("docker-daemon:" + DIGEST, Reference(Transport.DOCKER_DAEMON, image_id=DIGEST)),
    ("docker-daemon:localhost:5000/app", Reference(Transport.DOCKER_DAEMON,
                                                   name=DockerName("localhost:5000", "app", "latest"))),
])
def test_daemon_references(text: str, expected: Reference) -> None:
    assert parse_reference(text) == expected


@pytest.mark.parametrize(("text", "names"), [
    ("docker-daemon:", "docker-daemon:"),
    ("docker-daemon:sha256:abc", "sha256:abc"),
    ("docker-daemon:busybox@sha256:abc", "sha256:abc"),
    ("docker-daemon:Busybox", "Busybox"),
    # Docker refuses a bare 64-hex name: it would be mistaken for an image ID.
    ("docker-daemon:" + "ab" * 32, "ab" * 32),
])
def test_daemon_malformed(text: str, names: str) -> None:
    assert names in refused(text)


# -- docker:// -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "canonical", "familiar"), [
    ("busybox", "docker.io/library/busybox:latest", "busybox:latest"),
    ("busybox:1.36", "docker.io/library/busybox:1.36", "busybox:1.36"),
    ("library/busybox", "docker.io/library/busybox:latest", "busybox:latest"),
    ("docker.io/busybox", "docker.io/library/busybox:latest", "busybox:latest"),
    ("index.docker.io/busybox", "docker.io/library/busybox:latest", "busybox:latest"),
    ("docker.io/library/busybox:latest", "docker.io/library/busybox:latest", "busybox:latest"),
    ("user/app", "docker.io/user/app:latest", "user/app:latest"),
    # Only a single component after library/ is shortened: library/a/b is not the same image as a/b.
    ("docker.io/library/a/b:1", "docker.io/library/a/b:1", "library/a/b:1"),
    ("busybox@" + DIGEST, "docker.io/library/busybox@" + DIGEST, "busybox@" + DIGEST),
    ("busybox:1@" + DIGEST, "docker.io/library/busybox:1@" + DIGEST, "busybox:1@" + DIGEST),
    ("localhost/app", "localhost/app:latest", "localhost/app:latest"),
    ("localhost:5000/app", "localhost:5000/app:latest", "localhost:5000/app:latest"),
    ("localhost:5000/team/app:v1", "localhost:5000/team/app:v1", "localhost:5000/team/app:v1"),
    ("127.0.0.1:5000/app:v1", "127.0.0.1:5000/app:v1", "127.0.0.1:5000/app:v1"),
    ("[::1]:5000/app:v1", "[::1]:5000/app:v1", "[::1]:5000/app:v1"),
    ("[::1]/app", "[::1]/app:latest", "[::1]/app:latest"),
    ("[2001:db8::1]:443/a/b", "[2001:db8::1]:443/a/b:latest", "[2001:db8::1]:443/a/b:latest"),
    ("Registry.Example.COM/app", "Registry.Example.COM/app:latest", "Registry.Example.COM/app:latest"),
    ("registry-1.example.com/a/b/c:tag", "registry-1.example.com/a/b/c:tag", "registry-1.example.com/a/b/c:tag"),
    ("a__b/c-d--e.f/g_h:T_1.x-y", "docker.io/a__b/c-d--e.f/g_h:T_1.x-y", "a__b/c-d--e.f/g_h:T_1.x-y"),
    # Docker reads a lone host:port as NAME:TAG.
    ("localhost:5000", "docker.io/library/localhost:5000", "localhost:5000"),
    ("busybox:" + "t" * 128, "docker.io/library/busybox:" + "t" * 128, "busybox:" + "t" * 128),
])
def test_docker_normalisation(text: str, canonical: str, familiar: str) -> None:
    ref = parse_reference("docker://" + text)
    assert ref.transport is Transport.DOCKER and ref.name is not None
    assert str(ref.name) == canonical
    assert ref.name.familiar() == familiar
    assert str(ref) == "docker://" + canonical
    assert parse_docker_name(familiar) == ref.name


@pytest.mark.parametrize(("text", "names"), [
    ("docker://", "docker://"),
    ("docker:busybox", "docker://NAME"),
    ("docker:", "docker://NAME"),
    ("docker://Busybox", "Busybox"),
    ("docker://library/BusyBox", "BusyBox"),
    ("docker://Team/app", "Team/app"),
    ("docker://example.com/Team/app", "example.com/Team/app"),
    ("docker://busybox:", "''"),
    ("docker://busybox:-1", "-1"),
    ("docker://busybox:.1", ".1"),
    ("docker://busybox:" + "t" * 129, "t" * 129),
    ("docker://busybox:t\u00e0g", "t\u00e0g"),
    ("docker://busybox:latest\n", "latest"),
    ("docker://busybox\n", "busybox"),
    ("docker://busybox@", "''"),
    ("docker://busybox@sha256:abc", "sha256:abc"),
    ("docker://busybox@sha512:" + "ab" * 64, "sha512"),
    ("docker://busybox@sha256:" + "AB" * 32, "AB" * 32),
    ("docker://busybox@" + DIGEST + "\n", DIGEST),
    ("docker://busybox@" + DIGEST + "@" + OTHER_DIGEST, "@"),
    ("docker://:latest", "''"),
    ("docker:///busybox", "/busybox"),
    ("docker://busybox/", "busybox/"),
    ("docker://a//b", "a//b"),
    ("docker://-a/b", "-a/b"),
    ("docker://a-/b", "a-/b"),
    ("docker://a_/b", "a_/b"),
    ("docker://example.com:/a", "example.com:/a"),
    ("docker://example.com:port/a", "example.com:port/a"),
    ("docker://[zz::1]:5000/a", "[zz::1]:5000/a"),
    ("docker://busy box", "busy box"),
    ("docker://" + "a" * 256, "255"),
    ("docker://example.com/" + "a/" * 130 + "b", "255"),
])
def test_docker_malformed(text: str, names: str) -> None:
    assert names in refused(text)


# -- transports ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "",
    "busybox",
    "busybox:latest",
    "./layout",
    "containers-storage:busybox",
    "dir:/tmp/x",
    "oci-archive:x.tar",
    "http://example.com/x",
    "OCI:layout",
    " oci:layout",
])
def test_unknown_or_missing_transport_lists_accepted_forms(text: str) -> None:
    message = refused(text)
    for form in ("oci:DIR", "docker-archive:PATH", "docker-daemon:NAME", "docker://"):
        assert form in message


def test_error_message_names_the_input() -> None:
    assert "'containers-storage'" in refused("containers-storage:busybox")
    assert "'busybox'" in refused("busybox")


# -- properties ----------------------------------------------------------------------------------------------

_COMPONENT = st.text(alphabet="ab0._-", min_size=1, max_size=6)
_HOST = st.sampled_from(["", "localhost/", "localhost:5000/", "example.com/", "EXAMPLE.com:443/", "[::1]:5000/",
                         "index.docker.io/", "docker.io/", "docker.io/library/", "a/", "Up/", "1.2.3.4/"])
_TAG = st.one_of(st.just(""), st.text(alphabet="aZ09_.-:\u00e9", min_size=0, max_size=8).map(lambda t: ":" + t))
_DIGEST_PART = st.one_of(st.just(""), st.sampled_from(["@" + DIGEST, "@sha256:ab", "@", "@" + DIGEST.upper()]))


@st.composite
def _docker_names(draw: st.DrawFn) -> str:
    path = "/".join(draw(st.lists(_COMPONENT, min_size=1, max_size=3)))
    return draw(_HOST) + path + draw(_TAG) + draw(_DIGEST_PART)


@st.composite
def _references(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["oci", "archive", "daemon", "docker", "junk"]))
    if kind == "oci":
        return "oci:" + draw(st.text(alphabet="ab/.:-_ \u00e9", max_size=10))
    if kind == "archive":
        rest = draw(st.one_of(st.just(""), _docker_names().map(lambda n: ":" + n),
                              st.text(alphabet="@0123456789\u00b2x-", max_size=4).map(lambda t: ":" + t)))
        return "docker-archive:" + draw(st.text(alphabet="ab/._", max_size=6)) + rest
    if kind == "daemon":
        return "docker-daemon:" + draw(st.one_of(_docker_names(), st.just(DIGEST), st.just("ab" * 32)))
    if kind == "docker":
        return "docker://" + draw(_docker_names())
    return draw(st.text(max_size=20))


@settings(max_examples=400, deadline=None, derandomize=True, database=None)  # the same examples every run
@given(st.one_of(_references(), st.text(max_size=40)))
@example("docker-daemon:index.docker.io/0.0/0")  # was shown as 0.0/0:latest, which names the registry 0.0
def test_parse_only_ever_raises_reference_error_and_round_trips(text: str) -> None:
    try:
        ref = parse_reference(text)
    except ReferenceError_ as exc:
        assert "\n" not in str(exc)
        return
    again = parse_reference(str(ref))
    assert again == ref, (text, str(ref))
    assert str(again) == str(ref)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(_docker_names())
def test_accepted_names_are_in_docker_grammar(text: str) -> None:
    try:
        name = parse_docker_name(text)
    except ReferenceError_:
        return
    allowed = set(string.ascii_lowercase + string.digits + "._-/")
    assert set(name.path) <= allowed, name
    assert name.tag is None or (name.tag.isascii() and len(name.tag) <= 128), name
    assert len(name.repository) <= 255
