"""The coordinator end to end: real brokers (Mosquitto and amqtt), a real SQLite file, real
`dockercomp agent run` processes. The engine runs in this process (``Coordinator.start``) so tests can
read its counters; test_coordinator_faults.py also runs it as `dockercomp coordinator serve`.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from dockercomp.broker.messages import decode_status
from dockercomp.broker.topics import Topics, WorkerRef
from dockercomp.coordinator.service import Coordinator, CoordinatorSettings
from dockercomp.coordinator.store import TaskState
from tests.support import Watcher, wait_until
from tests.support.brokers import BrokerProcess
from tests.support.processes import Processes, finished, online

TOPICS = Topics()
pytestmark = pytest.mark.timeout(120)


# --------------------------------------------------------------------------- the happy path
def test_the_engine_reads_its_connection_on_its_own_thread_and_results_reach_it_there(
        engine: Coordinator, procs: Processes) -> None:
    # coordinator/inbox.py: once connected, the connection is lent to the engine's thread, so a
    # result is read and handled there, with no hand-over from the network thread. (Retained
    # presences replayed on subscribe may still come in before the first lend: results only.)
    readers: set[int] = set()
    on_message = engine.transport.on_message

    def spy(topic: str, payload: bytes, retained: bool) -> None:
        if topic.endswith("/results"):
            readers.add(threading.get_ident())
        on_message(topic, payload, retained)

    engine.transport.on_message = spy
    procs.agent("w0")
    online(engine.store, 1)
    assert finished(engine.store, engine.store.create_job("add", [[i, 1] for i in range(20)])).done == 20
    assert engine.transport.waitables()  # lent to the engine while connected
    assert readers == {engine._thread.ident}


def test_an_acknowledgement_alone_does_not_wake_the_engine_into_a_step(
        engine: Coordinator, procs: Processes) -> None:
    # coordinator/inbox.py: a read that brought only the PUBACK of a task sent waits on. At
    # window 1 each task used to cost two steps, the second one empty, run on a core the
    # agent needed.
    procs.agent("w0", concurrency=1, prefetch=0)
    online(engine.store, 1)
    steps: Counter[str] = Counter()
    step = engine._step

    def counted(items: list[tuple[str, bytes]], now: float) -> None:
        steps["with messages" if items else "empty"] += 1
        step(items, now)

    engine._step = counted  # type: ignore[method-assign]
    tasks = 300
    started = time.monotonic()
    assert finished(engine.store, engine.store.create_job("add", [[i, 1] for i in range(tasks)])).done == tasks
    elapsed = time.monotonic() - started
    # Steps with no message left: those of the timers (FAST: leases every 0.1 s, status, job
    # polls and purges every 0.2 s), at most 25 a second. The old wait added one per task.
    print(f"{steps} in {elapsed:.2f} s")
    assert steps["with messages"] >= tasks // 2
    assert steps["empty"] <= 25 * elapsed + 10, steps


def test_300_tasks_over_3_agents_all_done_attributed_and_spread_evenly(
        engine: Coordinator, procs: Processes, broker: BrokerProcess) -> None:
    store = engine.store
    for i in range(3):
        procs.agent(f"w{i}")
    online(store, 3)

    # Tasks of equal length (a short sleep, not CPU: the box may be busy), distinct values.
    job = store.create_job("sleep", [[0.04 + i / 1e6] for i in range(300)])
    progress = finished(store, job)

    assert (progress.state, progress.done, progress.failed) == ("done", 300, 0)
    rows = list(store.results(job))
    assert [r.index for r in rows] == list(range(300))
    assert [r.value for r in rows] == [0.04 + i / 1e6 for i in range(300)]
    per_worker = Counter(r.worker for r in rows)
    assert set(per_worker) == {"local/w0", "local/w1", "local/w2"}
    # round-robin with equal capacity: nobody far from a third
    assert all(65 <= n <= 135 for n in per_worker.values()), per_worker
    assert {w.key: w.tasks_done for w in store.workers()} == dict(per_worker)
    assert all(r.attempts == 1 for r in rows)

    # observers find it all on the status topics, retained for those arriving afterwards
    with Watcher(broker.url, "dockercomp/status/#") as watcher:
        watcher.wait_for(lambda m: m.topic == TOPICS.status_summary
                         and decode_status(m.payload)["tasks"]["done"] == 300)
    with Watcher(broker.url, "dockercomp/status/#") as watcher:
        summary = watcher.wait_for(lambda m: m.topic == TOPICS.status_summary)
        job_status = watcher.wait_for(lambda m: m.topic == TOPICS.status_job(str(job.id)))
    assert summary.retain and job_status.retain
    fields = decode_status(summary.payload)
    assert fields["workers"]["online"] == 3 and fields["capacity"] == 6
    assert sum(fields["rejected"].values()) == 0
    assert decode_status(job_status.payload)["state"] == "done"


def test_new_submission_is_dispatched_within_a_second(engine: Coordinator, procs: Processes) -> None:
    procs.agent("w0")
    online(engine.store, 1)
    time.sleep(0.5)  # let the engine go idle first

    submitted = time.time()
    job = engine.store.create_job("add", [[1, 2]])
    finished(engine.store, job, timeout=5)

    [row] = list(engine.store.results(job))
    assert row.value == 3
    sent_at = engine.store.db.execute_sql("SELECT sent_at FROM attempt").fetchone()[0]
    assert sent_at - submitted < 1.0


def test_a_worker_coming_back_is_the_same_worker(engine: Coordinator, procs: Processes) -> None:
    procs.agent("w0")
    online(engine.store, 1)
    procs.stop_all()  # clean shutdown: offline
    wait_until(lambda: engine.store.workers()[0].state == "offline")

    procs.agent("w0")
    online(engine.store, 1)
    assert [w.key for w in engine.store.workers()] == ["local/w0"]


def test_tasks_for_a_function_nobody_offers_wait_without_harm(engine: Coordinator, procs: Processes) -> None:
    procs.agent("w0")
    online(engine.store, 1)
    orphan = engine.store.create_job("no_such_function", [[1]])
    job = engine.store.create_job("add", [[2, 2]])
    finished(engine.store, job)
    assert engine.store.progress(orphan).pending == 1
    assert [r.value for r in engine.store.results(job)] == [4]


def test_errors_and_timeouts_use_up_attempts_then_fail_with_reasons(engine: Coordinator, procs: Processes) -> None:
    procs.agent("w0")
    online(engine.store, 1)
    # sleep(5) with a 0.3 s limit: the agent kills it each time
    job = engine.store.create_job("sleep", [[5]], timeout=0.3, max_attempts=2)
    progress = finished(engine.store, job)

    assert progress.failed == 1
    [row] = list(engine.store.results(job))
    assert row.state == TaskState.FAILED.value and row.attempts == 2
    assert [(e["attempt"], e["outcome"], e["worker"]) for e in row.errors] == [
        (1, "timeout", "local/w0"), (2, "timeout", "local/w0")]


def test_cancel_while_running_leaves_nothing_dispatched(engine: Coordinator, procs: Processes) -> None:
    procs.agent("w0")
    online(engine.store, 1)
    job = engine.store.create_job("sleep", [[0.2]] * 40)
    wait_until(lambda: engine.store.progress(job).done >= 2)
    engine.store.cancel_job(job)
    # The engine notices within a poll; what the agent already holds finishes (or is dropped).
    progress = wait_until(lambda: (p := engine.store.progress(job)).assigned == 0 and p, timeout=15)

    assert progress.state == "cancelled" and progress.pending == 0
    assert progress.done + progress.cancelled == 40
    wait_until(lambda: len(engine.leases) == 0)
    # Leases leave memory inside the engine's transaction, before its commit: wait for the
    # store too (a single read right after the leases emptied raced that commit).
    open_attempts = "SELECT count(*) FROM attempt WHERE outcome = 'open'"
    wait_until(lambda: engine.store.db.execute_sql(open_attempts).fetchone()[0] == 0, timeout=5)


def test_tasks_queued_on_an_agent_by_prefetch_wait_their_turn_without_expiring(
        broker: BrokerProcess, procs: Processes, tmp_path: Path) -> None:
    # One task process and three tasks queued behind it, each taking half its time limit.
    # A lease of timeout + margin (3 s) from dispatch would end before the last one (4 s)
    # even starts: the coordinator must allow for the wait in the agent's queue.
    settings = CoordinatorSettings(lease_margin=1, lease_check=0.1, poll_interval=0.2, status_interval=0.2)
    with Coordinator.connect(broker.url, str(tmp_path / "coordinator.db"), settings) as engine:
        procs.agent("w0", concurrency=1, prefetch=3)
        [worker] = online(engine.store, 1)
        assert (worker.capacity, worker.prefetch) == (1, 3)

        job = engine.store.create_job("sleep", [[1.0 + i / 1e6] for i in range(6)], timeout=2.0)
        # 1 running + 3 queued, the rest waits. The engine records its leases before it commits
        # the dispatch, so the store can lag a moment behind: wait until both agree.
        wait_until(lambda: len(engine.leases) == 4 and engine.store.progress(job).pending == 2)
        progress = finished(engine.store, job, timeout=30)

    assert (progress.done, progress.failed) == (6, 0)
    rows = list(engine.store.results(job))
    assert [(r.value, r.attempts, r.errors) for r in rows] == [(1.0 + i / 1e6, 1, []) for i in range(6)]


def test_worker_ref_in_results_matches_presence(engine: Coordinator, procs: Processes) -> None:
    procs.agent("w0")
    [worker] = online(engine.store, 1)
    assert (worker.volunteer, worker.name, worker.capacity) == ("local", "w0", 2)
    assert "count_primes" in worker.functions and worker.seq > 0
    assert WorkerRef.parse(worker.key) == WorkerRef("local", "w0")


@pytest.mark.postgres
def test_postgres_end_to_end_with_real_agents_and_a_killed_one(
        postgres_db: str, mosquitto: BrokerProcess, tmp_path: Path) -> None:
    # Moved here from tests/contract/test_store_postgres.py: the store contract suite runs on
    # PostgreSQL in tests/contract/test_store.py; this is the engine on it with real agents.
    settings = CoordinatorSettings(lease_margin=1, lease_check=0.1, purge_after=60, poll_interval=0.2,
                                   status_interval=0.2)
    engine = Coordinator.connect(mosquitto.url, postgres_db, settings).start()
    procs = Processes(mosquitto.url, tmp_path / "logs")
    try:
        store = engine.store
        for name in ("w0", "w1", "w2"):
            procs.agent(name)
        online(store, 3)
        job = store.create_job("sleep", [[0.02 + i / 1e6] for i in range(150)], timeout=30)
        # w2 has answered at least once (its results must stay attributed to it), then dies.
        wait_until(lambda: store.progress(job).done >= 20
                   and any(w.key == "local/w2" and w.tasks_done >= 1 for w in store.workers()), timeout=30)
        procs.kill("w2")  # its will returns what it held at once

        progress = finished(store, job)

        assert (progress.done, progress.failed) == (150, 0)
        rows = list(store.results(job))
        assert [r.value for r in rows] == [0.02 + i / 1e6 for i in range(150)]
        per_worker = Counter(r.worker for r in rows)
        assert set(per_worker) == {"local/w0", "local/w1", "local/w2"}
        assert {w.key: w.tasks_done for w in store.workers()} == dict(per_worker)
        assert {w.key: w.state for w in store.workers()}["local/w2"] == "lost"
        assert sum(engine.rejections.counts.values()) == 0
    finally:
        procs.stop_all()
        engine.stop()
    assert engine.error is None
