"""The coordinator when things go wrong, over real brokers, a real SQLite file and real
processes: a killed agent, a stale will, a killed coordinator, a restarted broker, hanging
tasks, and results that must be rejected.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dockercomp.broker.connection import MqttConnection
from dockercomp.broker.messages import Outcome, Presence, PresenceState, OfflineReason, Result, TaskError, decode_status
from dockercomp.broker.settings import BrokerSettings
from dockercomp.broker.topics import Topics, WorkerRef
from dockercomp.coordinator.service import Coordinator, CoordinatorSettings
from dockercomp.coordinator.sqlstore import Worker
from dockercomp.coordinator.store import Store
from tests.support import Watcher, abandon, connect_client, wait_until
from tests.support.agents import FakeAgent, closing_fakes
from tests.support.brokers import BrokerProcess
from tests.support.processes import Processes, finished, online

TOPICS = Topics()
pytestmark = pytest.mark.timeout(120)

SETTINGS = CoordinatorSettings(lease_margin=1, lease_check=0.1, purge_after=1.0, purge_check=0.2,
                               poll_interval=0.2, status_interval=0.2, connect_timeout=10)


@pytest.fixture
def coordinator_settings() -> CoordinatorSettings:
    """For the `engine` fixture: leases end 1 s after their timeout."""
    return SETTINGS


@pytest.fixture
def fakes(broker: BrokerProcess) -> Iterator[list[FakeAgent]]:
    """Protocol-speaking test workers on real connections (closed afterwards)."""
    yield from closing_fakes()


def fake(fakes: list[FakeAgent], broker: BrokerProcess, worker: str, client_id: str | None = None,
         **kwargs: object) -> FakeAgent:
    transport = MqttConnection(BrokerSettings.from_url(broker.url), client_id or f"fake-{worker}")
    agent = FakeAgent(transport, worker, **kwargs).start()  # type: ignore[arg-type]
    fakes.append(agent)
    return agent


def counts_per_attempt_outcome(store: Store) -> dict[str, int]:
    store.bind()
    return dict(store.db.execute_sql("SELECT outcome, count(*) FROM attempt GROUP BY outcome").fetchall())


def exactly_one_accepted_result_each(store: Store, job) -> None:  # noqa: ANN001
    store.bind()
    total = store.progress(job).total
    per_task = store.db.execute_sql(
        "SELECT t.id, (SELECT count(*) FROM result r WHERE r.task_id = t.id),"
        " (SELECT count(*) FROM attempt a WHERE a.task_id = t.id AND a.outcome = 'ok')"
        " FROM task t WHERE t.job_id = ?", (job.id,)).fetchall()
    assert len(per_task) == total
    assert all(results == 1 and ok == 1 for _, results, ok in per_task), per_task
    assert sum(w.tasks_done for w in store.workers()) == total


# --------------------------------------------------------------------------- a killed agent
def test_killed_agent_tasks_are_reissued_on_its_will_then_it_is_purged(
        engine: Coordinator, procs: Processes, broker: BrokerProcess) -> None:
    store = engine.store
    for name in ("w0", "w1", "w2"):
        procs.agent(name)
    online(store, 3)
    # A long timeout: a lease would take 31 s to run out, so quick reissue means the will did it.
    job = store.create_job("sleep", [[0.3]] * 30, timeout=30)
    victim = wait_until(lambda: next((w for w in store.workers() if w.tasks_done >= 1
                                      and store.inflight().get(w.key, 0) == 2), None))

    procs.kill(victim.name)
    killed_at = time.time()
    wait_until(lambda: Worker.get(Worker.key == victim.key).state == "lost", timeout=5)
    progress = finished(store, job, timeout=20)

    assert time.time() - killed_at < 15
    assert (progress.done, progress.failed) == (30, 0)
    exactly_one_accepted_result_each(store, job)
    reissued = [r for r in store.results(job) if r.errors]
    assert len(reissued) == 2
    assert all(r.worker != victim.key and r.errors[0]["worker"] == victim.key
               and r.errors[0]["outcome"] == "lost" for r in reissued)

    # later: purged, and its retained presence is gone while the others' stay
    wait_until(lambda: Worker.get(Worker.key == victim.key).state == "purged", timeout=10)
    survivors = {TOPICS.presence(WorkerRef("local", name)) for name in ("w0", "w1", "w2") if name != victim.name}
    seen: list[set[str]] = []

    def retained_presences_are_the_survivors() -> bool:
        with Watcher(broker.url, TOPICS.all_presence) as watcher:
            watcher.wait_count(2)
            time.sleep(0.5)  # room for a third retained presence to arrive, if there is one
            seen.append({m.topic for m in watcher.messages if m.payload})
        return seen[-1] == survivors

    # The store may say purged a moment before the broker has the cleared presence: look again.
    try:
        wait_until(retained_presences_are_the_survivors, timeout=10)
    except TimeoutError:
        pytest.fail(f"retained presences {seen[-1]}, expected only the survivors {survivors}")


# --------------------------------------------------------------------------- a stale will
def test_stale_will_after_a_quick_reconnect_does_not_mark_the_live_worker_lost(
        engine: Coordinator, broker: BrokerProcess, fakes: list[FakeAgent]) -> None:
    store = engine.store
    started = time.time()
    ref = WorkerRef("local", "w1")
    old_will = Presence("w1", "local", PresenceState.OFFLINE, 1, OfflineReason.LOST, capacity=2,
                        functions=("add",), started=started).encode()
    old_online = Presence("w1", "local", PresenceState.ONLINE, 1, capacity=2, functions=("add",),
                          started=started).encode()
    # Connection 1 of worker w1, with its will...
    first = connect_client(broker.url, "w1-connection-1", will=(TOPICS.presence(ref), old_will, 1, True),
                           start_loop=False)
    first.publish(TOPICS.presence(ref), old_online, qos=1, retain=True)
    for _ in range(10):
        first.loop(0.02)
    wait_until(lambda: store.workers() and store.workers()[0].seq == 1)
    # ...then connection 2 of the same process, which takes tasks...
    live = fake(fakes, broker, "w1", "w1-connection-2", auto=False, functions=("add",), seq=2, started=started)
    wait_until(lambda: store.workers()[0].seq == 2)
    job = store.create_job("add", [[1, 2], [3, 4]], timeout=60)
    wait_until(lambda: len(live.received) == 2)

    # ...and only now does connection 1 die: its will (seq 1) arrives after the newer online.
    abandon(first)
    wait_until(lambda: engine.rejections.counts["stale"] >= 1, timeout=10)

    worker = store.workers()[0]
    assert (worker.state, worker.seq) == ("online", 2)
    assert store.progress(job).assigned == 2  # nothing taken back from the live worker
    live.answer_held()
    finished(store, job)
    assert [(r.value, r.worker, r.attempts) for r in store.results(job)] == [(3, "local/w1", 1), (7, "local/w1", 1)]


# --------------------------------------------------------------------------- a killed coordinator
def test_coordinator_killed_and_restarted_mid_job_finishes_it_exactly_once(
        procs: Processes, broker: BrokerProcess, tmp_path: Path) -> None:
    db = str(tmp_path / "serve.db")
    store = Store.open(db)
    job = store.create_job("sleep", [[0.05]] * 120, timeout=1)
    procs.serve(db, "serve-1")
    for name in ("w0", "w1", "w2"):
        procs.agent(name)
    wait_until(lambda: store.progress(job).done >= 30, timeout=30)

    procs.kill("serve-1")  # kill -9 mid-job: results in flight are lost with it
    time.sleep(0.5)
    assert store.progress(job).state == "active"
    procs.serve(db, "serve-2")
    progress = finished(store, job, timeout=40)

    assert (progress.done, progress.failed) == (120, 0)
    exactly_one_accepted_result_each(store, job)
    assert counts_per_attempt_outcome(store).get("open", 0) == 0
    with Watcher(broker.url, TOPICS.coordinator_presence) as watcher:
        presence = watcher.wait_for(lambda m: m.topic == TOPICS.coordinator_presence)
    assert decode_status(presence.payload)["state"] == "online"
    store.close()


# --------------------------------------------------------------------------- a restarted broker
def test_broker_restart_mid_job_loses_nothing(engine: Coordinator, procs: Processes, broker: BrokerProcess) -> None:
    store = engine.store
    for name in ("w0", "w1"):
        procs.agent(name)
    online(store, 2)
    # Messages in flight when the broker stops are lost (amqtt may take seconds to die, still
    # acknowledging publishes): their leases run out, and each expiry uses an attempt.
    job = store.create_job("sleep", [[0.05]] * 80, timeout=1, max_attempts=20)
    wait_until(lambda: store.progress(job).done >= 10)

    broker.stop()
    broker.start()
    progress = finished(store, job, timeout=60)

    failures = [r.errors for r in store.results(job) if r.state != "done"]
    assert (progress.done, progress.failed) == (80, 0), failures
    exactly_one_accepted_result_each(store, job)
    # the status a restarted (amqtt: empty) broker forgot is published again
    with Watcher(broker.url, TOPICS.status_summary) as watcher:
        watcher.wait_for(lambda m: decode_status(m.payload)["tasks"]["done"] == 80, timeout=10)


# --------------------------------------------------------------------------- hanging tasks
def test_hanging_task_lease_expires_and_another_worker_finishes_it(
        engine: Coordinator, procs: Processes, broker: BrokerProcess, fakes: list[FakeAgent]) -> None:
    store = engine.store
    fake(fakes, broker, "hanger", auto=False, capacity=1, functions=("add",))
    online(store, 1)
    job = store.create_job("add", [[20, 22]], timeout=0.5)  # lease: 0.5 + 1 s margin
    wait_until(lambda: store.progress(job).assigned == 1)
    procs.agent("w0")

    finished(store, job, timeout=15)

    [row] = list(store.results(job))
    assert (row.state, row.value, row.worker) == ("done", 42, "local/w0")
    assert (row.errors[0]["attempt"], row.errors[0]["worker"], row.errors[0]["outcome"], row.errors[0]["type"]) == (
        1, "local/hanger", "expired", "LeaseExpired")
    # Usually that is all (attempt 2 went to w0). On a busy machine one more lease can run out
    # first, rightly: w0 still starting, so the hanger (the only worker online) got attempt 2;
    # or w0 slower than the 1.5 s lease, its late answer then accepted. Either way: expiries.
    assert len(row.errors) < row.attempts
    assert all((e["outcome"], e["type"]) == ("expired", "LeaseExpired") for e in row.errors)


def test_hanging_task_fails_after_max_attempts_with_each_reason(
        engine: Coordinator, broker: BrokerProcess, fakes: list[FakeAgent]) -> None:
    store = engine.store
    fake(fakes, broker, "hanger", auto=False, capacity=1, functions=("add",))
    online(store, 1)
    job = store.create_job("add", [[1, 1]], timeout=0.2, max_attempts=3)

    progress = finished(store, job, timeout=15)

    assert (progress.state, progress.failed) == ("failed", 1)
    [row] = list(store.results(job))
    assert row.state == "failed" and row.attempts == 3
    assert [(e["attempt"], e["outcome"]) for e in row.errors] == [(1, "expired"), (2, "expired"), (3, "expired")]


# --------------------------------------------------------------------------- bad results
def test_duplicate_late_foreign_unknown_and_malformed_results_change_nothing(
        engine: Coordinator, broker: BrokerProcess, fakes: list[FakeAgent]) -> None:
    store = engine.store
    holder = fake(fakes, broker, "holder", auto=False, capacity=1, functions=("add",))
    other = fake(fakes, broker, "other", auto=False, capacity=1, functions=("noop",))
    online(store, 2)
    job = store.create_job("add", [[2, 3]], timeout=0.3)
    wait_until(lambda: len(holder.received) == 1)
    first = holder.received[0]
    wait_until(lambda: len(holder.received) == 2, timeout=10)  # attempt 1 expired, attempt 2 sent
    second = holder.received[1]
    assert (first.attempt, second.attempt) == (1, 2)

    # late: a failure report for the expired attempt 1 cannot count
    holder.answer(first, Outcome.ERROR, None, TaskError("RuntimeError", "too late"))
    holder.answer(second)  # the real answer
    finished(store, job)
    wait_until(lambda: engine.rejections.counts["late"] == 1)
    before = (list(store.results(job)), counts_per_attempt_outcome(store),
              [(w.key, w.tasks_done, w.tasks_failed) for w in store.workers()])

    holder.answer(second, value=999)  # duplicate
    holder.answer(first, value=5)  # a late success for a task already done: duplicate too
    # foreign: the right nonce, from a worker that was not sent the attempt
    other.send(Result(second.task_id, second.attempt, "other", "local", Outcome.OK, 5, nonce=second.nonce).encode())
    holder.send(Result(second.task_id, second.attempt, "holder", "local", Outcome.OK, 5).encode())  # forged: no nonce
    holder.send(Result("424242", 1, "holder", "local", Outcome.OK, 5).encode())  # unknown task
    holder.send(b'{"v":2,"task_id":')  # malformed
    holder.send(Result(second.task_id, second.attempt, "other", "local", Outcome.OK, 5).encode())  # mismatch
    wait_until(lambda: sum(engine.rejections.counts.values()) >= 8, timeout=10)

    assert engine.rejections.snapshot() == {
        "malformed": 1, "mismatch": 1, "unknown": 1, "foreign": 1, "forged": 1, "duplicate": 2, "late": 1,
        "stale": 0}
    after = (list(store.results(job)), counts_per_attempt_outcome(store),
             [(w.key, w.tasks_done, w.tasks_failed) for w in store.workers()])
    assert after == before
    [row] = before[0]
    assert (row.value, row.worker) == (5, "local/holder")
    # observers see the counters on the status summary
    with Watcher(broker.url, TOPICS.status_summary) as watcher:
        watcher.wait_for(lambda m: decode_status(m.payload)["rejected"] == engine.rejections.snapshot())
