"""The test world: real services on private sockets and ports, and the fixture images in every form.

tests/conftest.py exposes these as session fixtures; this module holds the objects so that scripts and
benchmarks can use them too. Nothing here imports the converter: it is what the converter is judged against.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fixtures import NAMES, BuiltFixture, cached
from fixtures.catalog import EXTRA_NAMES
from fixtures.dockerd import DOCKER, PrivateDockerd, dockerd_unavailable, remove_tree


class WorldError(RuntimeError):
    """A service of the test world failed; the message carries the tool's own words."""


class CommandFailed(subprocess.CalledProcessError):
    def __str__(self) -> str:
        err = self.stderr if isinstance(self.stderr, str) else (self.stderr or b"").decode(errors="replace")
        return f"{super().__str__()}\n{err.strip()[-3000:]}"


def _run(argv: Sequence[str], *, env: Mapping[str, str] | None = None, check: bool = True,
         timeout: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), env=dict(env) if env is not None else None, capture_output=True, text=True,
                          errors="replace", stdin=subprocess.DEVNULL, check=False, timeout=timeout)
    if check and proc.returncode != 0:
        raise CommandFailed(proc.returncode, proc.args, proc.stdout, proc.stderr)
    return proc


@dataclass(frozen=True)
class RunResult:
    stdout: bytes
    stderr: bytes
    exit_code: int

    @property
    def out(self) -> str:
        return self.stdout.decode(errors="replace")

    @property
    def err(self) -> str:
        return self.stderr.decode(errors="replace")


