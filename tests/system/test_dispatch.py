"""Unit tests of the engine's logic over the in-memory broker, driven one step at a time with
a fake clock: dispatch, results, leases, death, purge, restart. A real SQLite file each time.

The end-to-end behaviour over real brokers and real agents is in test_coordinator*.py.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

import pytest

from dockercomp.broker.defaults import PROTOCOL_VERSION
from dockercomp.broker.memory import MemoryBroker
from dockercomp.broker.messages import Outcome, Result, Task, TaskError, decode_status
from dockercomp.broker.topics import Topics
from dockercomp.coordinator import store as store_module
from dockercomp.coordinator.service import Coordinator, CoordinatorSettings
from dockercomp.coordinator.store import Store, WorkerRow
from tests.support.agents import FakeAgent

pytestmark = pytest.mark.timeout(60)

TOPICS = Topics()


# --------------------------------------------------------------------------- helpers
class FakeClock:
    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Rig:
    broker: MemoryBroker
    store: Store
    coordinator: Coordinator
    clock: FakeClock

    def agent(self, name: str, **kwargs: Any) -> FakeAgent:
        agent = FakeAgent(self.broker.connect(f"agent-{name}"), name, **kwargs).start()
        return agent

    def step(self, seconds: float = 0.0, times: int = 1) -> None:
        for _ in range(times):
            self.clock.advance(seconds)
            self.coordinator.step()

    def settle(self) -> None:
        """Steps until nothing is left to do (answers of auto agents are synchronous)."""
        for _ in range(200):
            self.clock.advance(0.5)  # also passes the poll interval: new jobs are seen
            self.coordinator.step()
            if self.coordinator._inbox.empty() and not self.coordinator.dispatcher.has_work(
                    self.coordinator.workers, self.coordinator.jobs, self.coordinator.leases):
                return

    def restart(self) -> "Rig":
        """A new coordinator on the same store (the old one vanished: its will fires)."""
        self.coordinator.transport.kill()  # type: ignore[attr-defined]
        coordinator = Coordinator(self.store, self.broker.connect("coordinator-2"), TOPICS,
                                  self.coordinator.settings, self.clock)
        coordinator.open()
        return Rig(self.broker, self.store, coordinator, self.clock)

    def states(self, job: Any) -> dict[str, int]:
        progress = self.store.progress(job)
        return {s: getattr(progress, s) for s in ("pending", "assigned", "done", "failed", "cancelled")}


# The engine's rules run the same on the memory store (no database) as on a real SQLite file.
@pytest.fixture(params=[pytest.param("sqlite", marks=pytest.mark.real), "memory"])
def rig(tmp_path, request: pytest.FixtureRequest) -> Rig:
    broker = MemoryBroker()
    store = Store.open(str(tmp_path / "coordinator.db") if request.param == "sqlite" else "memory://")
    clock = FakeClock()
    settings = CoordinatorSettings(lease_margin=5, lease_check=1, purge_after=60, purge_check=1,
                                   poll_interval=0.5, status_interval=0.5)
    coordinator = Coordinator(store, broker.connect("coordinator"), TOPICS, settings, clock)
    coordinator.open()
    yield Rig(broker, store, coordinator, clock)
    coordinator.close()
    store.close()


def snapshot(store: Store) -> list[tuple]:
    """Everything the store knows about tasks, attempts, results and workers."""
    rows: list[tuple] = []
    for job in store.jobs():
        for row in store.results(job):
            rows.append((row.task_id, row.state, row.attempts, row.value, row.worker))
            rows += [(row.task_id, n, store.find_attempt(row.task_id, n)) for n in range(1, row.attempts + 1)]
    return rows + [(w.key, w.state, w.tasks_done, w.tasks_failed) for w in store.workers()]


def worker_row(store: Store, key: str) -> WorkerRow:
    return next(w for w in store.workers() if w.key == key)


def outcome(store: Store, task_id: int, number: int = 1) -> str:
    record = store.find_attempt(task_id, number)
    assert record is not None, f"no attempt {number} of task {task_id}"
    return record.outcome


# --------------------------------------------------------------------------- dispatch
def test_round_robin_fills_each_worker_to_its_capacity_and_no_further(rig: Rig) -> None:
    agents = [rig.agent(f"w{i}", auto=False) for i in range(3)]
    job = rig.store.create_job("add", [[i, i] for i in range(10)])

    rig.step(0.5, times=3)

    assert [len(a.received) for a in agents] == [2, 2, 2]
    assert rig.states(job) == {"pending": 4, "assigned": 6, "done": 0, "failed": 0, "cancelled": 0}

    for agent in agents:
        agent.answer_held()
    rig.step(0.5, times=2)
    assert sorted(len(a.received) for a in agents) == [3, 3, 4]
    assert rig.states(job)["done"] == 6


def test_all_tasks_done_spread_evenly_and_attributed(rig: Rig) -> None:
    agents = [rig.agent(f"w{i}") for i in range(3)]
    job = rig.store.create_job("add", [[i, 1] for i in range(300)])

    rig.settle()

    rows = list(rig.store.results(job))
    assert [r.value for r in rows] == [i + 1 for i in range(300)]
    assert all(r.state == "done" and r.attempts == 1 and r.errors == [] for r in rows)
    per_worker = {a.ref.key: sum(r.worker == a.ref.key for r in rows) for a in agents}
    assert sum(per_worker.values()) == 300
    assert max(per_worker.values()) - min(per_worker.values()) <= 2, per_worker
    assert rig.store.progress(job).state == "done"
    assert {w.key: w.tasks_done for w in rig.store.workers()} == per_worker


def test_task_message_is_the_protocol_task_byte_for_byte(rig: Rig) -> None:
    agent = rig.agent("w1", auto=False)
    job = rig.store.create_job("sum", [[[1, 2.5, "x", None, {"k": [True]}]]], timeout=12.5)
    rig.step(0.5)

    raw = [p for t, p, _ in rig.broker.published if t == TOPICS.tasks(agent.ref)][0]
    task = agent.received[0]
    assert task == Task(task.task_id, str(job.id), 1, "sum", [[1, 2.5, "x", None, {"k": [True]}]], 12.5,
                        nonce=task.nonce)
    assert len(task.nonce) >= 22  # the attempt's secret, 16 random bytes
    assert raw == task.encode()


def test_only_workers_offering_the_function_get_its_tasks(rig: Rig) -> None:
    adder = rig.agent("adder", functions=("add",), auto=False)
    summer = rig.agent("summer", functions=("sum",), auto=False)
    rig.store.create_job("sum", [[[1, 2]]] * 5)
    rig.step(0.5, times=2)
    assert len(adder.received) == 0 and len(summer.received) == 2


def test_new_submission_is_picked_up_without_restart(rig: Rig) -> None:
    agent = rig.agent("w1")
    rig.step(0.5)
    job = rig.store.create_job("add", [[1, 2]])
    rig.step(0.5, times=3)
    assert [r.value for r in rig.store.results(job)] == [3]
    assert agent.answered


# --------------------------------------------------------------------------- prefetch
def test_prefetch_queues_tasks_on_a_worker_beyond_its_capacity_and_no_further(rig: Rig) -> None:
    agent = rig.agent("w1", auto=False, capacity=2, prefetch=3)
    job = rig.store.create_job("add", [[i, i] for i in range(12)])

    rig.step(0.5, times=3)
    assert len(agent.received) == 5  # 2 running + 3 queued
    assert rig.states(job)["assigned"] == 5 and rig.states(job)["pending"] == 7
    assert worker_row(rig.store, "local/w1").prefetch == 3

    agent.answer_held()
    rig.step(0.5, times=2)
    assert len(agent.received) == 10  # topped up to 5 again, never more


def test_idle_slots_are_filled_before_any_worker_queue(rig: Rig) -> None:
    busy = rig.agent("busy", auto=False, capacity=2, prefetch=2)
    rig.store.create_job("add", [[1, 1]] * 2)
    rig.step(0.5, times=2)
    idle = rig.agent("idle", auto=False, capacity=2, prefetch=2)

    rig.store.create_job("add", [[2, 2]] * 4)
    rig.step(0.5, times=2)

    # idle's two free slots first, then one queued on each: not two queued on busy while
    # idle has a slot doing nothing
    assert (len(busy.received), len(idle.received)) == (3, 3)


def test_tasks_spread_evenly_over_workers_with_prefetch(rig: Rig) -> None:
    agents = [rig.agent(f"w{i}", capacity=2, prefetch=2) for i in range(3)]
    job = rig.store.create_job("add", [[i, 1] for i in range(300)])

    rig.settle()

    rows = list(rig.store.results(job))
    assert [r.value for r in rows] == [i + 1 for i in range(300)] and all(r.attempts == 1 for r in rows)
    per_worker = {a.ref.key: sum(r.worker == a.ref.key for r in rows) for a in agents}
    assert all(90 <= n <= 110 for n in per_worker.values()), per_worker


def test_a_prefetched_task_waiting_its_turn_keeps_its_lease(rig: Rig) -> None:
    # One slot, two queued: the worker runs them one after the other, each taking nearly its
    # whole time limit. The lease of a task sent now would run out at timeout + margin (15 s);
    # the second and third task are only answered after 20 and 30 s, and must still count.
    agent = rig.agent("w1", auto=False, capacity=1, prefetch=2)
    job = rig.store.create_job("add", [[i, i] for i in range(3)], timeout=10)
    rig.step(0.5)
    assert len(agent.received) == 3

    for task in list(agent.received):
        for _ in range(10):
            rig.step(0.99)  # lease checks every second while the task runs
        agent.answer(task)
    rig.step(0.5, times=2)

    rows = list(rig.store.results(job))
    assert [(r.state, r.value, r.attempts, r.errors) for r in rows] == [("done", 2 * i, 1, []) for i in range(3)]
    assert len(agent.received) == 3 and rig.coordinator.rejections.counts["late"] == 0


def test_a_prefetched_task_of_a_silent_worker_still_expires(rig: Rig) -> None:
    agent = rig.agent("w1", auto=False, capacity=1, prefetch=1)
    job = rig.store.create_job("add", [[1, 1], [2, 2]], timeout=10)
    rig.step(0.5)
    assert len(agent.received) == 2
    first, second = (int(t.task_id) for t in agent.received)

    rig.step(15.5)  # the running one: timeout + margin
    assert (outcome(rig.store, first), outcome(rig.store, second)) == ("expired", "open")
    rig.step(10)  # the queued one: it waited up to one timeout for its turn, then ran
    assert outcome(rig.store, second) == "expired"
    assert rig.states(job)["done"] == 0


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_database_from_before_prefetch_is_upgraded_when_opened(kind: str, tmp_path,
                                                                  request: pytest.FixtureRequest) -> None:
    url = str(tmp_path / "old.db") if kind == "sqlite" else request.getfixturevalue("postgres_db")
    # Given a database as the first release made it: no prefetch column, the old indexes, a worker
    old = Store.open(url)
    old.db.execute_sql("ALTER TABLE worker DROP COLUMN prefetch")
    for table, columns, name in (("task", "state, id", "task_state_id"), ("attempt", "task_id", "attempt_task_id"),
                                 ("attempt", "deadline", "attempt_deadline"), ("attempt", "outcome", "attempt_outcome"),
                                 ("attempt", "worker_id", "attempt_worker_id"), ("result", "worker_id", "result_worker_id")):
        old.db.execute_sql(f'CREATE INDEX "{name}" ON "{table}" ({columns})')
    old.db.execute_sql('DROP INDEX "attempt_open"')  # the partial index that replaced attempt_outcome
    old.db.execute_sql("INSERT INTO worker (key, volunteer, name, state, seq, host, version, cpus, capacity, "
                       "functions, started, first_seen, last_seen, tasks_done, tasks_failed) VALUES "
                       "('local/w0', 'local', 'w0', 'lost', 0, 'h', '0', 1, 2, '[\"add\"]', 1.0, 1.0, 1.0, 7, 0)")
    old.close()

    # When a coordinator of this version opens it (twice: the second finds nothing to do)
    Store.open(url).close()
    store = Store.open(url)

    # Then the column is there with its default, the indexes are gone, the data kept
    assert {c.name for c in store.db.get_columns("worker")} >= {"prefetch", "tasks_done"}
    assert [(w.key, w.prefetch, w.tasks_done) for w in store.workers()] == [("local/w0", 0, 7)]
    indexes = {i.name for table in ("task", "attempt", "result") for i in store.db.get_indexes(table)}
    assert not indexes & {"task_state_id", "attempt_task_id", "attempt_deadline", "attempt_outcome",
                          "attempt_worker_id", "result_worker_id"}
    assert {"attempt_task_id_number", "attempt_open", "result_task_id", "result_attempt_id"} <= indexes
    # and the engine runs on it: the returning worker announces its prefetch
    broker, clock = MemoryBroker(), FakeClock()
    coordinator = Coordinator(store, broker.connect("coordinator"), TOPICS, CoordinatorSettings(), clock)
    coordinator.open()
    rig = Rig(broker, store, coordinator, clock)
    agent = rig.agent("w0", auto=False, capacity=2, prefetch=1)
    rig.store.create_job("add", [[1, 1]] * 5)
    rig.step(0.5, times=2)
    assert len(agent.received) == 3
    coordinator.close()


def test_the_queries_for_open_attempts_search_the_partial_index(tmp_path) -> None:
    # Given a SQLite store whose attempts are mostly ended, and a trace of its statements
    store = Store.open(str(tmp_path / "c.db"))
    job = store.create_job("add", [[i, i] for i in range(50)])
    worker = store.add_worker("v/w", "v", "w", 1.0)
    tasks = [row[0] for row in store.pending_tasks(job.id, 50)]
    store.open_attempts([(task, 1, worker.id, 100.0, f"n{task}") for task in tasks], 1.0)
    store.db.execute_sql("UPDATE attempt SET outcome = 'ok' WHERE task_id > ?", (tasks[1],))
    statements: list[str] = []
    store.db.connection().set_trace_callback(statements.append)

    # When the store looks up open attempts in every way it does
    assert len(store.open_leases()) == 2
    store.running_count(job.id)
    store.extend_deadlines(1.0)
    store.db.connection().set_trace_callback(None)

    # Then each of those statements finds them through attempt_open, not a scan of every attempt
    by_outcome = [sql for sql in statements if "outcome" in sql and "attempt" in sql]
    assert len(by_outcome) == 3
    for sql in by_outcome:
        plan = " ".join(row[-1] for row in store.db.execute_sql(f"EXPLAIN QUERY PLAN {sql}").fetchall())
        assert "attempt_open" in plan, (sql, plan)
    store.close()


# --------------------------------------------------------------------------- results
def test_duplicate_result_is_counted_and_changes_nothing(rig: Rig) -> None:
    agent = rig.agent("w1")
    job = rig.store.create_job("add", [[1, 2]])
    rig.settle()
    task = agent.received[0]
    before = snapshot(rig.store)

    agent.answer(task, value=999)
    rig.step(0.5)

    assert snapshot(rig.store) == before
    assert [r.value for r in rig.store.results(job)] == [3]
    assert rig.coordinator.rejections.counts["duplicate"] == 1


def test_bad_results_are_rejected_counted_and_change_nothing(rig: Rig) -> None:
    holder = rig.agent("holder", auto=False)
    other = rig.agent("other", auto=False, functions=("noop",))
    rig.store.create_job("add", [[1, 2]])
    rig.step(0.5, times=2)
    task = holder.received[0]
    before = snapshot(rig.store)

    # from a worker that never held that attempt (with its nonce, so not a guess)
    other.send(Result(task.task_id, task.attempt, "other", "local", Outcome.OK, 5, nonce=task.nonce).encode())
    # for a task that does not exist
    holder.send(Result("987654", 1, "holder", "local", Outcome.OK, 5).encode())
    holder.send(Result("not-a-number", 1, "holder", "local", Outcome.OK, 5).encode())
    # forged: an attempt that was never sent, and the held attempt without its nonce
    holder.send(Result(task.task_id, 7, "holder", "local", Outcome.OK, 5).encode())
    holder.send(Result(task.task_id, task.attempt, "holder", "local", Outcome.OK, 5, nonce="guess").encode())
    # malformed in several ways
    for junk in (b"", b"{", b"[1]", b'{"v":99}', json.dumps({"v": PROTOCOL_VERSION, "task_id": task.task_id}).encode(),
                 b"\xff" * 10,
                 b'{"v":%d,"task_id":"1","attempt":1,"worker":"holder","volunteer":"local","outcome":"error"}'
                 % PROTOCOL_VERSION):
        holder.send(junk)
    # a payload naming another worker than its topic
    holder.send(Result(task.task_id, task.attempt, "other", "local", Outcome.OK, 5).encode())
    rig.step(0.5, times=2)

    assert snapshot(rig.store) == before
    assert rig.coordinator.rejections.snapshot() == {
        "malformed": 7, "mismatch": 1, "unknown": 2, "foreign": 1, "forged": 2, "duplicate": 0, "late": 0,
        "stale": 0}
    # and the real answer still counts
    holder.answer_held()
    rig.step(0.5)
    assert [r.value for r in rig.store.results(rig.store.jobs()[0])] == [3]


def test_error_results_are_retried_then_fail_with_every_reason(rig: Rig) -> None:
    agent = rig.agent("w1", fail_with=lambda t: TaskError("ValueError", f"bad {t.attempt}", "tb"))
    job = rig.store.create_job("add", [[1, 2]], max_attempts=3)
    rig.settle()

    [row] = list(rig.store.results(job))
    assert row.state == "failed" and row.attempts == 3
    assert [(e["attempt"], e["outcome"], e["type"], e["message"]) for e in row.errors] == [
        (1, "error", "ValueError", "bad 1"), (2, "error", "ValueError", "bad 2"), (3, "error", "ValueError", "bad 3")]
    assert rig.store.progress(job).state == "failed"  # it ended with a failed task

    # retry gives a fresh budget; the running engine picks it up (the worker is healthy now)
    assert rig.store.retry_failed(job) == 1
    agent.fail_with = None
    rig.settle()
    [row] = list(rig.store.results(job))
    assert row.state == "done" and row.value == 3 and row.attempts == 4 and len(row.errors) == 3


# --------------------------------------------------------------------------- leases
def test_expired_lease_returns_the_task_and_another_worker_finishes_it(rig: Rig) -> None:
    hanger = rig.agent("hanger", auto=False, capacity=1)
    job = rig.store.create_job("add", [[2, 2]], timeout=10)
    rig.step(0.5)
    assert len(hanger.received) == 1
    helper = rig.agent("helper")

    rig.step(14)  # timeout 10 + margin 5 not yet passed
    assert rig.states(job)["assigned"] == 1 and not helper.received
    rig.step(2)
    rig.settle()

    [row] = list(rig.store.results(job))
    assert row.value == 4 and row.worker == "local/helper" and row.attempts == 2
    assert [(e["worker"], e["outcome"], e["type"]) for e in row.errors] == [("local/hanger", "expired", "LeaseExpired")]


def test_lease_expiry_counts_as_an_attempt_up_to_failure(rig: Rig) -> None:
    rig.agent("hanger", auto=False)
    job = rig.store.create_job("add", [[2, 2]], timeout=1, max_attempts=2)
    for _ in range(6):
        rig.step(7)
    [row] = list(rig.store.results(job))
    assert row.state == "failed" and [e["outcome"] for e in row.errors] == ["expired", "expired"]


def test_late_result_after_expiry_is_accepted_and_supersedes_the_reissue(rig: Rig) -> None:
    slow = rig.agent("slow", auto=False, capacity=1)
    job = rig.store.create_job("add", [[2, 3]], timeout=1)
    rig.step(0.5)
    second = rig.agent("second", auto=False, capacity=1)
    rig.step(7)  # expired: back to pending, and round-robin sends it to the next worker
    assert len(second.received) == 1 and len(slow.received) == 1

    slow.answer_held()  # attempt 1, late
    rig.step(0.5)
    second.answer_held()  # attempt 2, now superseded: a duplicate
    rig.step(0.5)

    [row] = list(rig.store.results(job))
    assert (row.state, row.value, row.worker) == ("done", 5, "local/slow")
    outcomes = [outcome(rig.store, row.task_id, n) for n in (1, 2)]
    assert outcomes == ["ok", "superseded"]
    assert rig.coordinator.rejections.counts["duplicate"] == 1
    assert rig.coordinator.leases.count(rig.coordinator.workers.get("local/second").id) == 0


# --------------------------------------------------------------------------- death
def test_will_returns_in_flight_tasks_at_once_and_they_are_reissued(rig: Rig) -> None:
    doomed = rig.agent("doomed", auto=False)
    job = rig.store.create_job("add", [[i, 0] for i in range(2)], timeout=1000)
    rig.step(0.5)
    assert len(doomed.received) == 2
    survivor = rig.agent("survivor")

    doomed.transport.kill()  # type: ignore[attr-defined]
    rig.step(0.1)
    rig.settle()

    rows = list(rig.store.results(job))
    assert [(r.state, r.worker, r.attempts) for r in rows] == [("done", "local/survivor", 2)] * 2
    assert all(e["outcome"] == "lost" for r in rows for e in r.errors)
    worker = worker_row(rig.store, "local/doomed")
    assert worker.state == "lost" and worker.lost_at == pytest.approx(rig.clock.now, abs=5)
    assert survivor.answered


def test_stale_will_after_a_quick_reconnect_is_ignored(rig: Rig) -> None:
    agent = rig.agent("w1", auto=False)
    rig.store.create_job("add", [[1, 1]] * 2, timeout=1000)
    rig.step(0.5)
    old_will = agent.presence("offline", "lost")  # seq 1

    agent.seq = 2  # reconnected: same process, new connection
    agent.announce()
    rig.broker.deliver(TOPICS.presence(agent.ref), old_will, retain=True)  # the old will, late
    rig.step(0.1)

    slot = rig.coordinator.workers.get("local/w1")
    assert slot.state == "online" and slot.seq == 2
    assert rig.coordinator.leases.count(slot.id) == 2
    assert rig.coordinator.rejections.counts["stale"] == 1
    # the reconnection made the coordinator resend what the worker holds (it ignores dups)
    assert len(agent.received) == 4 and {t.task_id for t in agent.received[2:]} == {t.task_id for t in agent.received[:2]}


def test_restarted_agent_loses_what_the_old_process_held(rig: Rig) -> None:
    agent = rig.agent("w1", auto=False)
    job = rig.store.create_job("add", [[1, 1]], timeout=1000)
    rig.step(0.5)
    agent.seq, agent.started = 5, agent.started + 100
    agent.auto = True
    agent.announce()
    rig.settle()
    [row] = list(rig.store.results(job))
    assert row.state == "done" and row.attempts == 2 and row.errors[0]["outcome"] == "lost"


def test_shutdown_returns_what_was_held_and_marks_offline(rig: Rig) -> None:
    agent = rig.agent("w1", auto=False)
    rig.store.create_job("add", [[1, 1]], timeout=1000)
    rig.step(0.5)
    agent.shutdown()
    rig.step(0.1)
    assert worker_row(rig.store, "local/w1").state == "offline"
    assert rig.states(rig.store.jobs()[0])["pending"] == 1


def test_lost_worker_is_purged_after_the_grace_period_and_its_presence_cleared(rig: Rig) -> None:
    agent = rig.agent("w1")
    rig.step(0.5)
    agent.transport.kill()  # type: ignore[attr-defined]
    rig.step(0.5)
    assert TOPICS.presence(agent.ref) in rig.broker.retained

    rig.step(30)
    assert worker_row(rig.store, "local/w1").state == "lost"
    rig.step(31)

    assert worker_row(rig.store, "local/w1").state == "purged"
    assert TOPICS.presence(agent.ref) not in rig.broker.retained
    assert TOPICS.status_worker(agent.ref) not in rig.broker.retained

    # it comes back: the same worker row, online again
    again = rig.agent("w1", seq=9)
    rig.step(0.5)
    rows = [w for w in rig.store.workers() if w.key == "local/w1"]
    assert len(rows) == 1 and rows[0].state == "online" and rows[0].purged_at is None and again


def test_a_purge_by_the_cli_while_serving_is_reflected_in_status(rig: Rig) -> None:
    agent = rig.agent("w1")
    rig.step(0.5)
    agent.transport.kill()  # type: ignore[attr-defined]
    rig.step(1)
    assert decode_status(rig.broker.retained[TOPICS.status_worker(agent.ref)])["state"] == "lost"

    assert [w.key for w in rig.store.purge_lost(0, rig.clock.now)] == ["local/w1"]  # `dockercomp coordinator purge`
    rig.step(1)

    assert TOPICS.status_worker(agent.ref) not in rig.broker.retained
    assert rig.coordinator.summary()["workers"]["purged"] == 1


# --------------------------------------------------------------------------- restart, cancel
def test_restarted_coordinator_keeps_leases_and_respects_capacity(rig: Rig) -> None:
    agent = rig.agent("w1", auto=False)
    job = rig.store.create_job("add", [[i, 1] for i in range(6)], timeout=1000)
    rig.step(0.5)
    assert len(agent.received) == 2

    rig2 = rig.restart()
    rig2.step(0.5, times=3)
    # open attempts were rebuilt: nothing more is sent (capacity 2), the 2 held were resent
    assert rig2.states(job)["assigned"] == 2
    assert len({(t.task_id, t.attempt) for t in agent.received}) == 2

    agent.auto = True
    agent.answer_held()
    rig2.settle()
    rows = list(rig2.store.results(job))
    assert [r.value for r in rows] == [i + 1 for i in range(6)] and all(r.attempts == 1 for r in rows)
    assert worker_row(rig.store, "local/w1").tasks_done == 6
    rig2.coordinator.close()


def test_cancel_stops_dispatch_and_answers_only_free_capacity(rig: Rig) -> None:
    agent = rig.agent("w1", auto=False)
    job = rig.store.create_job("add", [[1, 1]] * 5)
    rig.step(0.5)
    assert rig.store.cancel_job(job) == 5
    rig.step(0.5)
    agent.answer_held()
    rig.step(0.5, times=3)
    assert len(agent.received) == 2
    assert rig.states(job) == {"pending": 0, "assigned": 0, "done": 0, "failed": 0, "cancelled": 5}
    assert rig.coordinator.leases.count(rig.coordinator.workers.get("local/w1").id) == 0


def test_a_database_outage_loses_no_result(tmp_path, monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(store_module, "SQLITE_BUSY_TIMEOUT_MS", 100)
    db = str(tmp_path / "locked.db")
    broker, clock = MemoryBroker(), FakeClock()
    store = Store.open(db)
    coordinator = Coordinator(store, broker.connect("coordinator"), TOPICS, CoordinatorSettings(), clock)
    coordinator.open()
    rig = Rig(broker, store, coordinator, clock)
    agent = rig.agent("w1", auto=False)
    job = store.create_job("add", [[1, 2], [3, 4]])
    rig.step(0.5, times=2)
    assert len(agent.held) == 2

    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # someone holds the write lock too long
    agent.answer_held()
    rig.step(0.1)  # the batch with both results fails and is dropped
    assert "database error, 2 message(s) dropped" in caplog.text
    other.execute("COMMIT")
    other.close()
    agent.auto = True  # it answers what it is sent again
    rig.settle()

    assert [(r.value, r.attempts) for r in store.results(job)] == [(3, 1), (7, 1)]
    assert worker_row(store, "local/w1").tasks_done == 2
    coordinator.close()


# --------------------------------------------------------------------------- status
def test_status_topics_are_retained_and_describe_progress(rig: Rig) -> None:
    agent = rig.agent("w1")
    job = rig.store.create_job("add", [[1, 1]] * 4, name="four")
    rig.settle()
    rig.step(1)

    summary = decode_status(rig.broker.retained[TOPICS.status_summary])
    assert summary["workers"]["online"] == 1 and summary["capacity"] == 2
    assert summary["tasks"] == {"pending": 0, "assigned": 0, "done": 4, "failed": 0, "cancelled": 0}
    assert summary["jobs"]["done"] == 1 and summary["rate"] > 0
    assert set(summary["rejected"]) == {"malformed", "mismatch", "unknown", "foreign", "forged", "duplicate", "late",
                                        "stale"}
    job_status = decode_status(rig.broker.retained[TOPICS.status_job(str(job.id))])
    assert (job_status["name"], job_status["state"], job_status["done"], job_status["total"]) == ("four", "done", 4, 4)
    worker_status = decode_status(rig.broker.retained[TOPICS.status_worker(agent.ref)])
    assert (worker_status["state"], worker_status["done"], worker_status["in_flight"]) == ("online", 4, 0)
    coordinator = decode_status(rig.broker.retained[TOPICS.coordinator_presence])
    assert coordinator["state"] == "online"


def test_status_is_published_at_most_every_interval(rig: Rig) -> None:
    rig.agent("w1")
    rig.store.create_job("add", [[1, 1]] * 50)
    rig.step(0.5)
    before = sum(t == TOPICS.status_summary for t, _, _ in rig.broker.published)
    for _ in range(20):
        rig.step(0.01)  # 20 steps within 0.2 s, each finishing tasks
    after = sum(t == TOPICS.status_summary for t, _, _ in rig.broker.published)
    assert after - before <= 1


def test_coordinator_says_goodbye_on_close(rig: Rig) -> None:
    rig.coordinator.close()
    assert decode_status(rig.broker.retained[TOPICS.coordinator_presence])["reason"] == "shutdown"
