"""Pause, resume and idle-only mode (issue 12) over real brokers and real agent processes:
a paused worker announces itself first, hands back what it holds without using an attempt,
stays connected (no will), takes nothing until resumed; idle-only mode pauses and resumes
it from the host's load (injected through --load-file)."""

from __future__ import annotations

import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dockercomp.broker.messages import OfflineReason, Outcome, Presence, PresenceState, Result, Task
from dockercomp.broker.topics import Topics, WorkerRef
from dockercomp.coordinator.service import Coordinator
from dockercomp.coordinator.store import Store
from tests.support import Watcher, connect_client, wait_until
from tests.support.brokers import BrokerProcess
from tests.support import docker as docker_support
from tests.support.docker import Installation, build_worker_image, run_in_image
from tests.support.processes import FAST, Processes, finished, online

pytestmark = pytest.mark.timeout(120)
TOPICS = Topics()


def agent(procs: Processes, name: str, *options: str) -> subprocess.Popen[bytes]:
    return procs.start(name, ["dockercomp.agent.cli", "run", "--broker", str(procs.broker_url), "--worker-id", name,
                              "--concurrency", "2", "--keepalive", "2", "-v", *options])


def presences(watcher: Watcher) -> list[Presence]:
    return [Presence.decode(m.payload) for m in watcher.messages if m.payload]


def state_of(store: Store, key: str) -> str:
    return next((w.state for w in store.workers() if w.key == key), "")


def attempt_outcomes(store: Store, job_id: int) -> dict[str, int]:
    store.bind()
    return dict(store.db.execute_sql(
        "SELECT a.outcome, count(*) FROM attempt a JOIN task t ON t.id = a.task_id WHERE t.job_id = ? "
        "GROUP BY a.outcome", (job_id,)).fetchall())


def quiet_for(store: Store, key: str, job: object, seconds: float) -> tuple[int, int]:
    """(tasks held by `key`, tasks done) after watching for `seconds`; raises if it takes any."""
    done = store.progress(job).done
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert store.inflight().get(key, 0) == 0, f"{key} took work while paused"
        time.sleep(0.05)
    return store.inflight().get(key, 0), store.progress(job).done - done


def test_pause_mid_job_hands_back_without_attempts_and_no_will(
        engine: Coordinator, procs: Processes, broker: BrokerProcess) -> None:
    store = engine.store
    with Watcher(broker.url, TOPICS.presence(WorkerRef("local", "napper"))) as watcher:
        napper = agent(procs, "napper", "--grace", "0.3", "--prefetch", "4")
        online(store, 1)
        job = store.create_job("sleep", [[0.4]] * 30, timeout=30, max_attempts=1)
        # Running two and holding four more: both the queued and the running are handed back.
        wait_until(lambda: store.inflight().get("local/napper", 0) >= 6 and store.progress(job).done >= 2, timeout=30)

        napper.send_signal(signal.SIGUSR1)
        wait_until(lambda: state_of(store, "local/napper") == "paused", timeout=10)
        wait_until(lambda: store.inflight().get("local/napper", 0) == 0, timeout=10)
        held, done = quiet_for(store, "local/napper", job, 1.5)  # several dispatch rounds: nothing sent
        assert (held, done) == (0, 0)
        assert napper.poll() is None  # alive and connected all along

        napper.send_signal(signal.SIGUSR2)
        progress = finished(store, job, timeout=60)
        napper.send_signal(signal.SIGTERM)
        assert napper.wait(15) == 0

    assert (progress.done, progress.failed) == (30, 0), [r.errors for r in store.results(job) if r.state != "done"]
    outcomes = attempt_outcomes(store, job.id)
    assert outcomes.get("released", 0) >= 4 and set(outcomes) <= {"ok", "released"}, outcomes
    assert all(r.attempts >= 1 and r.worker == "local/napper" for r in store.results(job))
    seen = presences(watcher)
    states = [p.state for p in seen]
    assert PresenceState.PAUSED in states and states.index(PresenceState.PAUSED) < len(states) - 1
    assert states[states.index(PresenceState.PAUSED) + 1] is PresenceState.ONLINE  # resumed
    assert len({p.seq for p in seen}) == 1  # one connection all along: no reconnection, no will
    assert not [p for p in seen if p.reason is OfflineReason.LOST]
    assert [p.reason for p in seen if p.state is PresenceState.OFFLINE] == [OfflineReason.SHUTDOWN]
    log = procs.log("napper")
    assert "paused (asked)" in log and "resumed" in log


