"""docker-compose.yml: the scientist's stack (broker, coordinator, scalable workers).

Validated three ways: structurally here (always); by docker-compose / `docker compose` itself
(`make system` installs Debian's docker-compose as root); and by running the stack for real
with --scale worker=2 and a job. Without an image registry, Mosquitto is a local stand-in
image of Debian's mosquitto (tests/support/docker.py), put in place of eclipse-mosquitto:2.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import require, wait_until
from tests.support.docker import (
    COORDINATOR_IMAGE,
    REPO_ROOT,
    WORKER_IMAGE,
    build_coordinator_image,
    build_worker_image,
    compose_command,
    connect_docker,
    mosquitto_image,
)

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"


def load() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return data


def test_the_broker_uses_the_repository_config_and_keeps_its_data() -> None:
    mosquitto = load()["services"]["mosquitto"]
    assert "./mosquitto.conf:/mosquitto/config/mosquitto.conf:ro" in mosquitto["volumes"]
    data_volume = next(v for v in mosquitto["volumes"] if v.endswith(":/mosquitto/data"))
    assert data_volume.split(":")[0] in load()["volumes"]  # a named volume, not the container's layer
    # The volume is where mosquitto.conf persists to; its accounts and certificates are mounted.
    conf = (REPO_ROOT / "mosquitto.conf").read_text()
    assert "persistence_location /mosquitto/data/" in conf
    if "/mosquitto/security/" in conf:
        assert "./broker-config:/mosquitto/security:ro" in mosquitto["volumes"]


def test_the_coordinator_keeps_its_database_in_a_volume_and_talks_to_the_broker() -> None:
    coordinator = load()["services"]["coordinator"]
    assert coordinator["entrypoint"] == ["dockercomp", "coordinator", "serve"]
    assert coordinator["env_file"] == "broker-config/coordinator.env"  # its account's broker URL
    db = coordinator["environment"]["DOCKERCOMP_DB"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in coordinator["volumes"]}
    assert any(db.startswith(path + "/") for path in mounts)
    assert all(name in load()["volumes"] for name in mounts.values())


def test_each_service_runs_its_roles_image() -> None:
    # Volunteers' workers hold only the agent; the coordinator's database layer has its own image.
    services = load()["services"]
    assert services["coordinator"]["image"] == COORDINATOR_IMAGE
    assert services["worker"]["image"] == WORKER_IMAGE


def test_the_worker_service_can_be_scaled() -> None:
    worker = load()["services"]["worker"]
    # --scale needs replicas that differ: no fixed name, no host port, no shared worker id.
    assert "container_name" not in worker and "ports" not in worker
    assert "DOCKERCOMP_WORKER_ID" not in worker.get("environment", {})
    assert worker["env_file"] == "broker-config/worker.env"
    assert worker["restart"] == "unless-stopped"


def project_copy(directory: Path) -> Path:
    """The compose file and mosquitto.conf in `directory`, with the .env files that
    `dockercomp coordinator volunteers init` writes stubbed (docker-compose refuses missing env files)."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(COMPOSE_FILE, directory / "docker-compose.yml")
    shutil.copy(REPO_ROOT / "mosquitto.conf", directory / "mosquitto.conf")
    config = directory / "broker-config"
    config.mkdir(exist_ok=True)
    for name in ("coordinator.env", "worker.env"):
        if not (config / name).exists():
            (config / name).write_text("DOCKERCOMP_BROKER=mqtt://mosquitto:1883\n")
    return directory / "docker-compose.yml"


def find_compose() -> list[str]:
    command = compose_command()
    require(command, "docker-compose or the `docker compose` plugin",
            "apt-get install docker-compose (or run `make system` as root)")
    assert command is not None
    return command


