"""The store in memory (``Store.open("memory://")``): the same contract as the SQL store, for
fast tests of the rules above it (ledger, registry, dispatch) without a database.

It lives in one process: the CLI and ``serve`` cannot share it. Thread-safe (one lock, held
for a whole transaction, as SQLite's writer lock is). A transaction that raises leaves the
store as it was: rows are replaced, never changed in place, so a snapshot is a copy of the
tables' dictionaries.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Iterator

from dockercomp.coordinator.errors import UnknownJob
from dockercomp.coordinator.store import (
    ALLOWED_FROM,
    FAILED_OUTCOMES,
    AttemptOutcome,
    AttemptRecord,
    Changes,
    JobRow,
    JobState,
    NewAttempt,
    OpenAttempt,
    PendingRow,
    ResultRow,
    Store,
    TaskState,
    WorkerRow,
    WorkerState,
    check_worker_fields,
    error_entry,
    name_taken,
    no_tasks,
)


@dataclass(frozen=True)
class _Task:
    id: int
    job_id: int
    index: int
    args: str
    state: str
    attempts: int
    retries_from: int
    updated_at: float


@dataclass(frozen=True)
class _Attempt:
    id: int
    task_id: int
    number: int
    worker_id: int
    sent_at: float
    deadline: float
    finished_at: float | None = None
    outcome: str = AttemptOutcome.OPEN.value
    error: str | None = None


@dataclass(frozen=True)
class _Result:
    task_id: int
    attempt_id: int
    worker_id: int
    value: str
    elapsed: float
    received_at: float


_TABLES = ("_workers", "_jobs", "_tasks", "_attempts", "_results", "_job_tasks", "_task_attempts")


class MemoryStore(Store):
    """Tables as dictionaries of frozen rows, by id."""

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._lock = threading.RLock()
        self._depth = 0  # nested transactions: only the outermost one snapshots
        self._workers: dict[int, WorkerRow] = {}
        self._jobs: dict[int, JobRow] = {}
        self._tasks: dict[int, _Task] = {}
        self._attempts: dict[int, _Attempt] = {}
        self._results: dict[int, _Result] = {}  # by task id: one accepted result per task
        self._job_tasks: dict[int, list[int]] = {}  # job id -> task ids in input order
        self._task_attempts: dict[tuple[int, int], int] = {}  # (task id, number) -> attempt id
        self._next = {"worker": 1, "job": 1, "task": 1, "attempt": 1}

    def _new_id(self, table: str) -> int:
        value = self._next[table]
        self._next[table] = value + 1
        return value

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            saved = {name: dict(getattr(self, name)) for name in _TABLES}
            saved["_job_tasks"] = {job: list(ids) for job, ids in self._job_tasks.items()}
            counters = dict(self._next)
            self._depth = 1
            try:
                yield
            except BaseException:
                for name, table in saved.items():
                    setattr(self, name, table)
                self._next = counters
                raise
            finally:
                self._depth = 0

    # -- jobs ----------------------------------------------------------------------------------
    def _insert_job(self, function: str, name: str | None, timeout: float, max_attempts: int,
                    batches: Iterator[list[tuple[int, str]]], on_progress: Callable[[int], None] | None) -> JobRow:
        now = time.time()
        with self.transaction():
            if name is not None and any(job.name == name for job in self._jobs.values()):
                raise name_taken(name)
            job_id = self._new_id("job")
            ids = self._job_tasks[job_id] = []
            pending = TaskState.PENDING.value
            for batch in batches:
                for index, args in batch:
                    task_id = self._new_id("task")
                    self._tasks[task_id] = _Task(task_id, job_id, index, args, pending, 0, 0, now)
                    ids.append(task_id)
                if on_progress is not None:
                    on_progress(len(ids))
            if not ids:
                raise no_tasks()
            job = self._jobs[job_id] = JobRow(job_id, name or f"job-{job_id}", function, timeout, max_attempts,
                                              JobState.ACTIVE.value, now, None, len(ids), 0)
            return job

    def get_job(self, id_or_name: str | int) -> JobRow:
        with self._lock:
            text = str(id_or_name).strip()
            job = self._jobs.get(int(text)) if text.isdigit() else None
            if job is None:
                job = next((j for j in self._jobs.values() if j.name == text), None)
            if job is None:
                raise UnknownJob(id_or_name, [j.name for j in sorted(self._jobs.values(), key=lambda j: -j.id)][:50])
            return job

    def jobs(self) -> list[JobRow]:
        with self._lock:
            return [self._jobs[job_id] for job_id in sorted(self._jobs)]

    def _job_tasks_of(self, job_id: int) -> list[_Task]:
        return [self._tasks[task_id] for task_id in self._job_tasks.get(job_id, [])]

    def task_counts(self, job_id: int) -> dict[str, int]:
        counts = {state.value: 0 for state in TaskState}
        with self._lock:
            for task in self._job_tasks_of(job_id):
                counts[task.state] += 1
        return counts

    def results(self, job: JobRow) -> Iterator[ResultRow]:
        with self._lock:
            rows = []
            for task in self._job_tasks_of(job.id):
                result = self._results.get(task.id)
                errors = []
                for number in range(1, task.attempts + 1):
                    attempt = self._attempts.get(self._task_attempts.get((task.id, number), 0))
                    if attempt is not None and attempt.outcome in FAILED_OUTCOMES:
                        worker = self._workers[attempt.worker_id].key
                        errors.append(error_entry(number, worker, attempt.outcome, attempt.error))
                rows.append(ResultRow(
                    task_id=task.id, index=task.index, args=json.loads(task.args), state=task.state,
                    value=json.loads(result.value) if result else None,
                    worker=self._workers[result.worker_id].key if result else None, attempts=task.attempts,
                    elapsed=result.elapsed if result else None, errors=errors,
                ))
        return iter(rows)

    def task_ids(self, job_id: int, states: Iterable[str]) -> set[int]:
        wanted = set(states)
        with self._lock:
            return {task.id for task in self._job_tasks_of(job_id) if task.state in wanted}

    def cancel_job(self, job: JobRow) -> int:
        now = time.time()
        with self.transaction():
            count = self._set_tasks(job.id, (TaskState.PENDING.value, TaskState.ASSIGNED.value),
                                    TaskState.CANCELLED.value, now)
            fresh = self._jobs[job.id]
            fresh = replace(fresh, revision=fresh.revision + 1)
            if count:
                fresh = replace(fresh, state=JobState.CANCELLED.value, finished_at=now)
            self._jobs[job.id] = fresh
        return count

    def retry_failed(self, job: JobRow) -> int:
        now = time.time()
        with self.transaction():
            count = 0
            for task in self._job_tasks_of(job.id):
                if task.state == TaskState.FAILED.value:
                    self._tasks[task.id] = replace(task, state=TaskState.PENDING.value, retries_from=task.attempts,
                                                   updated_at=now)
                    count += 1
            if count:
                fresh = self._jobs[job.id]
                self._jobs[job.id] = replace(fresh, state=JobState.ACTIVE.value, finished_at=None,
                                             revision=fresh.revision + 1)
        return count

    def _set_tasks(self, job_id: int, sources: tuple[str, ...], state: str, now: float) -> int:
        count = 0
        for task in self._job_tasks_of(job_id):
            if task.state in sources:
                self._tasks[task.id] = replace(task, state=state, updated_at=now)
                count += 1
        return count

    # -- workers -------------------------------------------------------------------------------
    def workers(self) -> list[WorkerRow]:
        with self._lock:
            return sorted(self._workers.values(), key=lambda w: w.key)

    def inflight(self) -> dict[str, int]:
        held: dict[str, int] = {}
        with self._lock:
            for attempt in self._attempts.values():
                if attempt.outcome == AttemptOutcome.OPEN.value:
                    key = self._workers[attempt.worker_id].key
                    held[key] = held.get(key, 0) + 1
        return held

    def purge_lost(self, older_than: float, now: float) -> list[WorkerRow]:
        with self.transaction():
            purged = []
            for worker in self.workers():
                if (worker.state == WorkerState.LOST.value and worker.lost_at is not None
                        and worker.lost_at <= now - older_than):
                    self._workers[worker.id] = replace(worker, state=WorkerState.PURGED.value, purged_at=now)
                    purged.append(self._workers[worker.id])
            return purged

    # -- the engine: workers ----------------------------------------------------------------------
    def add_worker(self, key: str, volunteer: str, name: str, first_seen: float, **fields: Any) -> WorkerRow:
        with self.transaction():
            if any(w.key == key for w in self._workers.values()):
                raise ValueError(f"worker {key} exists")  # as the SQL store's unique key
            worker_id = self._new_id("worker")
            row = WorkerRow(
                id=worker_id, key=key, volunteer=volunteer, name=name, state=WorkerState.ONLINE.value, seq=0,
                host="", container=None, image=None, version="", cpus=0, capacity=1, prefetch=0, functions=(),
                started=0.0, first_seen=first_seen, last_seen=first_seen, lost_at=None, purged_at=None,
                tasks_done=0, tasks_failed=0,
            )
            row = self._workers[worker_id] = replace(row, **_normal(fields))
            return row

    def update_worker(self, worker_id: int, **fields: Any) -> None:
        with self._lock:
            worker = self._workers.get(worker_id)
            if worker is not None:
                self._workers[worker_id] = replace(worker, **_normal(fields))

    def purged_among(self, worker_ids: list[int]) -> list[int]:
        with self._lock:
            return [i for i in worker_ids if i in self._workers
                    and self._workers[i].state == WorkerState.PURGED.value]

    # -- the engine: jobs and dispatch --------------------------------------------------------------
    def finish_job(self, job_id: int, now: float) -> None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None and job.state == JobState.ACTIVE.value:
                self._jobs[job_id] = replace(job, state=JobState.DONE.value, finished_at=now)

    def pending_tasks(self, job_id: int, limit: int) -> list[PendingRow]:
        rows: list[PendingRow] = []
        with self._lock:
            for task in self._job_tasks_of(job_id):
                if len(rows) >= limit:
                    break
                if task.state == TaskState.PENDING.value:
                    rows.append((task.id, task.args, task.attempts, task.retries_from))
        return rows

    def open_attempts(self, attempts: list[NewAttempt], now: float) -> dict[int, int]:
        opened = {}
        with self.transaction():
            for task_id, number, worker_id, deadline in attempts:
                if (task_id, number) in self._task_attempts or worker_id not in self._workers:
                    raise ValueError(f"attempt {number} of task {task_id} cannot be opened")
                attempt_id = self._new_id("attempt")
                self._attempts[attempt_id] = _Attempt(attempt_id, task_id, number, worker_id, now, deadline)
                self._task_attempts[(task_id, number)] = attempt_id
                task = self._tasks[task_id]
                self._tasks[task_id] = replace(task, state=TaskState.ASSIGNED.value, attempts=task.attempts + 1,
                                               updated_at=now)
                opened[task_id] = attempt_id
        return opened

    def open_leases(self) -> list[OpenAttempt]:
        with self._lock:
            leases = []
            for attempt in self._attempts.values():
                if attempt.outcome != AttemptOutcome.OPEN.value:
                    continue
                task = self._tasks[attempt.task_id]
                job = self._jobs[task.job_id]
                leases.append(OpenAttempt(attempt.id, task.id, attempt.number, job.id, attempt.worker_id,
                                          attempt.sent_at, attempt.deadline, task.retries_from, task.args,
                                          job.function, job.timeout))
            return leases

    def extend_deadlines(self, by: float) -> None:
        with self._lock:
            for attempt in list(self._attempts.values()):
                if attempt.outcome == AttemptOutcome.OPEN.value:
                    self._attempts[attempt.id] = replace(attempt, deadline=attempt.deadline + by)

    # -- the engine: the ledger ------------------------------------------------------------------
    def apply(self, changes: Changes, now: float) -> None:
        if not changes:
            return
        with self.transaction():
            for task_id, attempt_id, worker_id, value, elapsed, received_at in changes.results:
                if task_id in self._results:
                    raise ValueError(f"task {task_id} already has its result")  # as the unique index
                self._results[task_id] = _Result(task_id, attempt_id, worker_id, value, elapsed, received_at)
            for attempt_id in changes.ok_attempts:
                self._close(attempt_id, AttemptOutcome.OK.value, None, now)
            for attempt_id in changes.superseded_attempts:
                if self._attempts[attempt_id].outcome == AttemptOutcome.OPEN.value:
                    self._close(attempt_id, AttemptOutcome.SUPERSEDED.value, None, now)
            for attempt_id, outcome, error in changes.closed_attempts:
                self._close(attempt_id, outcome, error, now)
            for task_id, state in changes.task_states.items():
                task = self._tasks.get(task_id)
                if task is not None and task.state in ALLOWED_FROM[state]:
                    self._tasks[task_id] = replace(task, state=state, updated_at=now)
            for worker_id, n in changes.worker_done.items():
                worker = self._workers[worker_id]
                self._workers[worker_id] = replace(worker, tasks_done=worker.tasks_done + n)
            for worker_id, n in changes.worker_failed.items():
                worker = self._workers[worker_id]
                self._workers[worker_id] = replace(worker, tasks_failed=worker.tasks_failed + n)
            for task_id, n in changes.uncharged.items():
                task = self._tasks.get(task_id)
                if task is not None:
                    self._tasks[task_id] = replace(task, retries_from=task.retries_from + n)
        changes.clear()

    def _close(self, attempt_id: int, outcome: str, error: str | None, now: float) -> None:
        attempt = self._attempts[attempt_id]
        self._attempts[attempt_id] = replace(attempt, outcome=outcome, error=error, finished_at=now)

    def find_attempt(self, task_id: int, number: int) -> AttemptRecord | None:
        with self._lock:
            attempt = self._attempts.get(self._task_attempts.get((task_id, number), 0))
            if attempt is None:
                return None
            task = self._tasks[task_id]
            return AttemptRecord(attempt.id, attempt.worker_id, attempt.outcome, task.state, task.job_id)

    def task_exists(self, task_id: int) -> bool:
        return task_id in self._tasks


def _normal(fields: dict[str, Any]) -> dict[str, Any]:
    """Fields as the SQL store gives them back: the function list sorted."""
    check_worker_fields(fields)
    if "functions" in fields:
        return {**fields, "functions": tuple(sorted(fields["functions"]))}
    return fields