class DockerWorld:
    """A private dockerd (vfs, no network) for the session. Start with `DockerWorld.start()`; `close()` ends it."""

    def __init__(self, daemon: PrivateDockerd) -> None:
        self.daemon = daemon
        self.host: str = daemon.host
        self.env: dict[str, str] = daemon.env
        self.root: Path = daemon.root
        self._client: Any = None
        self._exports = 0

    @classmethod
    def start(cls) -> DockerWorld:
        daemon = PrivateDockerd()
        try:
            daemon.start()
        except BaseException:
            daemon.close()
            raise
        return cls(daemon)

    @property
    def client(self) -> Any:
        """A docker SDK DockerClient on this daemon."""
        if self._client is None:
            import docker

            self._client = docker.DockerClient(base_url=self.host, timeout=600)
        return self._client

    def cli(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """/usr/bin/docker ARGS against this daemon (text output; CommandFailed shows stderr)."""
        return _run([DOCKER, *args], env=self.env, check=check, timeout=timeout)

    def run(self, image: str, args: Sequence[str] = (), *, hostname: str = "imgconv",
            entrypoint: str | Sequence[str] | None = None, env: Mapping[str, str] | Iterable[str] = (),
            user: str | None = None, timeout: float = 120) -> RunResult:
        """`docker run --rm --network none` with stdout and stderr kept apart. An entrypoint list is split
        as Docker needs it: the first word to --entrypoint, the rest before `args`. Docker's own failures
        (exit 125-127 with "docker: ..." on stderr) are returned like the workload's."""
        name = f"imgconv-run-{uuid.uuid4().hex[:12]}"
        argv = [DOCKER, "run", "--rm", "--name", name, "--network", "none", "--hostname", hostname]
        pairs = [f"{k}={v}" for k, v in env.items()] if isinstance(env, Mapping) else list(env)
        for pair in pairs:
            argv += ["--env", pair]
        if user is not None:
            argv += ["--user", user]
        words = list(args)
        if entrypoint is not None:
            first, *rest = [entrypoint] if isinstance(entrypoint, str) else list(entrypoint) or [""]
            argv += ["--entrypoint", first]
            words = rest + words
        argv += [image, *words]
        try:
            proc = subprocess.run(argv, env=self.env, capture_output=True, stdin=subprocess.DEVNULL,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            self.cli("rm", "-f", name, check=False)
            raise WorldError(f"docker run {image} did not finish in {timeout}s; stdout so far: {exc.stdout!r}") \
                from exc
        return RunResult(proc.stdout, proc.stderr, proc.returncode)

    def export(self, image: str, dest: Path | None = None) -> Path:
        """The filesystem of a created (never started) container of `image`, as `docker export` writes it."""
        if dest is None:
            self._exports += 1
            (self.root / "exports").mkdir(exist_ok=True)
            dest = self.root / "exports" / f"export-{self._exports}.tar"
        # a placeholder entrypoint lets images without Entrypoint/Cmd be created; it changes no file
        container = self.cli("create", "--network", "none", "--entrypoint", "/imgconv-export-placeholder",
                             image).stdout.strip()
        try:
            self.cli("export", "-o", str(dest), container)
        finally:
            self.cli("rm", "-f", container, check=False)
        return dest

    def load(self, archive: Path) -> str:
        """`docker load`; returns what Docker named the image (its tag, or its ID when untagged)."""
        out = self.cli("load", "-i", str(archive)).stdout
        loaded = [line.split(": ", 1)[1].strip() for line in out.splitlines() if line.startswith("Loaded image")]
        if not loaded:
            raise WorldError(f"docker load {archive} printed no image: {out!r}")
        return loaded[-1]

    def save(self, image: str, path: Path) -> Path:
        self.cli("save", "-o", str(path), image)
        return path

    def image_id(self, image: str) -> str | None:
        proc = self.cli("image", "inspect", "--format", "{{.Id}}", image, check=False)
        return proc.stdout.strip() if proc.returncode == 0 else None

    def ensure_loaded(self, built: BuiltFixture) -> None:
        if self.image_id(built.repo_tag) != built.image_id:
            self.load(built.archive)

    def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
        self.daemon.close()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Registry:
    """Debian's docker-registry (distribution 2.8) on 127.0.0.1:<free port>, plain HTTP, storage in a temp dir."""

    def __init__(self, root: Path, addr: str, proc: subprocess.Popen[bytes]) -> None:
        self.root, self.addr, self._proc = root, addr, proc

    @classmethod
    def start(cls, timeout: float = 30) -> Registry:
        binary = shutil.which("docker-registry")
        if binary is None:
            raise WorldError("docker-registry is not installed (Debian package docker-registry)")
        root = Path(tempfile.mkdtemp(prefix="imgconv-registry-"))
        for _attempt in range(3):  # the free port can be taken between probing and binding
            addr = f"127.0.0.1:{_free_port()}"
            config = root / "config.yml"
            config.write_text(
                "version: 0.1\n"
                "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
                f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n  delete:\n    enabled: true\n"
                f"http:\n  addr: {addr}\n  secret: imgconv-tests\n"
            )
            with open(root / "registry.log", "wb") as log:
                proc = subprocess.Popen([binary, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
            registry = cls(root, addr, proc)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and proc.poll() is None:
                with contextlib.suppress(OSError, urllib.error.URLError), \
                        urllib.request.urlopen(f"http://{addr}/v2/", timeout=2) as resp:
                    if resp.status == 200:
                        return registry
                time.sleep(0.1)
            registry.stop()
        log_text = (root / "registry.log").read_text(errors="replace")[-3000:]
        shutil.rmtree(root, ignore_errors=True)
        raise WorldError(f"docker-registry did not answer on /v2/:\n{log_text}")

    def ref(self, name: str, tag: str) -> str:
        return f"docker://{self.addr}/{name}:{tag}"

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass(frozen=True)
class FixtureImage:
    """A fixture image, loaded into the session's dockerd, with refs in containers-transports syntax."""

    name: str
    tag: str
    daemon_ref: str  # docker-daemon:imgconv-fixture/NAME:1
    archive: Path  # docker save format
    archive_ref: str  # docker-archive:PATH
    oci_dir: Path  # OCI image layout holding tag "1"
    oci_ref: str  # oci:DIR:1
    config: dict[str, Any]  # the OCI layout's image config
    built: BuiltFixture = field(repr=False)
    _pushed: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def repo_tag(self) -> str:
        """The name in the daemon (imgconv-fixture/NAME:1), for `docker run`."""
        return self.built.repo_tag

    @classmethod
    def of(cls, built: BuiltFixture) -> FixtureImage:
        return cls(
            name=built.name, tag=built.tag,
            daemon_ref=f"docker-daemon:{built.repo_tag}",
            archive=built.archive, archive_ref=f"docker-archive:{built.archive}",
            oci_dir=built.oci_dir, oci_ref=f"oci:{built.oci_dir}:{built.tag}",
            config=built.config, built=built,
        )

    def push(self, registry: Registry) -> str:
        """Copy the image (from its OCI layout) to `registry`; returns its docker:// ref."""
        ref = registry.ref(f"imgconv-fixture/{self.name}", self.tag)
        if self._pushed.get(registry.addr) != ref:
            _run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", self.oci_ref, ref])
            self._pushed[registry.addr] = ref
        return ref


class World:
    """Session state behind the pytest fixtures: each service starts on first use and stops in `close()`."""

    def __init__(self, *, require: bool) -> None:
        self.require = require  # in CI, a missing dockerd is a failure, not a skip
        self._docker: DockerWorld | None = None
        self._docker_error: BaseException | None = None
        self._registry: Registry | None = None
        self._images: dict[str, FixtureImage] = {}

    def docker_unavailable(self) -> str | None:
        return dockerd_unavailable()

    def docker(self) -> DockerWorld:
        if self._docker is None:
            if self._docker_error is not None:
                raise WorldError(f"the session's dockerd failed to start earlier: {self._docker_error}")
            try:
                self._docker = DockerWorld.start()
            except BaseException as exc:
                self._docker_error = exc
                raise
        return self._docker

    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = Registry.start()
        return self._registry

    def built(self, name: str) -> BuiltFixture:
        """The fixture on disk; a daemon is started only to build `debian` on a cache miss."""
        if name not in NAMES and name not in EXTRA_NAMES:
            raise KeyError(f"unknown fixture image {name!r}: one of {', '.join((*NAMES, *EXTRA_NAMES))}")
        return self._built_debian() if name == "debian" else cached(name)

    def _built_debian(self) -> BuiltFixture:
        from fixtures import cache_key, cache_root

        entry = cache_root() / "fixtures" / f"debian-{cache_key('debian')}"
        if (entry / "fixture.json").exists():
            return cached("debian")
        return cached("debian", docker_host=self.docker().host)

    def image(self, name: str) -> FixtureImage:
        """The fixture built and loaded into the session's dockerd."""
        if name not in self._images:
            built = self.built(name)
            self.docker().ensure_loaded(built)
            self._images[name] = FixtureImage.of(built)
        return self._images[name]

    def close(self) -> None:
        errors = []
        for service in (self._registry, self._docker):
            if service is not None:
                try:
                    service.close()
                except Exception as exc:
                    errors.append(exc)
        self._registry = self._docker = None
        if errors:
            raise WorldError(f"stopping the test world: {errors}")


def require_world() -> bool:
    """True where the world must run (CI, or IMGCONV_REQUIRE_WORLD=1): missing tools fail instead of skip."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes") or os.environ.get("IMGCONV_REQUIRE_WORLD") == "1"


__all__ = ["CommandFailed", "DockerWorld", "FixtureImage", "Registry", "RunResult", "World", "WorldError",
           "remove_tree", "require_world"]
