"""docker-compose.yml: the scientist's stack (broker, coordinator, scalable workers).

Validated three ways: structurally here (always); by docker-compose itself in a fresh `git
clone` (`make system` installs Debian's docker-compose, which CI has: Debian's docker.io has no
`docker compose`); and by running the stack for real with --scale worker=2 and a job. Without
an image registry, Mosquitto is a local stand-in image of Debian's mosquitto
(tests/support/docker.py), put in place of eclipse-mosquitto:2.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dockercomp.broker.defaults import COMPOSE_BROKER_VARIABLES, COORDINATOR_ACCOUNT, DEFAULT_VOLUNTEER
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
    # Its account's broker URL, from the .env that `volunteers init` writes (no env_file: a
    # missing one fails `docker-compose config` on a fresh clone).
    assert "env_file" not in coordinator
    assert coordinator["environment"]["DOCKERCOMP_BROKER"].startswith(
        "${" + COMPOSE_BROKER_VARIABLES[COORDINATOR_ACCOUNT] + ":-")
    db = coordinator["environment"]["DOCKERCOMP_DB"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in coordinator["volumes"]}
    assert any(db.startswith(path + "/") for path in mounts)
    assert all(name in load()["volumes"] for name in mounts.values())


def test_each_service_runs_its_roles_image_built_from_the_dockerfile() -> None:
    # Volunteers' workers hold only the agent; the coordinator's database layer has its own image.
    services = load()["services"]
    assert services["coordinator"]["image"] == COORDINATOR_IMAGE
    assert services["worker"]["image"] == WORKER_IMAGE
    stages = re.findall(r"(?m)^FROM \S+ AS (\w+)", (REPO_ROOT / "Dockerfile").read_text())
    for name in ("coordinator", "worker"):
        build = services[name]["build"]
        assert build["context"] == "." and build["target"] == name and name in stages


def test_the_worker_service_can_be_scaled() -> None:
    worker = load()["services"]["worker"]
    # --scale needs replicas that differ: no fixed name, no host port, no shared worker id.
    assert "container_name" not in worker and "ports" not in worker
    assert "DOCKERCOMP_WORKER_ID" not in worker.get("environment", {})
    assert worker["environment"]["DOCKERCOMP_BROKER"].startswith(
        "${" + COMPOSE_BROKER_VARIABLES[DEFAULT_VOLUNTEER] + ":-")
    assert worker["restart"] == "unless-stopped"


def project_copy(directory: Path) -> Path:
    """The compose file and mosquitto.conf in `directory`, and nothing else (no .env)."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(COMPOSE_FILE, directory / "docker-compose.yml")
    shutil.copy(REPO_ROOT / "mosquitto.conf", directory / "mosquitto.conf")
    return directory / "docker-compose.yml"


def find_compose() -> list[str]:
    command = compose_command()
    require(command, "docker-compose or the `docker compose` plugin",
            "apt-get install docker-compose (or run `make system` as root)")
    assert command is not None
    return command


def test_compose_accepts_the_file_in_a_fresh_clone(tmp_path: Path) -> None:
    # A fresh clone has no .env and no broker-config/: `docker-compose config` failed there
    # ("Couldn't find env file") while the file named env_file entries.
    # What is cloned is the last commit: commit the compose file before trusting this test.
    command = find_compose()
    require((REPO_ROOT / ".git").exists(), "a git checkout of the repository", "run the tests in a git clone")
    clone = tmp_path / "clone"
    # safe.directory: CI may run as another user than the checkout's owner.
    cloned = subprocess.run(["git", "-c", "safe.directory=*", "clone", "-q", str(REPO_ROOT), str(clone)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert cloned.returncode == 0, cloned.stderr
    assert not (clone / ".env").exists() and not (clone / "broker-config").exists()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKERCOMP_", "COMPOSE_"))}
    result = subprocess.run([*command, "-f", "docker-compose.yml", "config"], cwd=clone, env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    services = subprocess.run([*command, "-f", "docker-compose.yml", "config", "--services"], cwd=clone, env=env,
                              capture_output=True, text=True, timeout=120, check=False)
    assert set(services.stdout.split()) == {"mosquitto", "coordinator", "worker"}


def test_compose_opts_the_plain_listener_into_its_private_network(tmp_path: Path) -> None:
    # mosquitto.conf binds 1883 to loopback; the stack's command runs the same file with only
    # that line changed. Run that command here, with `cat` in place of mosquitto.
    command = load()["services"]["mosquitto"]["command"]
    assert command[:2] == ["sh", "-c"]
    source = tmp_path / "mosquitto.conf"
    shutil.copy(REPO_ROOT / "mosquitto.conf", source)
    script = (command[2].replace("$$", "$")  # compose's escape for a literal $
              .replace("/mosquitto/config/mosquitto.conf", str(source))
              .replace("/tmp/mosquitto.conf", str(tmp_path / "out.conf"))
              .replace("exec mosquitto -c", "exec cat"))
    ran = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30, check=True)
    before, after = source.read_text().splitlines(), ran.stdout.splitlines()
    changed = [(old, new) for old, new in zip(before, after) if old != new]
    assert len(before) == len(after)
    assert changed == [("listener 1883 127.0.0.1", "listener 1883")]


def test_init_writes_the_variables_the_compose_file_reads(tmp_path: Path) -> None:
    config = tmp_path / "broker-config"
    made = dockercomp_command("coordinator", "volunteers", "init", "--dir", str(config))
    assert made.returncode == 0, made.stdout + made.stderr
    dotenv = tmp_path / ".env"
    assert dotenv.stat().st_mode & 0o077 == 0  # passwords: owner-only
    values = dict(line.split("=", 1) for line in dotenv.read_text().splitlines())
    for account, file in ((COORDINATOR_ACCOUNT, "coordinator.env"), (DEFAULT_VOLUNTEER, "worker.env")):
        assert "DOCKERCOMP_BROKER=" + values[COMPOSE_BROKER_VARIABLES[account]] + "\n" == (config / file).read_text()
    compose = COMPOSE_FILE.read_text()
    assert all("${" + name + ":-" in compose for name in values)


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
    # As the scientist does: accounts (and the .env docker-compose reads), then the certificate.
    for args in (["coordinator", "volunteers", "init", "--dir", str(config)],
                 ["broker", "certs", "init", "--dir", str(config), "--host", "localhost"]):
        made = dockercomp_command(*args)
        assert made.returncode == 0, made.stdout + made.stderr
    # The broker image that can be had here, and no published port (parallel runs, busy 8883).
    data = yaml.safe_load(compose_file.read_text())
    data["services"]["mosquitto"]["image"] = mosquitto_image(client)
    data["services"]["mosquitto"].pop("ports", None)
    for service in data["services"].values():  # built above; this copy has no build context
        service.pop("build", None)
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
