"""The store as the CLI and the Python API use it, on a real SQLite file.

test_postgres.py runs this same suite against a real PostgreSQL server (``store_url`` is
overridden there); tests named ``test_sqlite_*`` are about SQLite itself and run here only.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dockercomp.coordinator import store as store_module
from dockercomp.coordinator.errors import InvalidInput, StoreError, StoreLocked, UnknownJob
from dockercomp.coordinator.store import (
    Attempt,
    AttemptOutcome,
    Job,
    Result,
    Store,
    Task,
    TaskState,
    Worker,
    WorkerState,
    dump_json,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return str(tmp_path / "coordinator.db")


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    opened = Store.open(store_url)
    yield opened
    opened.close()


def count(model: type) -> int:
    return model.select().count()


def add_worker(key: str, state: str = WorkerState.ONLINE.value, lost_at: float | None = None) -> Worker:
    volunteer, name = key.split("/")
    now = time.time()
    return Worker.create(key=key, volunteer=volunteer, name=name, state=state, first_seen=now,
                         last_seen=now, lost_at=lost_at, capacity=2)


def attempt(task_id: int, number: int, worker: Worker, outcome: AttemptOutcome, error: dict | None = None) -> Attempt:
    now = time.time()
    return Attempt.create(task=task_id, number=number, worker=worker, sent_at=now, deadline=now + 60,
                          finished_at=now, outcome=outcome.value, error=dump_json(error) if error else None)


def finish(store: Store, task: Task, worker: Worker, value: object, number: int = 1) -> None:
    """What the engine records for an accepted result."""
    done = attempt(task.id, number, worker, AttemptOutcome.OK)
    Result.create(task=task.id, attempt=done, worker=worker, value=dump_json(value), elapsed=0.5,
                  received_at=time.time())
    Task.update(state=TaskState.DONE.value, attempts=number).where(Task.id == task.id).execute()


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
    assert store.jobs() == [] and count(Task) == 0


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
    store.create_job("add", [[1, 2]], name="run")
    with pytest.raises(InvalidInput, match="already exists"):
        store.create_job("add", [[1, 2]], name="run")
    assert len(store.jobs()) == 1 and count(Task) == 1


def test_sqlite_submit_is_on_disk_when_it_returns(tmp_path: Path) -> None:
    # A process that submits and is killed the instant create_job returns.
    db = tmp_path / "durable.db"
    script = ("import os, signal; from coordinator.store import Store; "
              f"Store.open({str(db)!r}).create_job('add', [[i, i] for i in range(5000)], name='kept'); "
              "os.kill(os.getpid(), signal.SIGKILL)")
    subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                   check=False, timeout=30)
    store = Store.open(str(db))
    assert store.progress(store.get_job("kept")).pending == 5000


# --------------------------------------------------------------------------- reading
def test_jobs_are_found_by_id_or_name_and_unknown_ones_say_which_exist(store: Store) -> None:
    first = store.create_job("add", [[1, 1]], name="alpha")
    second = store.create_job("add", [[1, 1]])
    assert store.get_job(first.id).name == "alpha"
    assert store.get_job(str(second.id)).name == second.name
    assert [j.name for j in store.jobs()] == ["alpha", second.name]

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
    w1, w2 = add_worker("alice/w1"), add_worker("bob/w2")
    t0, t1, t2 = Task.select().order_by(Task.index)
    attempt(t0.id, 1, w1, AttemptOutcome.LOST, {"type": "WorkerLost", "message": "gone"})
    finish(store, t0, w2, 3, number=2)
    attempt(t1.id, 1, w1, AttemptOutcome.ERROR, {"type": "ValueError", "message": "bad", "traceback": "tb"})
    attempt(t1.id, 2, w2, AttemptOutcome.EXPIRED, {"type": "LeaseExpired", "message": "slow"})
    Task.update(state=TaskState.FAILED.value, attempts=2).where(Task.id == t1.id).execute()

    r0, r1, r2 = store.results(job)
    assert (r0.state, r0.value, r0.worker, r0.attempts, r0.elapsed) == ("done", 3, "bob/w2", 2, 0.5)
    assert r0.errors == [{"attempt": 1, "worker": "alice/w1", "outcome": "lost", "type": "WorkerLost", "message": "gone"}]
    assert (r1.state, r1.value, r1.worker) == ("failed", None, None)
    assert [(e["attempt"], e["outcome"], e["type"], e["message"]) for e in r1.errors] == [
        (1, "error", "ValueError", "bad"), (2, "expired", "LeaseExpired", "slow")]
    assert (r2.state, r2.errors) == ("pending", [])
    progress = store.progress(job)
    assert (progress.done, progress.failed, progress.pending, progress.finished) == (1, 1, 1, 2)


def test_results_stream_large_jobs_in_order(store: Store) -> None:
    job = store.create_job("add", [[i, i] for i in range(2500)])
    assert [r.index for r in store.results(job)] == list(range(2500))


# --------------------------------------------------------------------------- cancel, retry
def test_cancel_stops_pending_and_assigned_tasks_but_keeps_finished_ones(store: Store) -> None:
    job = store.create_job("add", [[1, 1]] * 4)
    worker = add_worker("local/w1")
    t0, t1, t2, t3 = Task.select().order_by(Task.index)
    finish(store, t0, worker, 2)
    attempt(t1.id, 1, worker, AttemptOutcome.OPEN)
    Task.update(state=TaskState.ASSIGNED.value, attempts=1).where(Task.id == t1.id).execute()

    assert store.cancel_job(job) == 3
    progress = store.progress(job)
    assert (progress.state, progress.done, progress.cancelled, progress.finished_at is not None) == (
        "cancelled", 1, 3, True)
    # the open attempt stays open: the engine closes it when the worker answers or dies
    assert Attempt.get(Attempt.task == t1.id).outcome == "open"
    assert store.cancel_job(job) == 0


def test_retry_returns_failed_tasks_with_a_fresh_budget(store: Store) -> None:
    job = store.create_job("add", [[1, 1], [2, 2]], max_attempts=2)
    worker = add_worker("local/w1")
    t0, t1 = Task.select().order_by(Task.index)
    finish(store, t0, worker, 2)
    attempt(t1.id, 1, worker, AttemptOutcome.ERROR, {"type": "E", "message": "1"})
    attempt(t1.id, 2, worker, AttemptOutcome.ERROR, {"type": "E", "message": "2"})
    Task.update(state=TaskState.FAILED.value, attempts=2).where(Task.id == t1.id).execute()
    Job.update(state="done", finished_at=time.time()).where(Job.id == job.id).execute()

    assert store.retry_failed(job) == 1
    progress = store.progress(job)
    assert (progress.state, progress.pending, progress.done, progress.finished_at) == ("active", 1, 1, None)
    retried = Task.get_by_id(t1.id)
    assert (retried.attempts, retried.retries_from) == (2, 2)  # attempt 3 is the first of the new budget
    assert store.retry_failed(job) == 0


# --------------------------------------------------------------------------- workers
def test_workers_and_what_they_hold(store: Store) -> None:
    job = store.create_job("add", [[1, 1]] * 3)
    w1, w2 = add_worker("local/w1"), add_worker("local/w2")
    t0, t1, _ = Task.select().order_by(Task.index)
    attempt(t0.id, 1, w1, AttemptOutcome.OPEN)
    attempt(t1.id, 1, w1, AttemptOutcome.OPEN)
    assert [w.key for w in store.workers()] == ["local/w1", "local/w2"]
    assert store.inflight() == {"local/w1": 2}
    assert job.total == 3 and w2


def test_purge_takes_only_workers_lost_for_longer_than_the_grace_period(store: Store) -> None:
    now = time.time()
    add_worker("local/long-lost", WorkerState.LOST.value, lost_at=now - 600)
    add_worker("local/just-lost", WorkerState.LOST.value, lost_at=now - 10)
    add_worker("local/alive")

    purged = store.purge_lost(300, now)

    assert [w.key for w in purged] == ["local/long-lost"] and purged[0].state == "purged"
    assert {w.key: w.state for w in store.workers()} == {
        "local/alive": "online", "local/just-lost": "lost", "local/long-lost": "purged"}
    assert [w.key for w in store.purge_lost(0, now)] == ["local/just-lost"]
    assert store.purge_lost(0, now) == []


# --------------------------------------------------------------------------- opening
def test_sqlite_url_forms_and_wal(tmp_path: Path) -> None:
    relative = Store.open(f"sqlite:///{os.path.relpath(tmp_path / 'a.db')}")
    absolute = Store.open(f"sqlite:///{tmp_path / 'b.db'}")
    for store in (relative, absolute):
        store.bind()
        assert store.db.execute_sql("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert (tmp_path / "a.db").exists() and (tmp_path / "b.db").exists()


@pytest.mark.parametrize(("url", "words"), [
    ("/no/such/dir/x.db", "does not exist"),
    (":memory:", "in-memory"),
    ("sqlite://", "names no file"),
])
def test_sqlite_unusable_paths_say_what_to_do(url: str, words: str) -> None:
    with pytest.raises(StoreError, match=words):
        Store.open(url)


def test_sqlite_a_file_that_is_not_a_database_is_refused_clearly(tmp_path: Path) -> None:
    junk = tmp_path / "notes.txt"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="cannot open the database"):
        Store.open(str(junk))


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
