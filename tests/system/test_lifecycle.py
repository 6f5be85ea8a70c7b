"""A worker's life cycle as the coordinator sees it, over real brokers and real agent
processes: a clean shutdown hands its work back without using attempts (issue 10, item 1),
and a worker that died unseen is found out by a rebirth request (item 2).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from dockercomp.broker.connection import MqttConnection
from dockercomp.broker.messages import Presence, PresenceState, Rebirth
from dockercomp.broker.settings import BrokerSettings
from dockercomp.broker.topics import Topics, WorkerRef
from dockercomp.coordinator.service import Coordinator, CoordinatorSettings
from dockercomp.coordinator.store import Store
from tests.support import Watcher, connect_client, wait_until
from tests.support.agents import FakeAgent
from tests.support.brokers import BrokerProcess
from tests.support.processes import Processes, finished, online

pytestmark = pytest.mark.timeout(120)
TOPICS = Topics()


def agent(procs: Processes, name: str, *options: str) -> subprocess.Popen[bytes]:
    return procs.start(name, ["dockercomp.agent.cli", "run", "--broker", str(procs.broker_url), "--worker-id", name,
                              "--concurrency", "2", "--keepalive", "2", "-v", *options])


def attempt_outcomes(store: Store, job_id: int) -> dict[str, int]:
    store.bind()
    return dict(store.db.execute_sql(
        "SELECT a.outcome, count(*) FROM attempt a JOIN task t ON t.id = a.task_id WHERE t.job_id = ? "
        "GROUP BY a.outcome", (job_id,)).fetchall())


def test_a_clean_shutdown_mid_job_uses_no_attempt(engine: Coordinator, procs: Processes, broker: BrokerProcess) -> None:
    """The field report's run: `--grace 0.3`, `--max-attempts 1`, SIGTERM mid-job. The tasks
    killed at the end of the grace period, the prefetched ones and any sent while it drained
    all go back unused; another agent does them all."""
    store = engine.store
    victim = agent(procs, "victim", "--grace", "0.3", "--prefetch", "4")
    online(store, 1)
    job = store.create_job("sleep", [[0.4]] * 40, timeout=30, max_attempts=1)
    # Running two and holding four more: each kind of handing back happens.
    wait_until(lambda: store.inflight().get("local/victim", 0) >= 6 and store.progress(job).done >= 2, timeout=30)
    agent(procs, "heir")
    online(store, 2)

    victim.send_signal(signal.SIGTERM)
    assert victim.wait(15) == 0
    progress = finished(store, job, timeout=60)

    assert (progress.done, progress.failed) == (40, 0), [r.errors for r in store.results(job) if r.state != "done"]
    outcomes = attempt_outcomes(store, job.id)
    assert outcomes.get("released", 0) >= 4, outcomes  # the running and the prefetched ones came back
    assert set(outcomes) <= {"ok", "released"}, outcomes
    workers = {w.key: w for w in store.workers()}
    assert workers["local/victim"].state == "offline" and workers["local/victim"].tasks_failed == 0
    assert "draining" in procs.log("victim")
    results = list(store.results(job))
    assert all(r.attempts >= 1 for r in results)
    assert sum(r.worker == "local/heir" for r in results) >= 1, [(r.worker, r.attempts, r.errors) for r in results]


# --------------------------------------------------------------------------- zombies (item 2)
REBIRTH = CoordinatorSettings(lease_margin=2, lease_check=0.1, purge_after=600, purge_check=0.2, poll_interval=0.2,
                              status_interval=0.2, connect_timeout=10, rebirth_timeout=6)


@pytest.fixture
def coordinator_settings() -> CoordinatorSettings:
    """For the `engine` fixture: fast leases, a short rebirth bound, no purge during the test."""
    return REBIRTH


def attempts_of(store: Store, worker_key: str, since: float) -> int:
    store.bind()
    return store.db.execute_sql(
        "SELECT count(*) FROM attempt a JOIN worker w ON w.id = a.worker_id WHERE w.key = ? AND a.sent_at > ?",
        (worker_key, since)).fetchone()[0]


def test_a_worker_that_died_with_the_broker_down_is_not_a_zombie(
        engine: Coordinator, procs: Processes, broker: BrokerProcess) -> None:
    """The field report's run: the broker stops (Mosquitto saves its retained messages), one
    agent dies while it is down (no will can fire), the broker comes back with that agent's
    retained `online` presence (amqtt: with none). The coordinator asks every worker to
    announce itself; the dead one does not answer and is marked lost within the bound, gets
    no attempt meanwhile, and every task is done by the live one."""
    store = engine.store
    procs.agent("live")
    procs.agent("zombie")
    online(store, 2)
    job = store.create_job("sleep", [[0.2]] * 30, timeout=20)
    wait_until(lambda: store.progress(job).done >= 4 and store.inflight().get("local/zombie", 0) > 0, timeout=30)

    if broker.persistent:
        # Mosquitto writes its database on SIGUSR1, as its autosave would: the zombie's online
        # presence is in it. Then a crash (SIGKILL; a clean stop would publish every will).
        os.kill(broker.pid, signal.SIGUSR1)  # type: ignore[arg-type]
        wait_until(lambda: "Saving in-memory database" in broker.log(), timeout=10)
        # The line is logged before the file is written: a SIGKILL right after it can cut the
        # write short on a loaded machine. Wait for the file to be complete (its size settled).
        saved = Path(re.search(r"Saving in-memory database to (\S+)\.", broker.log()).group(1))  # type: ignore[union-attr]
        sizes: list[int] = []
        wait_until(lambda: saved.exists() and (sizes.append(saved.stat().st_size) or
                                               (len(sizes) > 2 and sizes[-1] == sizes[-3] > 0)), timeout=10)
    broker.kill()
    procs.kill("zombie")
    broker.start()
    restarted = time.time()
    if broker.persistent:  # the stale proof of life the coordinator must not believe
        with Watcher(broker.url, TOPICS.presence(WorkerRef("local", "zombie"))) as watcher:
            stale = Presence.decode(watcher.wait_for(lambda m: bool(m.payload)).payload)
        assert stale.state is PresenceState.ONLINE

    wait_until(lambda: {w.key: w.state for w in store.workers()}["local/zombie"] == "lost",
               timeout=REBIRTH.rebirth_timeout + 15)
    progress = finished(store, job, timeout=60)

    assert (progress.done, progress.failed) == (30, 0)
    assert attempts_of(store, "local/zombie", restarted) == 0  # no attempt fed to the dead worker
    assert {w.key: w.state for w in store.workers()}["local/live"] == "online"


def test_an_agent_answers_a_rebirth_request_with_its_presence(procs: Processes, broker: BrokerProcess) -> None:
    presence_topic = TOPICS.presence(WorkerRef("local", "w1"))
    with Watcher(broker.url, presence_topic) as watcher:
        agent(procs, "w1")
        first = Presence.decode(watcher.wait_for(lambda m: bool(m.payload)).payload)
        client = connect_client(broker.url)
        try:
            # Addressed to another worker: no answer. Then to everyone: the same presence again.
            client.publish(TOPICS.coordinator_rebirth, Rebirth(("local/other",)).encode(), qos=1).wait_for_publish(5)
            client.publish(TOPICS.coordinator_rebirth, Rebirth().encode(), qos=1).wait_for_publish(5)
            wait_until(lambda: len(watcher.messages) >= 2, timeout=10)
        finally:
            client.disconnect()
            client.loop_stop()
        time.sleep(0.3)  # room for a wrong extra answer to arrive
        answers = [Presence.decode(m.payload) for m in watcher.messages]
    assert [(p.state, p.seq) for p in answers] == [(PresenceState.ONLINE, first.seq)] * 2
    assert "answered a rebirth request" in procs.log("w1")


def test_a_worker_whose_lease_expired_gets_no_work_until_it_shows_life(
        engine: Coordinator, broker: BrokerProcess) -> None:
    """A worker that takes tasks and never answers (dead without a will, as after a broker
    restart) is not fed attempt after attempt: after its first lease expires it is asked to
    show life, gets nothing meanwhile, and is lost when it stays silent."""
    store = engine.store
    made: list[FakeAgent] = []

    def fake(name: str, **kwargs: object) -> FakeAgent:
        transport = MqttConnection(BrokerSettings.from_url(broker.url), f"fake-{name}")
        made.append(FakeAgent(transport, name, capacity=1, functions=("add",), **kwargs).start())  # type: ignore[arg-type]
        return made[-1]

    try:
        mute = fake("mute", auto=False, rebirth=False)
        online(store, 1)
        job = store.create_job("add", [[1, 2]], timeout=0.5, max_attempts=3)
        wait_until(lambda: {w.key: w.state for w in store.workers()}["local/mute"] == "lost",
                   timeout=REBIRTH.rebirth_timeout + 15)
        fake("helper")
        progress = finished(store, job, timeout=30)
    finally:
        for agent in made:
            agent.transport.close(1)

    assert (progress.done, progress.failed) == (1, 0)
    assert [task.attempt for task in mute.received] == [1]  # one lease lost to it, not three
    [row] = list(store.results(job))
    assert row.worker == "local/helper" and [e["outcome"] for e in row.errors] == ["expired"]
