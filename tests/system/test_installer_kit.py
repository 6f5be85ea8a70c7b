"""The volunteer's one line, end to end, against real Docker on loopback.

The scientist builds and serves a kit; `volunteers add` prints the line; the line runs in a
fresh container made from the project's debootstrap base (plus curl), standing in for a
volunteer's machine, with the host's Docker socket (and static docker CLI) and host
networking. The workers it starts must come online at a coordinator on a TLS Mosquitto and
compute a job; a tampered download must be refused; --uninstall must leave nothing of its own.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dockercomp.broker.processes import free_port
from tests.support import REPO_ROOT, wait_until
from tests.support.coordinators import Coordinator
from tests.support.docker import (
    INSTANCE_LABEL,
    build_installer_image,
    require_agent,
    require_coordinator,
    volunteer_image,
)
from tests.support.security import SecureBroker

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(900)]

# Seconds for the workers to start, connect and be seen online by the coordinator.
ONLINE_TIMEOUT = 120.0
# Seconds for a small job to finish through two workers.
JOB_TIMEOUT = 180.0
HOME = "/root/.local/share/dockercomp"  # install_me.sh's files in the volunteer's container


def dockercomp(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dockercomp", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)


@dataclass
class Volunteer:
    """A fresh machine: a long-running container the test runs the one line in (docker exec)."""

    container: str
    instance: str

    def sh(self, command: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["docker", "exec", self.container, "sh", "-c", command], capture_output=True, text=True,
                              timeout=timeout, check=False)


@pytest.fixture
def volunteer(docker_client: Any) -> Iterator[Volunteer]:
    image = volunteer_image(docker_client)
    docker_cli = shutil.which("docker")
    assert docker_cli is not None
    name, instance = f"volunteer-{uuid.uuid4().hex[:8]}", f"kit{uuid.uuid4().hex[:8]}"
    subprocess.run(["docker", "run", "-d", "--name", name, "--network", "host",
                    "-v", "/var/run/docker.sock:/var/run/docker.sock",
                    # The engine's own CLI (a static binary): Docker "is installed" on this machine.
                    "-v", f"{Path(docker_cli).resolve()}:/usr/local/bin/docker:ro",
                    "-e", f"DOCKERCOMP_INSTANCE={instance}", image, "sleep", "3600"],
                   check=True, capture_output=True, timeout=120)
    yield Volunteer(name, instance)
    subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=120, check=False)
    for container in docker_client.containers.list(all=True, filters={"label": f"{INSTANCE_LABEL}={instance}"}):
        container.remove(force=True)


@dataclass
class Served:
    directory: Path
    url: str
    info: dict[str, Any]


@pytest.fixture
def kit(secure_mosquitto: SecureBroker, worker_image: str, docker_client: Any) -> Iterator[Served]:
    """`kit build` into the broker's config directory, and `kit serve` on a loopback port."""
    build_installer_image()
    config = secure_mosquitto.accounts.directory
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    built = dockercomp("coordinator", "kit", "build", "--dir", str(config), "--url", url, "--json")
    assert built.returncode == 0, built.stderr
    info = json.loads(built.stdout)
    server = subprocess.Popen([sys.executable, "-m", "dockercomp", "coordinator", "kit", "serve", "--dir",
                               str(config / "kit"), "--port", str(port)], cwd=REPO_ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stderr is not None
        assert "serving" in server.stderr.readline()
        yield Served(config / "kit", f"http://127.0.0.1:{port}", info)
    finally:
        server.terminate()
        server.wait(30)
        for image in (info["worker_image"], info["installer_image"]):
            subprocess.run(["docker", "image", "rm", image], capture_output=True, timeout=60, check=False)


def one_line(secure: SecureBroker, name: str) -> str:
    """The line `volunteers add NAME` prints, for the TLS listener on loopback."""
    added = dockercomp("coordinator", "volunteers", "add", name, "--dir", str(secure.accounts.directory),
                       "--host", "127.0.0.1", "--port", str(secure.process.tls_port),
                       "--pid-file", str(secure.process.pid_file))
    assert added.returncode == 0, added.stderr
    return added.stdout.strip().splitlines()[-1]


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as stream:
        stream.seek(offset)
        byte = stream.read(1)
        stream.seek(offset)
        stream.write(bytes([byte[0] ^ 0xFF]))


def kit_images_present(served: Served) -> list[str]:
    return [image for image in (served.info["worker_image"], served.info["installer_image"])
            if subprocess.run(["docker", "image", "inspect", image], capture_output=True, check=False).returncode == 0]


def test_the_printed_line_installs_workers_that_compute_and_uninstall_leaves_nothing(
    secure_mosquitto: SecureBroker, kit: Served, volunteer: Volunteer, docker_client: Any, worker_image: str,
    tmp_path: Path,
) -> None:
    require_agent(worker_image)
    require_coordinator()
    line = one_line(secure_mosquitto, "alice")
    assert line.startswith(f"curl -fsSL {kit.url}/install_me.sh | sh -s -- --kit-sha256 {kit.info['sha256']} ")
    password = line.split("mqtts://alice:", 1)[1].split("@", 1)[0]
    assert password and kit_images_present(kit) == []  # kit build took its tags away again

    # A tampered image archive is refused before Docker loads anything from it.
    archive = kit.directory / "images.tar.gz"
    flip_byte(archive, 4096)
    refused = volunteer.sh(line + " --workers 2")
    assert refused.returncode == 13, refused.stdout + refused.stderr
    assert "images.tar.gz" in refused.stderr and "refused" in refused.stderr
    assert kit_images_present(kit) == [] and volunteer_containers(docker_client, volunteer) == []
    assert volunteer.sh(f"test -e {HOME}").returncode == 1  # nothing of a refused kit stays
    flip_byte(archive, 4096)
    # A SHA256SUMS rewritten to match a changed file is refused too: the line pins SHA256SUMS.
    sums = kit.directory / "SHA256SUMS"
    original = sums.read_text()
    (kit.directory / "kit.env").write_text((kit.directory / "kit.env").read_text() + "KIT_VERSION=2\n")
    changed = hashlib.sha256((kit.directory / "kit.env").read_bytes()).hexdigest()
    sums.write_text("".join(f"{changed}  kit.env\n" if l.endswith("  kit.env") else l + "\n"
                            for l in original.splitlines()))
    refused = volunteer.sh(line + " --workers 2")
    assert refused.returncode == 13 and "SHA256SUMS" in refused.stderr, refused.stderr
    sums.write_text(original)
    (kit.directory / "kit.env").write_text((kit.directory / "kit.env").read_text().replace("KIT_VERSION=2\n", ""))

    coordinator = Coordinator(secure_mosquitto.url(secure_mosquitto.coordinator), tmp_path)
    coordinator.start()
    try:
        installed = volunteer.sh(line + " --workers 2")
        output = installed.stdout + installed.stderr
        assert installed.returncode == 0, output
        assert password not in output
        # Nothing the installer wrote holds the password.
        assert volunteer.sh(f"grep -rl '{password}' {HOME}").stdout == ""
        containers = volunteer_containers(docker_client, volunteer)
        assert len(containers) == 2
        ids = {c.labels["org.dockercomp.worker-id"] for c in containers}
        for c in containers:
            host = c.attrs["HostConfig"]
            assert host["CpuShares"] == 128 and host["NetworkMode"] == "host"

        # Safe to run again: the images are here, the same containers stay.
        again = volunteer.sh(line + " --workers 2")
        assert again.returncode == 0 and "unchanged" in again.stdout, again.stdout + again.stderr
        assert [c.id for c in volunteer_containers(docker_client, volunteer)] == [c.id for c in containers]

        def online() -> set[str]:
            return {w["name"] for w in coordinator.workers() if w["state"] == "online"}

        wait_until(lambda: ids <= online(), timeout=ONLINE_TIMEOUT, interval=1)
        job = coordinator.submit("add", [[i, 1000] for i in range(20)], tmp_path / "tasks.jsonl")
        wait_until(lambda: coordinator.progress(job)["finished"] >= 20, timeout=JOB_TIMEOUT, interval=1)
        results = coordinator.results(job)
        assert sorted(r["value"] for r in results) == [i + 1000 for i in range(20)]
        assert {r["worker"].rsplit("/", 1)[-1] for r in results} <= ids

        # The volunteer's view, through the command the installer left behind: the coordinator's
        # counters (retained, published every few seconds), Docker's CPU and memory figures ...
        def status() -> list[dict[str, Any]]:
            shown = volunteer.sh(f"{HOME}/bin/dockercomp installer status --json")
            assert shown.returncode == 0, shown.stderr
            rows: list[dict[str, Any]] = json.loads(shown.stdout)
            return rows

        wait_until(lambda: sum(row["tasks_done"] or 0 for row in status()) == 20, timeout=60, interval=2)
        rows = status()
        assert {row["worker_id"] for row in rows} == ids
        assert all(row["tasks_failed"] == 0 and row["cpu_percent"] is not None and row["memory_bytes"] > 0
                   for row in rows), rows
        table = volunteer.sh(f"{HOME}/bin/dockercomp installer status")
        assert all(i in table.stdout for i in ids), table.stdout + table.stderr
        # ... and a line per task in the logs, at the agents' default level.
        logs = volunteer.sh(f"{HOME}/bin/dockercomp installer logs")
        finished = {line.split("task ", 1)[1].split()[0] for line in logs.stdout.splitlines() if "finished: ok" in line}
        assert len(finished) == 20, logs.stdout[-3000:]
        assert password not in logs.stdout + logs.stderr
    finally:
        coordinator.stop()

    gone = volunteer.sh(f"curl -fsSL {kit.url}/install_me.sh | sh -s -- --uninstall")
    assert gone.returncode == 0, gone.stdout + gone.stderr
    assert volunteer_containers(docker_client, volunteer) == []
    assert kit_images_present(kit) == []
    assert volunteer.sh(f"test -e {HOME}").returncode == 1
    # Only its own: the images it found here stay (the shared worker image is one of them).
    docker_client.images.get(worker_image)
    # No installer run (docker run --rm) is left either.
    assert docker_client.containers.list(all=True, filters={"ancestor": build_installer_image()}) == []


def volunteer_containers(docker_client: Any, volunteer: Volunteer) -> list[Any]:
    return docker_client.containers.list(all=True, filters={"label": f"{INSTANCE_LABEL}={volunteer.instance}"})