def test_compose_itself_accepts_the_file(tmp_path: Path) -> None:
    command = find_compose()
    compose_file = project_copy(tmp_path)
    result = subprocess.run([*command, "-f", str(compose_file), "config", "-q"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    services = subprocess.run([*command, "-f", str(compose_file), "config", "--services"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120, check=False)
    assert set(services.stdout.split()) == {"mosquitto", "coordinator", "worker"}


# --- the stack for real ---------------------------------------------------------------------


class Stack:
    """One compose project in a temporary directory, removed with its volumes afterwards."""

    def __init__(self, command: list[str], compose_file: Path) -> None:
        self.command = command
        self.compose_file = compose_file
        self.project = f"dctest{uuid.uuid4().hex[:8]}"

    def run(self, *args: str, stdin: str | None = None, timeout: float = 300) -> str:
        result = subprocess.run([*self.command, "-p", self.project, "-f", str(self.compose_file), *args],
                                cwd=self.compose_file.parent, input=stdin, capture_output=True, text=True,
                                timeout=timeout, check=False)
        assert result.returncode == 0, f"compose {' '.join(args)}: {result.stdout}\n{result.stderr}"
        return result.stdout

    def coordinator(self, *args: str, stdin: str | None = None) -> Any:
        return json.loads(self.run("exec", "-T", "coordinator", "dockercomp", "coordinator", *args, "--json", stdin=stdin))


def dockercomp_command(*args: str) -> subprocess.CompletedProcess[str]:
    """`dockercomp ARGS` as the scientist runs it, from the repository."""
    return subprocess.run([sys.executable, "-m", "dockercomp", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120, check=False)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    command = find_compose()
    client = connect_docker()
    build_worker_image()
    build_coordinator_image()
    compose_file = project_copy(tmp_path / "project")
    config = compose_file.parent / "broker-config"
    if "/mosquitto/security/" in (REPO_ROOT / "mosquitto.conf").read_text():
        require(dockercomp_command("coordinator", "volunteers", "--help").returncode == 0,
                "`dockercomp coordinator volunteers` and `dockercomp broker certs`", "finish the running-in-public issue")
        for name in ("coordinator.env", "worker.env"):
            (config / name).unlink()
        for args in (["coordinator", "volunteers", "init", "--dir", str(config)],
                     ["broker", "certs", "init", "--dir", str(config), "--host", "localhost"]):
            made = dockercomp_command(*args)
            assert made.returncode == 0, made.stdout + made.stderr
    # The broker image that can be had here, and no published port (parallel runs, busy 8883).
    data = yaml.safe_load(compose_file.read_text())
    data["services"]["mosquitto"]["image"] = mosquitto_image(client)
    data["services"]["mosquitto"].pop("ports", None)
    compose_file.write_text(yaml.safe_dump(data))
    found = Stack(command, compose_file)
    try:
        yield found
    finally:
        subprocess.run([*command, "-p", found.project, "-f", str(compose_file), "down", "-v", "--timeout", "5"],
                       cwd=compose_file.parent, capture_output=True, timeout=300, check=False)


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_stack_scales_workers_and_completes_a_job(stack: Stack) -> None:
    stack.run("up", "-d", "--scale", "worker=2")
    hostnames = {
        c.attrs["Config"]["Hostname"]
        for c in connect_docker().containers.list(filters={"label": [
            f"com.docker.compose.project={stack.project}", "com.docker.compose.service=worker"]})
    }
    assert len(hostnames) == 2

    def online() -> set[str]:
        return {w["name"] for w in stack.coordinator("workers") if w["state"] == "online"}

    wait_until(lambda: online() == hostnames, timeout=120, interval=1)
    job = stack.coordinator("submit", "add", "-", stdin="".join(f"[{i}, 1]\n" for i in range(40)))["job_id"]
    wait_until(lambda: stack.coordinator("status", str(job))["finished"] == 40, timeout=120, interval=1)
    rows = [json.loads(line) for line in
            stack.run("exec", "-T", "coordinator", "dockercomp", "coordinator", "results", str(job), "--format", "jsonl").splitlines()]
    assert sorted(r["value"] for r in rows) == [i + 1 for i in range(40)]
    assert {r["worker"].rsplit("/", 1)[-1] for r in rows} <= hostnames
