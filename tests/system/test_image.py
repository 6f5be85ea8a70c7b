"""The images: the worker (what it runs, as whom, how it is configured, how it is extended, and
that it holds only the agent's packages) and the coordinator's image for docker-compose.yml.

Built from this checkout by scripts/build-image.sh (the same as `make image`), offline: with
no image registry the base is a Debian made locally with debootstrap, once per machine.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import wait_until
from tests.support.brokers import BrokerProcess
from tests.support.docker import (
    REPO_ROOT,
    build_coordinator_image,
    require_agent,
    run_in_image,
)

# The first test that needs the image may build it, base included (minutes on a fresh machine).
pytestmark = pytest.mark.timeout(900)

DOCKERFILE = (REPO_ROOT / "Dockerfile").read_text()
# The other roles' packages: a volunteer's container holds none of them.
ROLE_ONLY_PACKAGES = ("amqtt", "peewee", "cryptography", "rich", "docker", "psycopg2", "PIL", "prometheus_client")


@pytest.fixture(scope="module")
def coordinator_image(docker_client: Any) -> str:
    return build_coordinator_image()


def installed_packages(image: str) -> set[str]:
    listed = run_in_image(image, "-m", "pip", "list", "--format", "json", entrypoint="python")
    assert listed.returncode == 0, listed.stderr
    return {row["name"].lower() for row in json.loads(listed.stdout)}


def test_the_base_image_is_a_build_argument_defaulting_to_official_slim_python() -> None:
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", DOCKERFILE, re.MULTILINE)
    assert re.search(r"^FROM \$\{BASE_IMAGE\} AS base$", DOCKERFILE, re.MULTILINE)
    assert set(re.findall(r"^FROM base AS (\w+)$", DOCKERFILE, re.MULTILINE)) == {"worker", "installer", "coordinator"}


def test_the_build_installs_only_from_local_wheels() -> None:
    # No index at build time: works offline and behind TLS-intercepting proxies.
    assert "--no-index --find-links /tmp/wheels" in DOCKERFILE


@pytest.mark.docker
@pytest.mark.timeout(900)
def test_image_runs_the_agent_as_a_non_root_user_with_a_healthcheck(docker_client: Any, worker_image: str) -> None:
    config = docker_client.images.get(worker_image).attrs["Config"]
    assert config["Entrypoint"] == ["dockercomp", "agent", "run"]
    assert config["Healthcheck"]["Test"] == ["CMD", "dockercomp", "agent", "check"]
    assert config["User"] == "dockercomp"
    uid = run_in_image(worker_image, "-u", entrypoint="id")
    assert uid.returncode == 0 and uid.stdout.strip() != "0"
    # Configuration is the environment only: nothing about a broker is baked in.
    assert not any(e.startswith("DOCKERCOMP_") for e in config["Env"])


@pytest.mark.docker
@pytest.mark.timeout(900)
def test_the_worker_image_holds_only_the_agents_packages(worker_image: str) -> None:
    installed = installed_packages(worker_image)
    assert {"dockercomp", "paho-mqtt", "click"} <= installed
    assert installed & {"amqtt", "peewee", "cryptography", "rich", "docker", "psycopg2-binary", "pillow",
                         "prometheus_client"} == set()
    # Nothing importable under those names either (e.g. shipped by the base image's Python)
    probe = run_in_image(worker_image, "-c", "import importlib.util as u, dockercomp.agent.cli\n"
                         f"print([p for p in {ROLE_ONLY_PACKAGES!r} if u.find_spec(p)])", entrypoint="python")
    assert probe.returncode == 0 and probe.stdout.strip() == "[]", probe.stdout + probe.stderr
    # The other roles answer with the extra that adds them, not a traceback
    coordinator = run_in_image(worker_image, "coordinator", "status", entrypoint="dockercomp")
    assert coordinator.returncode == 2 and "pip install 'dockercomp[coordinator]'" in coordinator.stderr
    functions = run_in_image(worker_image, "agent", "functions", entrypoint="dockercomp")
    assert functions.returncode == 0 and functions.stdout.startswith("7 task functions"), functions.stderr


@pytest.mark.docker
@pytest.mark.timeout(900)
def test_the_coordinator_image_serves_with_its_database_drivers(docker_client: Any, coordinator_image: str) -> None:
    assert {"dockercomp", "peewee", "rich", "cryptography", "amqtt", "psycopg2-binary"} <= installed_packages(
        coordinator_image)
    config = docker_client.images.get(coordinator_image).attrs["Config"]
    assert config["Entrypoint"] == ["dockercomp", "coordinator", "serve"]
    assert config["User"] == "dockercomp" and not config.get("Healthcheck")
    # Where docker-compose.yml mounts its database volume, owned by the non-root user
    owner = run_in_image(coordinator_image, "-c", "%U", "/var/lib/dockercomp", entrypoint="stat")
    assert owner.stdout.strip() == "dockercomp", owner.stderr
    helped = run_in_image(coordinator_image, "--help")
    assert helped.returncode == 0 and "--broker" in helped.stdout, helped.stderr


@pytest.fixture
def worker_container(worker_image: str, mosquitto: BrokerProcess) -> Iterator[str]:
    require_agent(worker_image)
    name = f"dctest-worker-{uuid.uuid4().hex[:8]}"
    started = subprocess.run(
        ["docker", "run", "-d", "--name", name, "--network", "host", "-e", f"DOCKERCOMP_BROKER={mosquitto.url}",
         "-e", "DOCKERCOMP_WORKER_ID=imagetest", "-e", "DOCKERCOMP_CONCURRENCY=1", worker_image],
        capture_output=True, text=True, timeout=120, check=False)
    assert started.returncode == 0, started.stderr
    try:
        yield name
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60, check=False)


def inspect(name: str, template: str) -> str:
    return subprocess.run(["docker", "inspect", "--format", template, name], capture_output=True, text=True,
                          timeout=30, check=False).stdout.strip()


@pytest.mark.docker
@pytest.mark.timeout(900)
def test_the_entrypoint_runs_an_agent_that_docker_reports_healthy(worker_container: str) -> None:
    # Given the image run as is, with only the broker's URL in its environment
    def health() -> str:
        status = inspect(worker_container, "{{.State.Status}} {{.State.Health.Status}}")
        assert status.split()[0] == "running", subprocess.run(["docker", "logs", worker_container],
                                                              capture_output=True, text=True).stderr[-2000:]
        return status.split()[-1]

    # Then the healthcheck (`dockercomp agent check`, first run after one interval) says healthy
    wait_until(lambda: health() == "healthy", timeout=90, interval=1)
    checked = subprocess.run(["docker", "exec", worker_container, "dockercomp", "agent", "check"],
                             capture_output=True, text=True, timeout=60, check=False)
    assert checked.returncode == 0 and "healthy" in checked.stdout and "imagetest" in checked.stdout
    # And `docker stop` (SIGTERM) drains the agent to a clean exit
    stopped = subprocess.run(["docker", "stop", "-t", "30", worker_container], capture_output=True, timeout=60,
                             check=False)
    assert stopped.returncode == 0
    assert inspect(worker_container, "{{.State.ExitCode}}") == "0"


@pytest.mark.docker
@pytest.mark.timeout(900)
def test_a_second_build_of_unchanged_sources_is_skipped(worker_image: str) -> None:
    def build() -> subprocess.CompletedProcess[str]:
        return subprocess.run(["sh", "scripts/build-image.sh", worker_image], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=600, check=False)

    # Current with the sources as they are now (they may have changed since the session's
    # build in a checkout being edited); then building again must be a quick no-op.
    assert build().returncode == 0
    started = time.monotonic()
    result = build()
    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stdout
    assert time.monotonic() - started < 30


@pytest.mark.docker
@pytest.mark.timeout(900)
def test_agent_check_fails_when_no_agent_runs(worker_image: str) -> None:
    require_agent(worker_image)
    result = run_in_image(worker_image, "agent", "check", entrypoint="dockercomp")
    assert result.returncode == 1 and "no health file" in result.stderr, result.stdout + result.stderr


@pytest.mark.docker
@pytest.mark.timeout(900)
def test_a_two_line_dockerfile_adds_a_scientists_task_package(docker_client: Any, worker_image: str) -> None:
    example = REPO_ROOT / "examples" / "custom-tasks"
    lines = [line for line in (example / "Dockerfile").read_text().splitlines() if line.strip()]
    assert len(lines) <= 2 and lines[-1] == f"FROM {worker_image}"
    tag = "dockercomp/example-tasks:test"
    built = subprocess.run(["docker", "build", "-q", "-t", tag, str(example)], capture_output=True, text=True,
                           timeout=300, check=False)
    assert built.returncode == 0, built.stderr
    try:
        probe = run_in_image(tag, "-c", (
            "from importlib.metadata import entry_points\n"
            "eps = {e.name: e.load() for e in entry_points(group='dockercomp.tasks')}\n"
            "print(eps['collatz_steps'](27), eps['word_count']('a b a')['a'], 'add' in eps)\n"
        ), entrypoint="python")
        assert probe.returncode == 0, probe.stderr
        assert probe.stdout.split() == ["111", "2", "True"]
        assert docker_client.images.get(tag).attrs["Config"]["User"] == "dockercomp"
    finally:
        docker_client.images.remove(tag, force=True)
