"""The installer against a real Docker engine: worker containers on host networking talking to
a Mosquitto on 127.0.0.1, and (once the agent and coordinator exist) real jobs through them.

Skipped on a laptop without Docker; under CI a missing engine, agent or coordinator fails.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dockercomp.exits import Exit
from tests.support import Watcher, wait_until
from tests.support.brokers import BrokerProcess
from tests.support.coordinators import Coordinator
from tests.support.docker import (
    Installation,
    require_agent,
    require_coordinator,
    start_decoy,
)

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(900)]

PRESENCE = "dockercomp/workers/+/+/presence"
# Seconds for containers to start, connect and say online on a loaded 2-core CI machine.
ONLINE_TIMEOUT = 90.0
# Seconds for a 300-task job to finish, including a killed worker's will and reissue.
JOB_TIMEOUT = 240.0
# Seconds the test coordinator keeps a lost worker before purging it (production: minutes).
PURGE_AFTER = 5.0


@pytest.fixture
def installation(docker_client: Any, worker_image: str) -> Iterator[Installation]:
    found = Installation.new(docker_client)
    yield found
    found.remove_all()


@pytest.fixture
def decoy(docker_client: Any, worker_image: str) -> Iterator[Any]:
    container = start_decoy(docker_client, worker_image)
    yield container
    container.remove(force=True)


def up(inst: Installation, broker: BrokerProcess, workers: int, *extra: str) -> subprocess.CompletedProcess[str]:
    return inst.run("up", "--broker", broker.url, "--network", "host", "--workers", str(workers), "--cpus-per-worker", "1",
                    "--memory", "512m", "--grace", "15", *extra)


def presence_states(watcher: Watcher) -> dict[str, str]:
    """Latest presence state per worker id, from everything the watcher saw."""
    states: dict[str, str] = {}
    for message in watcher.messages:
        worker = message.topic.split("/")[3]
        try:
            states[worker] = json.loads(message.payload)["state"] if message.payload else "cleared"
        except (ValueError, KeyError, TypeError):
            continue
    return states


def wait_online(watcher: Watcher, ids: set[str], timeout: float = ONLINE_TIMEOUT) -> None:
    try:
        wait_until(lambda: all(presence_states(watcher).get(i) == "online" for i in ids), timeout=timeout, interval=0.2)
    except TimeoutError:
        pytest.fail(f"workers {sorted(ids)} not all online within {timeout} s; saw {presence_states(watcher)}",
                    pytrace=False)


# --- containers (need only Docker and the image) -------------------------------------------


def test_up_converges_to_n_labelled_limited_containers_and_rerun_changes_nothing(
    installation: Installation, mosquitto: BrokerProcess
) -> None:
    up(installation, mosquitto, 3)
    containers = installation.containers()
    assert [c.name for c in containers] == [f"dockercomp-{installation.name}-worker-{i}" for i in (1, 2, 3)]
    ids = {c.labels["org.dockercomp.worker-id"] for c in containers}
    assert len(ids) == 3
    for c in containers:
        host = c.attrs["HostConfig"]
        assert host["RestartPolicy"]["Name"] == "unless-stopped"
        assert host["NanoCpus"] == 1_000_000_000 and host["Memory"] == 512 * 1024 * 1024
        assert host["NetworkMode"] == "host"
        env = dict(item.split("=", 1) for item in c.attrs["Config"]["Env"])
        assert env["DOCKERCOMP_BROKER"] == mosquitto.url
        assert env["DOCKERCOMP_WORKER_ID"] == c.labels["org.dockercomp.worker-id"]
    rows = installation.status()
    assert {r["worker_id"] for r in rows} == ids

    again = up(installation, mosquitto, 3)
    assert "unchanged" in again.stdout
    assert [c.id for c in installation.containers()] == [c.id for c in containers]


def test_fewer_workers_drains_the_extra_and_down_leaves_other_containers(
    installation: Installation, mosquitto: BrokerProcess, decoy: Any
) -> None:
    up(installation, mosquitto, 3)
    first_two = [c.id for c in installation.containers()[:2]]
    result = up(installation, mosquitto, 2)
    assert "drained and removed" in result.stdout
    assert [c.id for c in installation.containers()] == first_two

    down = installation.run("down")
    assert "removed 2" in down.stdout
    assert installation.containers() == []
    decoy.reload()
    assert decoy.status == "running"


def test_status_and_logs_describe_the_workers(installation: Installation, mosquitto: BrokerProcess) -> None:
    up(installation, mosquitto, 1)
    (row,) = installation.status()
    assert row["slot"] == 1 and row["image"] == "dockercomp/worker:latest" and row["up_to_date"]
    wait_until(lambda: installation.run("logs", "1", "--tail", "20").stdout.strip(), timeout=30, interval=0.5)
    named = installation.run("logs", row["worker_id"], "--tail", "5", check=False)
    assert named.returncode == 0
    unknown = installation.run("logs", "no-such-worker", check=False)
    assert unknown.returncode == Exit.NOT_FOUND and "dockercomp installer status" in unknown.stderr


# --- workers online (need the agent) -------------------------------------------------------


def test_workers_come_online_become_healthy_and_say_offline_when_drained(
    installation: Installation, mosquitto: BrokerProcess, worker_image: str
) -> None:
    require_agent(worker_image)
    with Watcher(mosquitto.url, PRESENCE) as watcher:
        up(installation, mosquitto, 3)
        ids = {c.labels["org.dockercomp.worker-id"] for c in installation.containers()}
        wait_online(watcher, ids)
        wait_until(lambda: {r["health"] for r in installation.status()} == {"healthy"}, timeout=ONLINE_TIMEOUT,
                   interval=1)
        extra = installation.containers()[2].labels["org.dockercomp.worker-id"]
        up(installation, mosquitto, 2)
        # A drained worker leaves cleanly: an explicit offline, not a will after a SIGKILL.
        wait_until(lambda: presence_states(watcher).get(extra) == "offline", timeout=30)


def test_upgrade_replaces_workers_one_by_one_keeping_their_ids(
    installation: Installation, mosquitto: BrokerProcess, worker_image: str, docker_client: Any
) -> None:
    require_agent(worker_image)
    repository, _, _ = worker_image.rpartition(":")
    docker_client.images.get(worker_image).tag(repository, "upgrade-test")
    try:
        up(installation, mosquitto, 2)
        before = {c.labels["org.dockercomp.worker-id"]: c.id for c in installation.containers()}
        result = installation.run("upgrade", "--image", f"{repository}:upgrade-test", "--health-timeout", "120")
        assert "upgraded 2 worker(s)" in result.stdout
        after = {c.labels["org.dockercomp.worker-id"]: c for c in installation.containers()}
        assert set(after) == set(before)  # same workers to the coordinator...
        assert not {c.id for c in after.values()} & set(before.values())  # ...in new containers
        assert {c.attrs["Config"]["Image"] for c in after.values()} == {f"{repository}:upgrade-test"}
        assert {r["health"] for r in installation.status()} == {"healthy"}
    finally:
        installation.remove_all()
        docker_client.images.remove(f"{repository}:upgrade-test")


# --- jobs through containers (need the agent and the coordinator) ---------------------------


@pytest.fixture
def coordinator(mosquitto: BrokerProcess, tmp_path: Path) -> Iterator[Coordinator]:
    require_coordinator()
    found = Coordinator(mosquitto.url, tmp_path, purge_after=PURGE_AFTER)
    found.start()
    yield found
    found.stop()


def worker_name(result_worker: str) -> str:
    """Results name a worker as volunteer/worker or just worker; the id is the last part."""
    return result_worker.rsplit("/", 1)[-1]


def test_three_containers_complete_a_300_task_job_attributed_to_their_worker_ids(
    installation: Installation, mosquitto: BrokerProcess, worker_image: str, coordinator: Coordinator,
    tmp_path: Path,
) -> None:
    require_agent(worker_image)
    with Watcher(mosquitto.url, PRESENCE) as watcher:
        up(installation, mosquitto, 3)
        ids = {c.labels["org.dockercomp.worker-id"] for c in installation.containers()}
        wait_online(watcher, ids)
    job = coordinator.submit("add", [[i, 1000] for i in range(300)], tmp_path / "tasks.jsonl")
    wait_until(lambda: coordinator.progress(job)["finished"] >= 300, timeout=JOB_TIMEOUT, interval=1)

    results = coordinator.results(job)
    assert len(results) == 300
    assert all(r["state"] == "done" for r in results)
    assert sorted(r["value"] for r in results) == [i + 1000 for i in range(300)]
    assert {worker_name(r["worker"]) for r in results} <= ids


def test_a_killed_container_loses_nothing_and_its_worker_is_purged(
    installation: Installation, mosquitto: BrokerProcess, worker_image: str, coordinator: Coordinator,
    docker_client: Any, tmp_path: Path,
) -> None:
    require_agent(worker_image)
    with Watcher(mosquitto.url, PRESENCE) as watcher:
        up(installation, mosquitto, 3)
        containers = installation.containers()
        ids = {c.labels["org.dockercomp.worker-id"] for c in containers}
        wait_online(watcher, ids)
        # 300 short sleeps: long enough to kill a worker mid-job, short enough for CI.
        job = coordinator.submit("sleep", [[0.1] for _ in range(300)], tmp_path / "tasks.jsonl")
        wait_until(lambda: coordinator.progress(job)["finished"] >= 50, timeout=JOB_TIMEOUT, interval=0.5)

        victim = containers[0]
        victim_id = victim.labels["org.dockercomp.worker-id"]
        victim.kill()  # SIGKILL: no goodbye, only the broker's last will
        wait_until(lambda: presence_states(watcher).get(victim_id) == "offline", timeout=60, interval=0.2)

        wait_until(lambda: coordinator.progress(job)["finished"] >= 300, timeout=JOB_TIMEOUT, interval=1)
    results = coordinator.results(job)
    assert len(results) == 300 and all(r["state"] == "done" for r in results)
    assert len({r["task_id"] for r in results}) == 300
    assert any(r["attempts"] > 1 for r in results)  # what the victim held was sent again
    assert {worker_name(r["worker"]) for r in results} <= ids

    victim.reload()
    assert victim.status == "exited"  # `docker kill` is a manual stop: no restart

    def victim_state() -> str | None:
        return next((w["state"] for w in coordinator.workers() if w["name"] == victim_id), None)

    # Later, the coordinator purges the lost worker (the others stay online).
    wait_until(lambda: victim_state() in ("purged", None), timeout=PURGE_AFTER + 60, interval=1)
    assert {w["name"] for w in coordinator.workers() if w["state"] == "online"} == ids - {victim_id}
