"""Docker for the tests: the real engine (fixtures) and an in-memory twin (FakeDocker).

Real-engine helpers skip on a laptop without Docker and fail under CI (tests.support.require).
Test modules wrap them in thin fixtures of their own: importing fixtures by name trips
linters (F811), and registering this module as a plugin after a test module imported it
defeats pytest's assertion rewriting.

FakeDocker implements just the part of the Docker SDK the installer calls, so the converge,
drain and ownership logic is tested in milliseconds without an engine.
"""

from __future__ import annotations

import builtins
import itertools
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from tests.support import REPO_ROOT, missing, require

# The images `make image` builds; the tests use the very same ones.
WORKER_IMAGE = "dockercomp/worker:latest"
COORDINATOR_IMAGE = "dockercomp/coordinator:latest"
INSTALLER_IMAGE = "dockercomp/installer:latest"
# Seconds the image build may take: a first build also debootstraps the base (~1 min).
IMAGE_BUILD_TIMEOUT = 900
# Label the installer puts on its containers: the tests clean up by it.
INSTANCE_LABEL = "org.dockercomp.instance"

# Made once per test process: the client, and the images already built (or found current).
_client: list[Any] = []
_built: dict[str, str] = {}


# --- the real engine ---------------------------------------------------------------------


def connect_docker() -> Any:
    """A docker.DockerClient that answers, or skip (laptop) / fail (CI)."""
    if _client:
        return _client[0]
    try:
        import docker
    except ImportError:
        missing("the docker Python package", "pip install -e '.[test]' (or `make venv`)")
    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except docker.errors.DockerException as exc:
        missing(f"a Docker engine ({str(exc).splitlines()[0][:120]})",
                "run `make system` as root (installs and starts docker.io), or start Docker")
    _client.append(client)
    return client


def build_worker_image(image: str = WORKER_IMAGE, role: str = "worker") -> str:
    """scripts/build-image.sh with this interpreter's pip; a no-op when the image is current."""
    if image in _built:
        return _built[image]
    env = dict(os.environ, PYTHON=sys.executable, ROLE=role)
    try:
        result = subprocess.run(
            ["sh", "scripts/build-image.sh", image], cwd=REPO_ROOT, env=env,
            capture_output=True, text=True, timeout=IMAGE_BUILD_TIMEOUT, check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"building {image} took more than {IMAGE_BUILD_TIMEOUT} s", pytrace=False)
    if result.returncode != 0:
        pytest.fail(f"scripts/build-image.sh failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}", pytrace=False)
    _built[image] = image
    return image


def build_coordinator_image() -> str:
    """The coordinator's image (the Dockerfile's `coordinator` stage), as docker-compose.yml runs it."""
    return build_worker_image(COORDINATOR_IMAGE, role="coordinator")


def build_installer_image() -> str:
    """The installer's image (the Dockerfile's `installer` stage), which install_me.sh runs."""
    return build_worker_image(INSTALLER_IMAGE, role="installer")


# A fresh volunteer machine: the project's debootstrap base plus curl (the one line needs it).
VOLUNTEER_IMAGE = "dockercomp-test/volunteer:bookworm"
_VOLUNTEER_DOCKERFILE = """\
FROM {base}
RUN apt-get update -qq \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends curl >/dev/null \\
 && rm -rf /var/lib/apt/lists/*
"""
LOCAL_BASE = "dockercomp-base:bookworm"


def volunteer_image(client: Any) -> str:
    """VOLUNTEER_IMAGE, built once per machine FROM the debootstrap base (scripts/build-base-image.sh)."""
    if _present(client, VOLUNTEER_IMAGE):
        return VOLUNTEER_IMAGE
    if not _present(client, LOCAL_BASE):
        base = subprocess.run(["sh", "scripts/build-base-image.sh", LOCAL_BASE], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=IMAGE_BUILD_TIMEOUT, check=False)
        if base.returncode != 0:
            pytest.fail(f"building {LOCAL_BASE} failed:\n{base.stdout[-2000:]}\n{base.stderr[-2000:]}", pytrace=False)
    return build_from_dockerfile(VOLUNTEER_IMAGE, _VOLUNTEER_DOCKERFILE.format(base=LOCAL_BASE))


