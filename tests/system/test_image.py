"""The worker image: what it runs, as whom, how it is configured, and how it is extended.

Built from this checkout by scripts/build-image.sh (the same as `make image`), offline: with
no image registry the base is a Debian made locally with debootstrap, once per machine.
"""

from __future__ import annotations

import re
import subprocess
import time
from typing import Any

import pytest

from tests.support.docker import (
    REPO_ROOT,
    build_worker_image,
    connect_docker,
    require_agent,
    run_in_image,
)

# The first test that needs the image may build it, base included (minutes on a fresh machine).
pytestmark = pytest.mark.timeout(900)

DOCKERFILE = (REPO_ROOT / "Dockerfile").read_text()


@pytest.fixture(scope="module")
def docker_client() -> Any:
    return connect_docker()


@pytest.fixture(scope="module")
def worker_image(docker_client: Any) -> str:
    return build_worker_image()


def test_the_base_image_is_a_build_argument_defaulting_to_official_slim_python() -> None:
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", DOCKERFILE, re.MULTILINE)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", DOCKERFILE, re.MULTILINE)


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
def test_image_holds_the_whole_package_and_its_commands(worker_image: str) -> None:
    check = run_in_image(worker_image, "-c", "import agent, broker, coordinator, installer, paho.mqtt, peewee",
                         entrypoint="python")
    assert check.returncode == 0, check.stderr
    for command in ("agent", "coordinator", "broker", "installer"):
        found = run_in_image(worker_image, command, entrypoint="which")
        assert found.returncode == 0 and found.stdout.startswith("/opt/dockercomp/bin/"), command


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
    result = run_in_image(worker_image, "check", entrypoint="agent")
    assert result.returncode != 0


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
