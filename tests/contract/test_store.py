"""The store contract: one suite over every store, in memory, on a SQLite file and on a real
PostgreSQL server (a fresh database per test); huey's storage tests are the model.

Tests named ``test_sqlite_*`` / ``test_postgres_*`` are about that database itself.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any
from pathlib import Path

import pytest

from dockercomp.coordinator import store as store_module
from dockercomp.coordinator.errors import (
    DatabaseMissing,
    InvalidInput,
    JobBusy,
    StoreError,
    StoreLocked,
    UnknownJob,
    UnknownTask,
)
from dockercomp.coordinator.heartbeat import Heartbeat
from dockercomp.coordinator.defaults import INSERT_BATCH
from dockercomp.coordinator.store import (
    AttemptOutcome,
    Changes,
    JobRow,
    Store,
    TaskState,
    WorkerRow,
    WorkerState,
    dump_json,
)
from dockercomp.coordinator.replication import Replication
from tests.support import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=[
    pytest.param("memory", id="memory"),
    pytest.param("sqlite", id="sqlite", marks=pytest.mark.real),
    pytest.param("postgres", id="postgres", marks=[pytest.mark.real, pytest.mark.postgres]),
])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "memory":
        url = "memory://"
    elif request.param == "sqlite":
        url = str(tmp_path / "coordinator.db")
    else:
        url = request.getfixturevalue("postgres_db")
    opened = Store.open(url)
    yield opened
    opened.close()


def add_worker(store: Store, key: str, state: str = WorkerState.ONLINE.value, lost_at: float | None = None,
               **fields: object) -> WorkerRow:
    volunteer, name = key.split("/")
    return store.add_worker(key, volunteer, name, time.time(), state=state, lost_at=lost_at, capacity=2, **fields)


def task_ids(store: Store, job: JobRow) -> list[int]:
    return [row.task_id for row in store.results(job)]


def send(store: Store, task_id: int, number: int, worker: WorkerRow, deadline: float | None = None) -> int:
    """What dispatch records when it sends a task: its attempt id."""
    now = time.time()
    return store.open_attempts([(task_id, number, worker.id, deadline or now + 60, f"n{task_id}-{number}")],
                               now)[task_id]


def close(store: Store, attempt_id: int, worker: WorkerRow, outcome: AttemptOutcome, task_id: int,
          task_state: TaskState, error: dict | None = None) -> None:
    """What the ledger records for an attempt that ended without a value."""
    changes = Changes()
    changes.close(attempt_id, outcome, dump_json(error) if error else None, worker.id)
    changes.set_task(task_id, task_state)
    store.apply(changes, time.time())


def finish(store: Store, task_id: int, worker: WorkerRow, value: object, number: int = 1) -> int:
    """What the ledger records for an accepted result."""
    attempt_id = send(store, task_id, number, worker)
    changes = Changes()
    changes.accept(task_id, attempt_id, worker.id, dump_json(value), 0.5, time.time())
    store.apply(changes, time.time())
    return attempt_id


# --------------------------------------------------------------------------- submit
def test_job_and_its_tasks_are_stored_in_input_order(store: Store) -> None:
    job = store.create_job("add", [[1, 2], [3, 4], [5, 6]], timeout=5, max_attempts=2)

    assert job.name == f"job-{job.id}" and job.total == 3
    assert (job.function, job.timeout, job.max_attempts, job.state) == ("add", 5.0, 2, "active")
    rows = list(store.results(job))
    assert [(r.index, r.args, r.state, r.value, r.worker, r.attempts) for r in rows] == [
        (0, [1, 2], "pending", None, None, 0), (1, [3, 4], "pending", None, None, 0),
        (2, [5, 6], "pending", None, None, 0)]
    progress = store.progress(job)
    assert (progress.total, progress.pending, progress.finished, progress.state) == (3, 3, 0, "active")


def test_named_job_and_any_json_arguments(store: Store) -> None:
    args = [["text", 1.5, None, True, {"nested": [1, {"deep": "x"}]}],
            ["tab\there", "back\\slash", "\\N", "line\nbreak", "é ü 漢", "quote\"s", 10**30, -0.0]]
    job = store.create_job("sum", args, name="my-run.2")
    assert store.get_job("my-run.2").id == job.id
    assert [r.args for r in store.results(job)] == args


def test_100_000_tasks_are_stored_in_seconds_with_progress(store: Store) -> None:
    seen: list[int] = []
    started = time.monotonic()
    job = store.create_job("noop", ([] for _ in range(100_000)), on_progress=seen.append)
    elapsed = time.monotonic() - started

    # ~1 s on an idle 2-core box; a row-by-row insert would take minutes
    assert elapsed < 15, f"100,000 tasks took {elapsed:.1f} s"
    assert store.progress(job).pending == 100_000 == job.total
    assert seen == sorted(seen) and seen[-1] == 100_000


@pytest.mark.parametrize(("args_list", "line", "words"), [
    ([[1], [2], "not a list", [4]], 2, "line 3: task arguments must be a JSON array"),
    ([[1], [float("nan")]], 1, "line 2: arguments are not plain JSON"),
    ([[{1, 2}]], 0, "line 1: arguments are not plain JSON"),
    ([["x" * (300 * 1024)]], 0, "over the"),
    ([[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]], 0, "nested deeper"),
    ([], None, "holds no tasks"),
])
def test_bad_input_names_the_line_and_stores_nothing(store: Store, args_list: list, line: int | None,
                                                     words: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        store.create_job("add", args_list)
    assert caught.value.line == line
    assert words in str(caught.value)
    assert store.jobs() == [] and store.open_leases() == []
    assert sum(store.task_counts(1).values()) == 0


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"name": "bad/name"}, "invalid job name"),
    ({"name": "job-12"}, "reserved"),
    ({"timeout": 0}, "timeout"),
    ({"timeout": float("inf")}, "timeout"),
    ({"max_attempts": 0}, "max attempts"),
    ({"function": ""}, "function name"),
])
def test_bad_options_are_refused_before_anything_is_stored(store: Store, kwargs: dict, words: str) -> None:
    options = {"function": "add", **kwargs}
    function = options.pop("function")
    with pytest.raises(InvalidInput, match=words):
        store.create_job(function, [[1, 2]], **options)
    assert store.jobs() == []


def test_a_job_name_is_used_once(store: Store) -> None:
    first = store.create_job("add", [[1, 2]], name="run")
    with pytest.raises(InvalidInput, match="already exists"):
        store.create_job("add", [[1, 2]], name="run")
    assert store.jobs() == [store.get_job(first.id)] and store.progress(first).total == 1


# --------------------------------------------------------------------------- reading
def test_jobs_are_found_by_id_or_name_and_unknown_ones_say_which_exist(store: Store) -> None:
    first = store.create_job("add", [[1, 1]], name="alpha")
    second = store.create_job("add", [[1, 1]])
    assert store.get_job(first.id).name == "alpha"
    assert store.get_job(str(second.id)).name == second.name
    assert [j.name for j in store.jobs()] == ["alpha", second.name]

    # Those of some ids (unknown ones left out), and every job's marks: what the engine's poll reads
    assert store.jobs([second.id, 10_000, first.id]) == [store.get_job(first.id), store.get_job(second.id)]
    assert store.jobs([]) == [] and store.jobs([10_000]) == []
    assert store.job_marks() == [(j.id, j.created_at, j.revision, j.state, j.total) for j in store.jobs()]
    store.cancel_job(first)
    [mark, _] = store.job_marks()
    assert mark[2:4] == (store.get_job(first.id).revision, "cancelled") and mark[2] > first.revision

    with pytest.raises(UnknownJob) as caught:
        store.get_job("beta")
    assert isinstance(caught.value, StoreError)
    assert "no job 'beta'" in str(caught.value) and "alpha" in str(caught.value) and second.name in str(caught.value)
    assert caught.value.known == [second.name, "alpha"]


def test_unknown_job_in_an_empty_store_says_how_to_submit(store: Store) -> None:
    with pytest.raises(UnknownJob, match="dockercomp coordinator submit"):
        store.get_job(7)


def test_results_carry_values_workers_and_the_reason_of_every_failed_attempt(store: Store) -> None:
    job = store.create_job("add", [[1, 2], [3, 4], [5, 6]])
    w1, w2 = add_worker(store, "alice/w1"), add_worker(store, "bob/w2")
    t0, t1, t2 = task_ids(store, job)
    close(store, send(store, t0, 1, w1), w1, AttemptOutcome.LOST, t0, TaskState.PENDING,
          {"type": "WorkerLost", "message": "gone"})
    finish(store, t0, w2, 3, number=2)
    close(store, send(store, t1, 1, w1), w1, AttemptOutcome.ERROR, t1, TaskState.PENDING,
          {"type": "ValueError", "message": "bad", "traceback": "tb"})
    close(store, send(store, t1, 2, w2), w2, AttemptOutcome.EXPIRED, t1, TaskState.FAILED,
          {"type": "LeaseExpired", "message": "slow"})

    r0, r1, r2 = store.results(job)
    assert (r0.state, r0.value, r0.worker, r0.attempts, r0.elapsed) == ("done", 3, "bob/w2", 2, 0.5)
    assert r0.errors == [{"attempt": 1, "worker": "alice/w1", "outcome": "lost", "type": "WorkerLost", "message": "gone"}]
    assert (r1.state, r1.value, r1.worker) == ("failed", None, None)
    assert [(e["attempt"], e["outcome"], e["type"], e["message"]) for e in r1.errors] == [
        (1, "error", "ValueError", "bad"), (2, "expired", "LeaseExpired", "slow")]
    assert (r2.state, r2.errors) == ("pending", [])
    progress = store.progress(job)
    assert (progress.done, progress.failed, progress.pending, progress.finished) == (1, 1, 1, 2)
    assert store.task_ids(job.id, ("done", "failed")) == {t0, t1}
    assert {w.key: (w.tasks_done, w.tasks_failed) for w in store.workers()} == {"alice/w1": (0, 2), "bob/w2": (1, 1)}


def test_a_late_value_of_a_closed_attempt_takes_its_failure_back(store: Store) -> None:
    # issue 10 item 4, as the ledger writes it: accept the closed attempt and count -1 failure
    job = store.create_job("add", [[1, 2]])
    worker = add_worker(store, "alice/w1")
    [task] = task_ids(store, job)
    attempt = send(store, task, 1, worker)
    close(store, attempt, worker, AttemptOutcome.EXPIRED, task, TaskState.PENDING, {"type": "LeaseExpired"})
    assert [(w.tasks_done, w.tasks_failed) for w in store.workers()] == [(0, 1)]
    changes = Changes()
    changes.worker_failed[worker.id] -= 1
    changes.accept(task, attempt, worker.id, dump_json(3), 0.5, time.time())
    store.apply(changes, time.time())
    [row] = store.results(job)
    assert (row.state, row.value, row.errors) == ("done", 3, [])
    assert store.find_attempt(task, 1).outcome == AttemptOutcome.OK.value  # type: ignore[union-attr]
    assert [(w.tasks_done, w.tasks_failed) for w in store.workers()] == [(1, 0)]


def test_results_stream_large_jobs_in_order(store: Store) -> None:
    job = store.create_job("add", [[i, i] for i in range(2500)])
    assert [r.index for r in store.results(job)] == list(range(2500))


# --------------------------------------------------------------------------- cancel, retry
def test_cancel_stops_pending_and_assigned_tasks_but_keeps_finished_ones(store: Store) -> None:
    job = store.create_job("add", [[1, 1]] * 4)
    worker = add_worker(store, "local/w1")
    t0, t1, _, _ = task_ids(store, job)
    finish(store, t0, worker, 2)
    send(store, t1, 1, worker)

    assert store.cancel_job(job) == 3
    progress = store.progress(job)
    assert (progress.state, progress.done, progress.cancelled, progress.finished_at is not None) == (
        "cancelled", 1, 3, True)
    assert store.get_job(job.id).revision == job.revision + 1  # a running engine notices
    # the open attempt stays open: the engine closes it when the worker answers or dies
    assert store.inflight() == {"local/w1": 1}
    assert store.cancel_job(job) == 0


def test_retry_returns_failed_tasks_with_a_fresh_budget(store: Store) -> None:
    job = store.create_job("add", [[1, 1], [2, 2]], max_attempts=2)
    worker = add_worker(store, "local/w1")
    t0, t1 = task_ids(store, job)
    finish(store, t0, worker, 2)
    close(store, send(store, t1, 1, worker), worker, AttemptOutcome.ERROR, t1, TaskState.PENDING,
          {"type": "E", "message": "1"})
    close(store, send(store, t1, 2, worker), worker, AttemptOutcome.ERROR, t1, TaskState.FAILED,
          {"type": "E", "message": "2"})
    store.finish_job(job.id, time.time())
    assert store.get_job(job.id).state == "failed"  # a job that ended with failed tasks says so

    assert store.retry_failed(job) == 1
    progress = store.progress(job)
    assert (progress.state, progress.pending, progress.done, progress.finished_at) == ("active", 1, 1, None)
    # attempt 3 is the first of the new budget
    assert store.pending_tasks(job.id, 10) == [(t1, "[2,2]", 2, 2)]
    assert store.retry_failed(job) == 0


# --------------------------------------------------------------------------- workers
def test_workers_and_what_they_hold(store: Store) -> None:
    job = store.create_job("add", [[1, 1]] * 3)
    w1, w2 = add_worker(store, "local/w1"), add_worker(store, "local/w2")
    t0, t1, _ = task_ids(store, job)
    send(store, t0, 1, w1)
    send(store, t1, 1, w1)
    assert [w.key for w in store.workers()] == ["local/w1", "local/w2"]
    assert store.inflight() == {"local/w1": 2}
    assert job.total == 3 and w2


def test_a_worker_reads_back_as_its_presence_wrote_it(store: Store) -> None:
    worker = add_worker(store, "alice/box", functions=["sum", "add"], host="lab", cpus=8, prefetch=3, seq=4)
    assert (worker.key, worker.volunteer, worker.name, worker.functions) == ("alice/box", "alice", "box", ("add", "sum"))

    store.update_worker(worker.id, state=WorkerState.LOST.value, lost_at=123.0, seq=5, functions=["noop"])

    [again] = store.workers()
    assert (again.id, again.state, again.lost_at, again.seq, again.functions) == (worker.id, "lost", 123.0, 5, ("noop",))
    assert (again.host, again.cpus, again.prefetch, again.capacity) == ("lab", 8, 3, 2)
    with pytest.raises(ValueError, match="not worker fields"):
        store.update_worker(worker.id, tasks_done=7)


def test_purge_takes_only_workers_lost_for_longer_than_the_grace_period(store: Store) -> None:
    now = time.time()
    long_lost = add_worker(store, "local/long-lost", WorkerState.LOST.value, lost_at=now - 600)
    just_lost = add_worker(store, "local/just-lost", WorkerState.LOST.value, lost_at=now - 10)
    alive = add_worker(store, "local/alive")

    purged = store.purge_lost(300, now)

    assert [w.key for w in purged] == ["local/long-lost"] and purged[0].state == "purged"
    assert {w.key: w.state for w in store.workers()} == {
        "local/alive": "online", "local/just-lost": "lost", "local/long-lost": "purged"}
    assert store.purged_among([long_lost.id, just_lost.id, alive.id]) == [long_lost.id]
    assert [w.key for w in store.purge_lost(0, now)] == ["local/just-lost"]
    assert store.purge_lost(0, now) == []


# --------------------------------------------------------------------------- the engine's writes
def test_dispatch_takes_the_oldest_pending_tasks_and_opens_their_attempts(store: Store) -> None:
    job = store.create_job("add", [[i] for i in range(5)], timeout=7)
    worker = add_worker(store, "local/w1")
    ids = task_ids(store, job)
    assert store.pending_tasks(job.id, 2) == [(ids[0], "[0]", 0, 0), (ids[1], "[1]", 0, 0)]

    now = time.time()
    opened = store.open_attempts([(ids[0], 1, worker.id, now + 10, "secret-a"), (ids[1], 1, worker.id, now + 20,
                                                                                "secret-b")], now)

    assert sorted(opened) == ids[:2] and len(set(opened.values())) == 2
    assert [row[0] for row in store.pending_tasks(job.id, 10)] == ids[2:]
    assert store.task_counts(job.id) == {"pending": 3, "assigned": 2, "done": 0, "failed": 0, "cancelled": 0}
    leases = sorted(store.open_leases(), key=lambda lease: lease.task_id)
    assert [(lease.attempt_id, lease.task_id, lease.number, lease.job_id, lease.worker_id, lease.args,
             lease.function, lease.timeout, lease.deadline, lease.nonce) for lease in leases] == [
        (opened[ids[0]], ids[0], 1, job.id, worker.id, "[0]", "add", 7.0, now + 10, "secret-a"),
        (opened[ids[1]], ids[1], 1, job.id, worker.id, "[1]", "add", 7.0, now + 20, "secret-b")]
    record = store.find_attempt(ids[0], 1)
    assert record is not None
    # The nonce is kept with the attempt: a late result is checked against it after a restart.
    assert (record.attempt_id, record.worker_id, record.outcome, record.task_state, record.job_id,
            record.nonce) == (opened[ids[0]], worker.id, "open", "assigned", job.id, "secret-a")
    assert store.find_attempt(ids[0], 2) is None
    assert store.task_exists(ids[4]) and not store.task_exists(ids[4] + 1000)

    store.extend_deadlines(5.0)
    assert sorted(lease.deadline for lease in store.open_leases()) == [now + 15, now + 25]

    # A lone attempt (SQLite takes its id another way: sqlstore.open_attempts), then two more.
    [(lone, lone_id)] = store.open_attempts([(ids[2], 1, worker.id, now + 30, "secret-c")], now).items()
    more = store.open_attempts([(ids[3], 1, worker.id, now + 30, "d"), (ids[4], 1, worker.id, now + 30, "e")], now)
    by_task = {lease.task_id: lease.attempt_id for lease in store.open_leases()}
    assert lone == ids[2] and by_task == {**opened, lone: lone_id, **more}
    assert len(set(by_task.values())) == 5


def test_a_late_value_supersedes_the_open_attempt_of_its_task(store: Store) -> None:
    job = store.create_job("add", [[1, 1]])
    w1, w2 = add_worker(store, "local/w1"), add_worker(store, "local/w2")
    [task] = task_ids(store, job)
    first = send(store, task, 1, w1)
    close(store, first, w1, AttemptOutcome.EXPIRED, task, TaskState.PENDING)
    second = send(store, task, 2, w2)

    changes = Changes()
    changes.supersede(second)
    changes.accept(task, first, w1.id, "2", 0.1, time.time())
    store.apply(changes, time.time())

    assert not changes  # applied and cleared
    assert store.find_attempt(task, 2).outcome == "superseded"  # type: ignore[union-attr]
    assert store.find_attempt(task, 1).outcome == "ok"  # type: ignore[union-attr]
    [row] = store.results(job)
    assert (row.state, row.value, row.worker) == ("done", 2, "local/w1")
    assert store.inflight() == {}


def test_the_engine_never_overrides_a_cancel(store: Store) -> None:
    job = store.create_job("add", [[1, 1], [2, 2]])
    worker = add_worker(store, "local/w1")
    t0, t1 = task_ids(store, job)
    a0, a1 = send(store, t0, 1, worker), send(store, t1, 1, worker)
    store.cancel_job(job)

    changes = Changes()
    changes.close(a0, AttemptOutcome.CANCELLED, None, None)
    changes.set_task(t0, TaskState.PENDING)  # a stale decision: back to pending
    changes.close(a1, AttemptOutcome.ERROR, None, worker.id)
    changes.set_task(t1, TaskState.FAILED)
    store.apply(changes, time.time())

    assert [r.state for r in store.results(job)] == ["cancelled", "cancelled"]
    assert store.inflight() == {}


def test_finish_job_closes_only_an_active_job(store: Store) -> None:
    job = store.create_job("add", [[1, 1]])
    store.cancel_job(job)
    store.finish_job(job.id, time.time())
    assert store.get_job(job.id).state == "cancelled"


def test_a_failed_transaction_leaves_nothing_behind(store: Store) -> None:
    job = store.create_job("add", [[1, 1]])
    worker = add_worker(store, "local/w1")
    [task] = task_ids(store, job)

    with pytest.raises(RuntimeError), store.transaction():
        attempt_id = send(store, task, 1, worker)
        changes = Changes()
        changes.accept(task, attempt_id, worker.id, "2", 0.1, time.time())
        store.apply(changes, time.time())
        store.update_worker(worker.id, state=WorkerState.LOST.value)
        raise RuntimeError("the step failed half-way")

    assert [(r.state, r.attempts, r.value) for r in store.results(job)] == [("pending", 0, None)]
    assert [(w.state, w.tasks_done) for w in store.workers()] == [("online", 0)]
    assert store.open_leases() == [] and store.find_attempt(task, 1) is None


def test_memory_urls_open_a_fresh_memory_store() -> None:
    first, second = Store.open("memory://"), Store.open("memory://")
    first.create_job("add", [[1, 1]])
    assert second.jobs() == [] and not first.is_sqlite and not first.is_postgres


# --------------------------------------------------------------------------- SQLite itself
@pytest.mark.real
def test_sqlite_submit_is_on_disk_when_it_returns(tmp_path: Path) -> None:
    # A process that submits and is killed the instant create_job returns.
    db = tmp_path / "durable.db"
    script = ("import os, signal; from dockercomp.coordinator.store import Store; "
              f"Store.open({str(db)!r}).create_job('add', [[i, i] for i in range(5000)], name='kept'); "
              "os.kill(os.getpid(), signal.SIGKILL)")
    subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, check=False, timeout=30)
    store = Store.open(str(db))
    assert store.progress(store.get_job("kept")).pending == 5000


@pytest.mark.real
def test_sqlite_url_forms_and_wal(tmp_path: Path) -> None:
    relative = Store.open(f"sqlite:///{os.path.relpath(tmp_path / 'a.db')}")
    absolute = Store.open(f"sqlite:///{tmp_path / 'b.db'}")
    for store in (relative, absolute):
        store.bind()
        assert store.is_sqlite
        assert store.db.execute_sql("PRAGMA journal_mode").fetchone()[0] == "wal"  # type: ignore[attr-defined]
    assert (tmp_path / "a.db").exists() and (tmp_path / "b.db").exists()


@pytest.mark.real
@pytest.mark.parametrize(("url", "words"), [
    ("/no/such/dir/x.db", "does not exist"),
    (":memory:", "in-memory"),
    ("sqlite://", "names no file"),
])
def test_sqlite_unusable_paths_say_what_to_do(url: str, words: str) -> None:
    with pytest.raises(StoreError, match=words):
        Store.open(url)


@pytest.mark.real
def test_sqlite_a_file_that_is_not_a_database_is_refused_clearly(tmp_path: Path) -> None:
    junk = tmp_path / "notes.txt"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="cannot open the database"):
        Store.open(str(junk))


@pytest.mark.real
def test_sqlite_writers_wait_for_each_other(tmp_path: Path) -> None:
    db = str(tmp_path / "shared.db")
    store = Store.open(db)
    other = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock for a moment
    threading.Timer(0.5, other.execute, ("COMMIT",)).start()

    started = time.monotonic()
    store.create_job("add", [[1, 2]])
    assert time.monotonic() - started >= 0.4
    other.close()


@pytest.mark.real
def test_sqlite_a_lock_held_too_long_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "SQLITE_BUSY_TIMEOUT_MS", 200)
    db = str(tmp_path / "busy.db")
    store = Store.open(db)
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreLocked, match="locked by another process.*retry"):
            store.create_job("add", [[1, 2]])
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert store.jobs() == []


@pytest.mark.real
def test_sqlite_two_stores_in_two_threads_never_cross(tmp_path: Path) -> None:
    stores = [Store.open(str(tmp_path / f"{name}.db")) for name in ("left", "right")]
    seen: dict[str, list[str]] = {}

    def work(store: Store, name: str) -> None:
        for i in range(30):
            store.create_job("add", [[i, i]], name=f"{name}-{i}")
        seen[name] = [j.name for j in store.jobs()]

    threads = [threading.Thread(target=work, args=(s, n)) for s, n in zip(stores, ("left", "right"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == {name: [f"{name}-{i}" for i in range(30)] for name in ("left", "right")}


# --------------------------------------------------------------------------- PostgreSQL itself
@pytest.mark.real
@pytest.mark.postgres
def test_postgres_unreachable_server_says_what_to_do() -> None:
    with pytest.raises(StoreError, match="PostgreSQL server running"):
        Store.open(f"postgresql://postgres@127.0.0.1:{free_port()}/nothing")


# --------------------------------------------------------------------------- issue 10 (first use)
def test_a_task_lists_its_attempts_with_errors_and_tracebacks(store: Store) -> None:
    job = store.create_job("add", [[1, 2], [3, 4]])
    w1, w2 = add_worker(store, "alice/w1"), add_worker(store, "bob/w2")
    _, t1 = task_ids(store, job)
    close(store, send(store, t1, 1, w1), w1, AttemptOutcome.ERROR, t1, TaskState.PENDING,
          {"type": "ValueError", "message": "bad", "traceback": "Traceback ...\nValueError: bad"})
    finish(store, t1, w2, 7, number=2)

    row, attempts = store.attempts(job, 1)
    assert (row.index, row.state, row.value, row.worker) == (1, "done", 7, "bob/w2")
    assert [(a.number, a.worker, a.outcome) for a in attempts] == [(1, "alice/w1", "error"), (2, "bob/w2", "ok")]
    assert attempts[0].error == {"type": "ValueError", "message": "bad", "traceback": "Traceback ...\nValueError: bad"}
    assert attempts[1].error == {} and attempts[1].finished_at is not None
    assert store.attempts(job, 0)[1] == []
    with pytest.raises(UnknownTask, match="no task #2"):
        store.attempts(job, 2)


def test_running_counts_the_first_capacity_attempts_of_each_worker(store: Store) -> None:
    # capacity 2 (add_worker): of 3 tasks sent to one worker, the third waits in its queue
    job = store.create_job("add", [[i, i] for i in range(5)])
    worker = add_worker(store, "local/w1")
    t0, t1, t2, t3, _ = task_ids(store, job)
    for task_id in (t0, t1, t2):
        send(store, task_id, 1, worker)
    progress = store.progress(job)
    assert (progress.assigned, progress.running, progress.queued) == (3, 2, 1)
    finish(store, t3, worker, 6)  # an attempt that ended frees no slot twice
    close(store, store.find_attempt(t0, 1).attempt_id, worker, AttemptOutcome.ERROR, t0, TaskState.PENDING)
    progress = store.progress(job)
    assert (progress.assigned, progress.running, progress.queued) == (2, 2, 0)


def test_a_finished_job_is_deleted_with_everything_it_holds(store: Store) -> None:
    job = store.create_job("add", [[1, 1], [2, 2]], name="twice")
    other = store.create_job("add", [[3, 3]])
    worker = add_worker(store, "local/w1")
    t0, t1 = task_ids(store, job)
    finish(store, t0, worker, 2)
    close(store, send(store, t1, 1, worker), worker, AttemptOutcome.ERROR, t1, TaskState.FAILED, {"type": "E"})

    assert store.delete_job(job) == 2
    with pytest.raises(UnknownJob):
        store.get_job("twice")
    assert [j.name for j in store.jobs()] == [other.name]
    assert [r.index for r in store.results(other)] == [0]
    again = store.create_job("add", [[9, 9]], name="twice")  # the name is free again
    assert [r.args for r in store.results(again)] == [[9, 9]]


def test_a_job_with_tasks_on_workers_is_not_deleted(store: Store) -> None:
    job = store.create_job("add", [[1, 1]], name="busy")
    worker = add_worker(store, "local/w1")
    send(store, task_ids(store, job)[0], 1, worker)
    with pytest.raises(JobBusy, match="1 task"):
        store.delete_job(job)
    assert store.get_job("busy").total == 1


def test_replace_swaps_a_job_all_or_nothing(store: Store) -> None:
    old = store.create_job("add", [[1, 1]], name="cell")
    with pytest.raises(InvalidInput, match="already exists"):
        store.create_job("add", [[2, 2]], name="cell")
    # a bad replacement leaves the old job as it was
    with pytest.raises(InvalidInput, match="line 2"):
        store.create_job("add", [[2, 2], "bad"], name="cell", replace=True)
    assert [r.args for r in store.results(store.get_job("cell"))] == [[1, 1]]
    new = store.create_job("mul", [[2, 2], [3, 3]], name="cell", replace=True)
    assert new.id != old.id and store.get_job("cell").function == "mul"
    assert [r.args for r in store.results(new)] == [[2, 2], [3, 3]]
    assert [j.name for j in store.jobs()] == ["cell"]


def test_the_heartbeat_is_kept_and_replaced(store: Store) -> None:
    assert store.heartbeat() is None
    beat = Heartbeat(started=1.0, beat_at=2.0, stopped_at=None, connected=True, host="h", pid=7, broker="mqtt://b")
    store.beat(beat)
    assert store.heartbeat() == beat
    stopped = Heartbeat(1.0, 4.0, 4.5, False, "h", 7, "mqtt://b")
    store.beat(stopped)
    assert store.heartbeat() == stopped


def test_sqlite_a_reader_never_creates_a_database(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / ".." / "coordinator.db"
    with pytest.raises(DatabaseMissing, match=f"no coordinator database at {tmp_path / 'coordinator.db'}") as caught:
        Store.open(str(tmp_path / "coordinator.db"), create=False)
    assert "--db" in caught.value.hint and "DOCKERCOMP_DB" in caught.value.hint
    assert not (tmp_path / "coordinator.db").exists()
    Store.open(str(tmp_path / "coordinator.db")).close()  # submit and serve create it
    Store.open(str(path.resolve()), create=False).close()


@pytest.mark.real
@pytest.mark.postgres
def test_postgres_a_reader_never_creates_the_tables(postgres_db: str) -> None:
    with pytest.raises(DatabaseMissing, match="no coordinator database"):
        Store.open(postgres_db, create=False)
    Store.open(postgres_db).close()
    Store.open(postgres_db, create=False).close()
# --------------------------------------------------------------------------- replication (issue 11)
def test_replication_options_replica_values_quorum_and_credit(store: Store) -> None:
    replication = Replication.make(replicas=2, quorum=2, validator="tolerance")
    job = store.create_job("add", [[1], [2]], replication=replication)
    assert store.get_job(job.id).replication == replication
    assert [j.replication for j in store.jobs()] == [replication]
    single = store.create_job("add", [[1]])
    assert store.get_job(single.id).replication.single
    a, b, c = add_worker(store, "alice/w"), add_worker(store, "bob/w"), add_worker(store, "carol/w")
    first, second = task_ids(store, job)
    now = time.time()
    opened = [store.open_attempts([(first, n, w.id, now + 10, f"n{n}")], now)[first] for n, w in ((1, a), (2, b), (3, c))]
    store.open_attempts([(second, 1, a.id, now + 10, "n")], now)
    # three values for the first task: two agree, one does not
    changes = Changes()
    changes.reported += [(opened[0], "3", 2.0, None), (opened[1], "4", 1.5, None), (opened[2], "3", 2.5, None)]
    store.apply(changes, now)
    assert store.replica_counts(job.id) == (0, 0, 1)  # the first waits for no open replica
    assert [(r.number, r.outcome, r.value) for r in store.replica_attempts(job.id) if r.task_id == first] == [
        (1, "unvalidated", "3"), (2, "unvalidated", "4"), (3, "unvalidated", "3")]
    changes.accept(first, opened[0], a.id, "3", 2.0, now)
    changes.ok_attempts.append(opened[2])
    changes.invalid_attempts.append(opened[1])
    store.apply(changes, now)
    row = next(iter(store.results(store.get_job(job.id))))
    assert (row.state, row.value) == ("done", 3)
    assert [(r["worker"], r["outcome"], r["value"]) for r in row.replicas] == [
        ("alice/w", "ok", 3), ("bob/w", "invalid", 4), ("carol/w", "ok", 3)]
    assert store.replica_counts(job.id) == (1, 3, 0)
    progress = store.progress(job)
    assert (progress.replication, progress.waiting) == (3.0, 0)
    stats = {s.volunteer: (s.workers, s.validated, s.invalid, s.failed, s.credit) for s in store.volunteer_stats()}
    assert stats == {"alice": (1, 1, 0, 0, 2.0), "bob": (1, 0, 1, 0, 0.0), "carol": (1, 1, 0, 0, 2.5)}
    assert [s.volunteer for s in store.volunteer_stats()] == ["carol", "alice", "bob"]


def test_many_replica_values_in_one_apply_each_keep_their_own_fields(store: Store) -> None:
    # A step's worth of values and more, errors mixed with none: every row gets its own value
    # and time, none another's.
    job = store.create_job("add", [[i] for i in range(250)], replication=Replication.make(replicas=2, quorum=2))
    worker = add_worker(store, "alice/w")
    now = time.time()
    ids = task_ids(store, job)
    opened = store.open_attempts([(task, 1, worker.id, now + 10, f"n{task}") for task in ids], now)
    changes = Changes()
    changes.reported += [(opened[task], dump_json([i, "v"]), i / 8, None if i % 3 else dump_json({"type": f"E{i}"}))
                         for i, task in enumerate(ids)]
    store.apply(changes, now)
    rows = {r.task_id: r for r in store.replica_attempts(job.id)}
    assert [(rows[task].outcome, json.loads(rows[task].value), rows[task].elapsed) for task in ids] == [
        ("unvalidated", [i, "v"], i / 8) for i in range(250)]


def test_a_task_failed_without_quorum_shows_the_reason_with_its_values(store: Store) -> None:
    job = store.create_job("add", [[1]], replication=Replication.make(replicas=2, quorum=2, max_replicas=2))
    a, b = add_worker(store, "alice/w"), add_worker(store, "bob/w")
    [task] = task_ids(store, job)
    now = time.time()
    one = store.open_attempts([(task, 1, a.id, now + 10, "n1")], now)[task]
    two = store.open_attempts([(task, 2, b.id, now + 10, "n2")], now)[task]
    changes = Changes()
    changes.reported += [(one, "1", 1.0, None), (two, "2", 1.0, dump_json({"type": "NoQuorum", "message": "no"}))]
    changes.set_task(task, TaskState.FAILED)
    store.apply(changes, now)
    [row] = store.results(job)
    assert row.state == "failed" and [r["value"] for r in row.replicas] == [1, 2]
    assert [(e["attempt"], e["worker"], e["type"]) for e in row.errors] == [(2, "bob/w", "NoQuorum")]


def test_quarantine_until_released(store: Store) -> None:
    assert store.quarantines() == {} and not store.release("mallory")
    store.quarantine("mallory", "job 1: 4 of 6 results invalid", 100.0)
    store.quarantine("mallory", "again", 200.0)  # the first reason stays
    assert store.quarantines() == {"mallory": "job 1: 4 of 6 results invalid"}
    [stats] = store.volunteer_stats()
    assert (stats.volunteer, stats.workers, stats.quarantined, stats.quarantined_at) == (
        "mallory", 0, "job 1: 4 of 6 results invalid", 100.0)
    assert store.release("mallory") and store.quarantines() == {}
@pytest.mark.parametrize("failure", ["bad argument", "generator raises"])
def test_a_stream_that_fails_after_several_batches_stores_nothing(store: Store, failure: str) -> None:
    # issue 10 item 16: generators are stored batch by batch inside one transaction, so a
    # failure late in the stream must still leave no job and no task behind.
    class Broken(Exception):
        pass

    def tasks() -> Iterator[Any]:
        yield from ([i] for i in range(2 * INSERT_BATCH + 1))
        if failure == "bad argument":
            yield {"not": "a list"}
        raise Broken("the scientist's generator failed")

    stored: list[int] = []
    with pytest.raises(InvalidInput if failure == "bad argument" else Broken):
        store.create_job("add", tasks(), name="streamed", on_progress=stored.append)
    assert stored[:2] == [INSERT_BATCH, 2 * INSERT_BATCH]  # batches went in before the failure
    assert store.jobs() == [] and sum(store.task_counts(1).values()) == 0
    assert store.create_job("add", [[1]], name="streamed").total == 1  # the name was never taken


def test_unroutable_pending_tasks_fail_with_the_reason(store: Store) -> None:
    job = store.create_job("count_prime", [[1], [2], [3]], name="typo")
    worker = add_worker(store, "local/w1")
    t0, _, _ = task_ids(store, job)
    finish(store, t0, worker, 1)
    assert store.fail_pending(job.id, "no online worker offers 'count_prime'", time.time()) == 2
    rows = list(store.results(job))
    assert [r.state for r in rows] == ["done", "failed", "failed"]
    assert rows[0].errors == []
    assert rows[1].errors == [{"attempt": None, "worker": None, "outcome": "unroutable", "type": "Unroutable",
                               "message": "no online worker offers 'count_prime'"}]
    store.finish_job(job.id, time.time())
    assert store.get_job(job.id).state == "failed"
    # a retry makes them pending again, without the old reason
    assert store.retry_failed(job) == 2
    assert [r.errors for r in store.results(job)][1:] == [[], []]
    assert store.fail_pending(job.id, "again", time.time()) == 2
    assert store.delete_job(store.get_job(job.id)) == 3