def build_from_dockerfile(tag: str, dockerfile: str) -> str:
    """`docker build -t TAG -` of a Dockerfile given as text (no context), or fail the test."""
    result = subprocess.run(["docker", "build", "-q", "-t", tag, "-"], input=dockerfile, capture_output=True,
                            text=True, timeout=600, check=False)
    if result.returncode != 0:
        pytest.fail(f"building {tag} failed:\n{result.stderr[-2000:]}", pytrace=False)
    return tag


def run_in_image(image: str, *command: str, entrypoint: str = "", timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`docker run --rm` of a one-off command in `image` (entrypoint replaced when given)."""
    args = ["docker", "run", "--rm", "--network", "host"]
    if entrypoint:
        args += ["--entrypoint", entrypoint]
    return subprocess.run([*args, image, *command], capture_output=True, text=True, timeout=timeout, check=False)


def agent_runs_in(image: str) -> bool:
    """True when the image's agent CLI starts (it is being written alongside this issue)."""
    return run_in_image(image, "agent", "run", "--help", entrypoint="dockercomp", timeout=60).returncode == 0


def coordinator_cli_works() -> bool:
    """True when `dockercomp coordinator serve` exists in this checkout."""
    result = subprocess.run([sys.executable, "-m", "dockercomp.coordinator", "serve", "--help"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False)
    return result.returncode == 0


def require_agent(image: str) -> None:
    require(agent_runs_in(image), "the agent CLI in the worker image (`dockercomp agent run`)",
            "finish the agent issue, then rebuild with `make image`")


def require_coordinator() -> None:
    require(coordinator_cli_works(), "the coordinator CLI (`dockercomp coordinator serve`)",
            "finish the coordinator issue")


@dataclass
class Installation:
    """One installer instance used by a test: its name, environment and cleanup."""

    name: str
    env: dict[str, str]
    client: Any

    def run(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`python -m installer ARGS` for this instance; fails the test on a non-zero exit if check."""
        result = subprocess.run([sys.executable, "-m", "dockercomp.installer", *args], cwd=REPO_ROOT, env=self.env,
                                capture_output=True, text=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            pytest.fail(f"installer {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}",
                        pytrace=False)
        return result

    def containers(self) -> list[Any]:
        return sorted(self.client.containers.list(all=True, filters={"label": f"{INSTANCE_LABEL}={self.name}"}),
                      key=lambda c: c.name)

    def status(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = json.loads(self.run("status", "--json").stdout)
        return rows

    def remove_all(self) -> None:
        for container in self.containers():
            container.remove(force=True)

    @classmethod
    def new(cls, client: Any) -> Installation:
        """An instance of its own, so a developer's real workers are never touched."""
        name = f"test{uuid.uuid4().hex[:8]}"
        return cls(name, dict(os.environ, DOCKERCOMP_INSTANCE=name), client)


def start_decoy(client: Any, image: str) -> Any:
    """A running container that is not the installer's, though it looks like a worker."""
    return client.containers.run(
        image, entrypoint=["sleep", "3600"], detach=True, name=f"decoy-{uuid.uuid4().hex[:8]}",
        labels={"org.dockercomp.role": "worker", "org.dockercomp.slot": "1"}, network_mode="host",
    )


# Mosquitto for the compose stack: the official image when it can be had, else a stand-in.
OFFICIAL_MOSQUITTO = "eclipse-mosquitto:2"
STAND_IN_MOSQUITTO = "dockercomp-test/mosquitto:local"
_STAND_IN_DOCKERFILE = """\
FROM {base}
RUN apt-get update -qq \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mosquitto >/dev/null \\
 && rm -rf /var/lib/apt/lists/* \\
 && install -d -o mosquitto -g mosquitto /mosquitto/config /mosquitto/data
CMD ["mosquitto", "-c", "/mosquitto/config/mosquitto.conf"]
"""


def mosquitto_image(client: Any) -> str:
    """eclipse-mosquitto:2 if present or pullable; else Debian's mosquitto in a local image.

    The stand-in gets its own name so it never poses as the official image outside tests.
    Like the official one it starts as root and Mosquitto drops to its `mosquitto` user.
    """
    import docker.errors

    for name in (OFFICIAL_MOSQUITTO, STAND_IN_MOSQUITTO):
        try:
            client.images.get(name)
            return name
        except docker.errors.ImageNotFound:
            pass
    try:
        client.images.pull(OFFICIAL_MOSQUITTO)
        return OFFICIAL_MOSQUITTO
    except docker.errors.DockerException:
        pass
    base = next((b for b in ("dockercomp-base:bookworm", "python:3.11-slim") if _present(client, b)), None)
    if base is None:
        pytest.fail("no Debian base image to build a Mosquitto stand-in from (build the worker image first)",
                    pytrace=False)
    return build_from_dockerfile(STAND_IN_MOSQUITTO, _STAND_IN_DOCKERFILE.format(base=base))


def _present(client: Any, name: str) -> bool:
    import docker.errors

    try:
        client.images.get(name)
        return True
    except docker.errors.ImageNotFound:
        return False


def compose_command() -> list[str] | None:
    """docker-compose (Debian's package) or the `docker compose` plugin, whichever exists."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"],
                                                 capture_output=True, check=False).returncode == 0:
        return ["docker", "compose"]
    return None


# --- the in-memory twin --------------------------------------------------------------------


def _api_error(status: int, message: str) -> Exception:
    import docker.errors

    response = SimpleNamespace(status_code=status, reason=message, url="fake://docker")
    error: Exception = docker.errors.APIError(message, response=response, explanation=message)
    return error


@dataclass
class FakeImage:
    id: str
    tags: list[str]


class FakeContainer:
    """A container record; state changes are recorded in the client's `calls`."""

    def __init__(self, client: FakeDocker, name: str, image: str, labels: dict[str, str],
                 environment: dict[str, str], host_config: dict[str, Any], stop_timeout: int | None) -> None:
        self.client = client
        # Hex like a real id, but never starting with a digit: `installer logs 2` matches slot 2 or
        # an id starting with "2", so a random id made the CLI tests fail 1 run in 16.
        self.id = "c" + (uuid.uuid4().hex * 2)[1:]
        self.short_id = self.id[:12]
        self.name = name
        self.image_name = image
        self.image_id = client.images.get(image).id
        self.labels = dict(labels)
        self.environment = dict(environment)
        self.host_config = host_config
        self.stop_timeout = stop_timeout
        self.status = "created"
        self.health: str | None = None
        self.files: dict[str, bytes] = {}  # path -> content, from put_archive

    @property
    def attrs(self) -> dict[str, Any]:
        state: dict[str, Any] = {"Status": self.status, "StartedAt": "2026-01-01T00:00:00Z"}
        if self.health is not None:
            state["Health"] = {"Status": self.health}
        return {
            "Id": self.id, "Name": f"/{self.name}", "Image": self.image_id, "RestartCount": 0,
            "Config": {"Image": self.image_name, "Labels": self.labels,
                       "Env": [f"{k}={v}" for k, v in self.environment.items()], "StopTimeout": self.stop_timeout},
            "HostConfig": self.host_config, "State": state,
        }

    def start(self) -> None:
        self.client.calls.append(("start", self.name))
        self.status = "running"
        self.health = self.client.health_after_start(self)

    def stop(self, timeout: int | None = None) -> None:
        self.client.calls.append(("stop", self.name, timeout))
        self.status = "exited"

    def remove(self, force: bool = False) -> None:
        self.client.calls.append(("remove", self.name))
        self.client.containers.records.pop(self.id, None)

    def reload(self) -> None:
        pass

    def put_archive(self, path: str, data: bytes) -> bool:
        import io
        import tarfile

        self.client.calls.append(("put_archive", self.name, path))
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar.getmembers():
                extracted = tar.extractfile(member)
                assert extracted is not None
                self.files[f"{path.rstrip('/')}/{member.name}"] = extracted.read()
        return True

    def logs(self, stream: bool = False, follow: bool = False, tail: Any = "all") -> Any:
        data = [f"{self.name} says hello\n".encode()]
        return iter(data) if stream else b"".join(data)


@dataclass
class FakeContainers:
    client: FakeDocker
    records: dict[str, FakeContainer] = field(default_factory=dict)

    def list(self, all: bool = False, filters: dict[str, Any] | None = None) -> list[FakeContainer]:
        wanted = (filters or {}).get("label", [])
        wanted = [wanted] if isinstance(wanted, str) else wanted
        found = []
        for c in self.records.values():
            if not all and c.status != "running":
                continue
            if builtins.all(c.labels.get(k) == v for k, _, v in (w.partition("=") for w in wanted)):
                found.append(c)
        return found

    def get(self, ref: str) -> FakeContainer:
        for c in self.records.values():
            if ref in (c.id, c.name):
                return c
        import docker.errors

        raise docker.errors.NotFound(f"no container {ref}")

    def add_foreign(self, name: str, labels: dict[str, str] | None = None, image: str = "other:latest") -> FakeContainer:
        """A running container someone else made (never to be touched by the installer)."""
        if image not in self.client.images.records:
            self.client.images.add(image)
        container = FakeContainer(self.client, name, image, labels or {}, {}, {}, None)
        container.status = "running"
        self.records[container.id] = container
        return container


@dataclass
class FakeImages:
    records: dict[str, FakeImage] = field(default_factory=dict)
    pullable: set[str] = field(default_factory=set)
    _ids: Iterator[int] = field(default_factory=itertools.count)

    def add(self, name: str) -> FakeImage:
        image = FakeImage(f"sha256:{next(self._ids):064x}", [name])
        self.records[name] = image
        return image

    def get(self, name: str) -> FakeImage:
        import docker.errors

        if name not in self.records:
            raise docker.errors.ImageNotFound(f"no such image {name}")
        return self.records[name]

    def pull(self, name: str) -> FakeImage:
        if name not in self.pullable:
            raise _api_error(404, f"pull access denied for {name}")
        return self.add(name)


class FakeAPI:
    def __init__(self, client: FakeDocker) -> None:
        self.client = client

    def create_host_config(self, **kwargs: Any) -> dict[str, Any]:
        return dict(kwargs)

    def create_container(self, image: str, name: str, labels: dict[str, str], environment: dict[str, str],
                         host_config: dict[str, Any], stop_timeout: int | None = None) -> dict[str, str]:
        if any(c.name == name for c in self.client.containers.records.values()):
            raise _api_error(409, f"Conflict. The container name /{name} is already in use")
        self.client.images.get(image)
        container = FakeContainer(self.client, name, image, labels, environment, host_config, stop_timeout)
        self.client.containers.records[container.id] = container
        self.client.calls.append(("create", name))
        return {"Id": container.id}


class FakeDocker:
    """The slice of docker.DockerClient the installer uses, in memory.

    `health_after_start(container)` decides the health a started container reports (None
    for an image without HEALTHCHECK); tests replace it to simulate a broken image.
    """

    def __init__(self, cpus: int = 4, images: tuple[str, ...] = ("dockercomp/worker:latest",)) -> None:
        self.cpus = cpus
        self.calls: list[tuple[Any, ...]] = []
        self.images = FakeImages()
        for name in images:
            self.images.add(name)
        self.containers = FakeContainers(self)
        self.api = FakeAPI(self)
        self.health_after_start: Callable[[FakeContainer], str | None] = lambda c: "healthy"

    def ping(self) -> bool:
        return True

    def info(self) -> dict[str, Any]:
        return {"NCPU": self.cpus}


# Fixtures for the Docker tests (a plugin of tests/conftest.py): one engine client and one
# built worker image per module.
@pytest.fixture(scope="module")
def docker_client() -> Any:
    return connect_docker()


@pytest.fixture(scope="module")
def worker_image(docker_client: Any) -> str:
    return build_worker_image()