def test_a_paused_agent_answers_a_late_task_released_with_its_nonce(procs: Processes, broker: BrokerProcess) -> None:
    """A task sent before the coordinator saw `paused` is handed back unrun, and the answer
    carries the attempt's nonce (without it the coordinator rejects it as forged and the
    attempt expires, used)."""
    ref = WorkerRef("local", "late")
    with Watcher(broker.url, TOPICS.results(ref)) as results, Watcher(broker.url, TOPICS.presence(ref)) as seen:
        late = agent(procs, "late")
        seen.wait_for(lambda m: Presence.decode(m.payload).state is PresenceState.ONLINE)
        late.send_signal(signal.SIGUSR1)
        seen.wait_for(lambda m: Presence.decode(m.payload).state is PresenceState.PAUSED)
        client = connect_client(broker.url, "test-sender")
        try:
            task = Task("t-1", "j-1", 1, "sleep", [5], nonce="n0nce-of-attempt-1")
            client.publish(TOPICS.tasks(ref), task.encode(), qos=1).wait_for_publish(10)
            answer = Result.decode(results.wait_for(lambda m: True).payload)
        finally:
            client.disconnect()
    assert (answer.task_id, answer.outcome, answer.nonce) == ("t-1", Outcome.RELEASED, "n0nce-of-attempt-1")
    assert answer.error is not None and answer.error.type == "Paused"
    assert late.poll() is None


def test_a_pause_outlives_a_restart_with_a_pause_file(procs: Processes, broker: BrokerProcess, tmp_path: Path) -> None:
    """As a reboot restarts a worker container: paused before, paused after, until resumed."""
    marker = tmp_path / "paused"
    ref = WorkerRef("local", "sleeper")
    with Watcher(broker.url, TOPICS.presence(ref)) as seen:
        first = agent(procs, "sleeper", "--pause-file", str(marker))
        seen.wait_for(lambda m: Presence.decode(m.payload).state is PresenceState.ONLINE)
        first.send_signal(signal.SIGUSR1)
        seen.wait_for(lambda m: Presence.decode(m.payload).state is PresenceState.PAUSED)
        assert marker.exists()
        first.send_signal(signal.SIGTERM)
        assert first.wait(15) == 0
        again = agent(procs, "sleeper-2", "--pause-file", str(marker), "--worker-id", "sleeper")
        wait_until(lambda: len({p.seq for p in presences(seen)}) == 2, timeout=20)
        after = [p for p in presences(seen) if p.seq == max(q.seq for q in presences(seen))]
        assert after[0].state is PresenceState.PAUSED  # never announced online in between
        again.send_signal(signal.SIGUSR2)
        seen.wait_for(lambda m: (p := Presence.decode(m.payload)).seq == after[0].seq
                      and p.state is PresenceState.ONLINE)
    assert not marker.exists()


def test_idle_only_takes_nothing_above_the_threshold_and_computes_below(
        engine: Coordinator, procs: Processes, tmp_path: Path) -> None:
    store = engine.store
    load = tmp_path / "loadavg"
    load.write_text("3.00 2.50 2.00 3/400 4242\n")  # /proc/loadavg's format
    agent(procs, "idler", "--idle-only", "--max-load", "1.5", "--load-file", str(load))
    wait_until(lambda: state_of(store, "local/idler") == "paused", timeout=20)
    job = store.create_job("add", [[i, 1] for i in range(20)], timeout=30, max_attempts=1)
    assert quiet_for(store, "local/idler", job, 2.0) == (0, 0)

    load.write_text("0.20 1.00 1.50 1/400 4242\n")  # the volunteer went away: below 1.5 - 0.5
    progress = finished(store, job, timeout=30)  # one load sample later (5 s)
    assert (progress.done, progress.failed) == (20, 0)
    assert all(r.worker == "local/idler" for r in store.results(job))
    log = procs.log("idler")
    assert "paused (host load 3.00 above 1.5)" in log and "resumed: taking tasks again (host load 0.20)" in log


# --------------------------------------------------------------------------- in Docker
@pytest.fixture
def pause_image(docker_client: Any, worker_image: str) -> Iterator[str]:
    """The worker image with this checkout's agent, under a tag of this test's own: another
    checkout on this machine may rebuild dockercomp/worker:latest while the test runs."""
    for _ in range(2):
        image = docker_client.images.get(worker_image)
        if "--pause-file" in run_in_image(image.id, "agent", "run", "--help", entrypoint="dockercomp").stdout:
            break
        docker_support._built.pop(worker_image, None)  # replaced under us: build it again
        build_worker_image(worker_image)
    else:
        pytest.fail("the worker image has no pause support (`make image` rebuilds it)", pytrace=False)
    tag = f"dockercomp-test/worker:pause-{uuid.uuid4().hex[:8]}"
    image.tag(tag)
    yield tag
    docker_client.images.remove(tag, noprune=True)


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_installer_pause_and_resume_a_container_mid_job(
        docker_client: Any, pause_image: str, mosquitto: BrokerProcess, tmp_path: Path) -> None:
    """`installer pause` signals the agent in its container: the worker is paused at the
    coordinator, what it held comes back without using an attempt, the container keeps running
    and no will fires; `installer resume` and the max_attempts=1 job completes. A pause
    outlives a container restart."""
    inst = Installation.new(docker_client)
    engine = Coordinator.connect(mosquitto.url, str(tmp_path / "coordinator.db"), FAST).start()
    try:
        with Watcher(mosquitto.url, "dockercomp/workers/+/+/presence") as watcher:
            inst.run("up", "--broker", mosquitto.url, "--network", "host", "--workers", "1", "--image", pause_image,
                     "--concurrency", "2", "--grace", "1", "--memory", "512m")
            container = inst.containers()[0]
            key = f"local/{container.labels['org.dockercomp.worker-id']}"
            store = engine.store
            wait_until(lambda: state_of(store, key) == "online", timeout=90, interval=0.2)
            job = store.create_job("sleep", [[0.5]] * 24, timeout=30, max_attempts=1)
            wait_until(lambda: store.inflight().get(key, 0) >= 3 and store.progress(job).done >= 2, timeout=60)

            paused = inst.run("pause", "1").stdout
            assert f"{container.name}  worker {key.split('/')[1]}  paused" in paused, paused
            wait_until(lambda: state_of(store, key) == "paused" and store.inflight().get(key, 0) == 0, timeout=15)
            assert quiet_for(store, key, job, 1.5) == (0, 0)
            container.reload()
            assert container.status == "running"  # not docker-paused: its client keeps the connection

            assert "  resumed" in inst.run("resume").stdout
            progress = finished(store, job, timeout=120)
            seen = [p for p in presences(watcher) if p.worker == key.split("/")[1]]

            # A pause outlives a restart of the container (a reboot): it comes back paused.
            inst.run("pause")
            container.restart(timeout=15)
            wait_until(lambda: len({p.seq for p in presences(watcher) if p.worker == seen[0].worker}) == 2
                       and state_of(store, key) == "paused", timeout=90, interval=0.2)
            assert "  resumed" in inst.run("resume").stdout
            wait_until(lambda: state_of(store, key) == "online", timeout=15)
        assert (progress.done, progress.failed) == (24, 0)
        outcomes = attempt_outcomes(store, job.id)
        assert outcomes.get("released", 0) >= 1 and set(outcomes) <= {"ok", "released"}, outcomes
        assert [p.state for p in seen if p.state is not PresenceState.ONLINE] == [PresenceState.PAUSED]
        assert len({p.seq for p in seen}) == 1 and not [p for p in seen if p.reason is OfflineReason.LOST]
        restarted = [p for p in presences(watcher) if p.worker == seen[0].worker and p.seq != seen[0].seq]
        assert restarted[0].state is PresenceState.PAUSED  # not online for a moment after the restart
    finally:
        inst.remove_all()
        engine.stop()
