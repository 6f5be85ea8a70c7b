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

from dockercomp.coordinator import unroutable
from dockercomp.coordinator.errors import UnknownJob, UnknownTask
from dockercomp.coordinator.heartbeat import Heartbeat
from dockercomp.coordinator.leadership import Holder, Lead
from dockercomp.coordinator.replication import SINGLE, ReplicaAttempt, Replication, VolunteerStats
from dockercomp.coordinator.store import (
    ALLOWED_FROM,
    FAILED_OUTCOMES,
    AttemptOutcome,
    AttemptRecord,
    AttemptRow,
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
    error_detail,
    error_entry,
    job_busy,
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
    value: str | None = None  # replicated jobs: the value this attempt returned (JSON)
    elapsed: float | None = None
    nonce: str = ""


@dataclass(frozen=True)
class _Result:
    task_id: int
    attempt_id: int
    worker_id: int
    value: str
    elapsed: float
    received_at: float


_TABLES = ("_workers", "_jobs", "_tasks", "_attempts", "_results", "_job_tasks", "_task_attempts", "_quarantined",
           "_unroutable")


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
        self._quarantined: dict[str, tuple[str, float]] = {}  # volunteer -> (reason, since)
        self._next = {"worker": 1, "job": 1, "task": 1, "attempt": 1}
        self._heartbeat: Heartbeat | None = None
        self._lead: Lead | None = None  # one process: the lead is only ever contended by threads
        self._unroutable: dict[int, str] = {}  # task id -> why it failed without an attempt

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
                    batches: Iterator[list[tuple[int, str]]], on_progress: Callable[[int], None] | None,
                    replace: bool = False, replication: Replication = SINGLE) -> JobRow:
        now = time.time()
        with self.transaction():
            old = next((job for job in self._jobs.values() if job.name == name), None) if name else None
            if old is not None:
                if not replace:
                    raise name_taken(old.name)
                self.delete_job(old)
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
                                              JobState.ACTIVE.value, now, None, len(ids), 0, replication)
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

    def jobs(self, ids: Iterable[int] | None = None) -> list[JobRow]:
        with self._lock:
            wanted = sorted(self._jobs) if ids is None else sorted(set(ids) & set(self._jobs))
            return [self._jobs[job_id] for job_id in wanted]

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
            rows = [self._result_row(task) for task in self._job_tasks_of(job.id)]
        return iter(rows)

    def _result_row(self, task: _Task) -> ResultRow:
        result = self._results.get(task.id)
        errors = []
        replicas = []
        for attempt in self._attempts_of(task):
            worker = self._workers[attempt.worker_id].key
            if attempt.outcome in FAILED_OUTCOMES or (attempt.error and
                                                      attempt.outcome == AttemptOutcome.UNVALIDATED.value):
                errors.append(error_entry(attempt.number, worker, attempt.outcome, attempt.error))
            if attempt.value is not None:
                replicas.append({"attempt": attempt.number, "worker": worker,
                                 "outcome": attempt.outcome, "value": json.loads(attempt.value)})
        if task.state == TaskState.FAILED.value and task.id in self._unroutable:
            errors.append(unroutable.error_entry(self._unroutable[task.id]))
        return ResultRow(
            task_id=task.id, index=task.index, args=json.loads(task.args), state=task.state,
            value=json.loads(result.value) if result else None,
            worker=self._workers[result.worker_id].key if result else None, attempts=task.attempts,
            elapsed=result.elapsed if result else None, errors=errors, replicas=replicas,
        )

    def _attempts_of(self, task: _Task) -> list[_Attempt]:
        found = (self._attempts.get(self._task_attempts.get((task.id, n), 0)) for n in range(1, task.attempts + 1))
        return [attempt for attempt in found if attempt is not None]

    def running_count(self, job_id: int) -> int:
        with self._lock:
            held: dict[int, int] = {}
            running = 0
            for attempt_id in sorted(self._attempts):  # in the order they were sent
                attempt = self._attempts[attempt_id]
                if attempt.outcome != AttemptOutcome.OPEN.value:
                    continue
                ahead = held.get(attempt.worker_id, 0)
                held[attempt.worker_id] = ahead + 1
                if ahead < self._workers[attempt.worker_id].capacity and self._tasks[attempt.task_id].job_id == job_id:
                    running += 1
            return running

    def attempts(self, job: JobRow, index: int) -> tuple[ResultRow, list[AttemptRow]]:
        with self._lock:
            task = next((t for t in self._job_tasks_of(job.id) if t.index == index), None)
            if task is None:
                raise UnknownTask(f"job {job.name!r} has no task #{index}",
                                  f"its tasks are numbered 0 to {job.total - 1} (input order)")
            rows = [AttemptRow(a.number, self._workers[a.worker_id].key, a.sent_at, a.finished_at, a.outcome,
                               error_detail(a.error) if a.outcome in FAILED_OUTCOMES else {})
                    for a in self._attempts_of(task)]
            return self._result_row(task), rows

    def fail_pending(self, job_id: int, reason: str, now: float) -> int:
        with self.transaction():
            pending = [task for task in self._job_tasks_of(job_id) if task.state == TaskState.PENDING.value]
            for task in pending:
                self._tasks[task.id] = replace(task, state=TaskState.FAILED.value, updated_at=now)
                self._unroutable[task.id] = reason
            return len(pending)

    def delete_job(self, job: JobRow) -> int:
        with self.transaction():
            tasks = self._job_tasks_of(job.id)
            attempts = [a for task in tasks for a in self._attempts_of(task)]
            held = sum(1 for a in attempts if a.outcome == AttemptOutcome.OPEN.value)
            if held:
                raise job_busy(job.name, held)
            for attempt in attempts:
                del self._attempts[attempt.id]
                del self._task_attempts[(attempt.task_id, attempt.number)]
            for task in tasks:
                del self._tasks[task.id]
                self._results.pop(task.id, None)
                self._unroutable.pop(task.id, None)
            del self._job_tasks[job.id]
            del self._jobs[job.id]
            return len(tasks)

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
                failed = any(task.state == TaskState.FAILED.value for task in self._job_tasks_of(job_id))
                state = JobState.FAILED if failed else JobState.DONE
                self._jobs[job_id] = replace(job, state=state.value, finished_at=now)

    def beat(self, heartbeat: Heartbeat) -> None:
        with self._lock:
            self._heartbeat = heartbeat

    def heartbeat(self) -> Heartbeat | None:
        with self._lock:
            return self._heartbeat

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
            for task_id, number, worker_id, deadline, nonce in attempts:
                if (task_id, number) in self._task_attempts or worker_id not in self._workers:
                    raise ValueError(f"attempt {number} of task {task_id} cannot be opened")
                attempt_id = self._new_id("attempt")
                self._attempts[attempt_id] = _Attempt(attempt_id, task_id, number, worker_id, now, deadline,
                                                      nonce=nonce)
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
                                          job.function, job.timeout, attempt.nonce))
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
            for attempt_id, value, elapsed, error in changes.reported:
                attempt = self._attempts[attempt_id]
                self._attempts[attempt_id] = replace(attempt, outcome=AttemptOutcome.UNVALIDATED.value, value=value,
                                                     elapsed=elapsed, error=error, finished_at=now)
            for attempt_id in changes.invalid_attempts:
                self._close(attempt_id, AttemptOutcome.INVALID.value, None, now)
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
            return AttemptRecord(attempt.id, attempt.worker_id, attempt.outcome, task.state, task.job_id,
                                 attempt.nonce)

    def task_exists(self, task_id: int) -> bool:
        return task_id in self._tasks

    # -- replication, trust and credit --------------------------------------------------------------
    def replica_attempts(self, job_id: int) -> list[ReplicaAttempt]:
        with self._lock:
            rows = []
            for task in self._job_tasks_of(job_id):
                if task.state != TaskState.ASSIGNED.value:
                    continue
                for number in range(1, task.attempts + 1):
                    a = self._attempts.get(self._task_attempts.get((task.id, number), 0))
                    if a is not None:
                        rows.append(ReplicaAttempt(task.id, task.args, task.retries_from, a.id, number, a.worker_id,
                                                   a.outcome, a.value, a.elapsed))
            return rows

    def replica_counts(self, job_id: int) -> tuple[int, int, int]:
        finished = values = waiting = 0
        with self._lock:
            for task in self._job_tasks_of(job_id):
                attempts = [self._attempts[i] for n in range(1, task.attempts + 1)
                            if (i := self._task_attempts.get((task.id, n))) is not None]
                if task.state in (TaskState.DONE.value, TaskState.FAILED.value):
                    finished += 1
                    values += sum(1 for a in attempts if a.value is not None or a.outcome == AttemptOutcome.OK.value)
                elif task.state == TaskState.ASSIGNED.value:
                    waiting += not any(a.outcome == AttemptOutcome.OPEN.value for a in attempts)
        return finished, values, waiting

    def volunteer_stats(self) -> list[VolunteerStats]:
        with self._lock:
            tally: dict[str, list[Any]] = {}
            for worker in self._workers.values():
                tally.setdefault(worker.volunteer, [0, 0, 0, 0, 0.0])[0] += 1
            for a in self._attempts.values():
                counts = tally[self._workers[a.worker_id].volunteer]
                if a.outcome == AttemptOutcome.OK.value and a.elapsed is not None:
                    counts[1] += 1
                    counts[4] += a.elapsed
                elif a.outcome == AttemptOutcome.INVALID.value:
                    counts[2] += 1
                elif a.outcome in FAILED_OUTCOMES:
                    counts[3] += 1
            for name in self._quarantined:
                tally.setdefault(name, [0, 0, 0, 0, 0.0])
            rows = [VolunteerStats(name, *counts, *self._quarantined.get(name, (None, None)))
                    for name, counts in tally.items()]
        return sorted(rows, key=lambda r: (-r.credit, r.volunteer))

    def quarantines(self) -> dict[str, str]:
        with self._lock:
            return {name: reason for name, (reason, _) in self._quarantined.items()}

    def quarantine(self, volunteer: str, reason: str, now: float) -> None:
        with self._lock:
            self._quarantined.setdefault(volunteer, (reason, now))

    def release(self, volunteer: str) -> bool:
        with self._lock:
            return self._quarantined.pop(volunteer, None) is not None

    # -- which coordinator is active -----------------------------------------------------------
    def claim_lead(self, holder: Holder, ttl: float, take_from: int | None = None) -> Lead:
        with self._lock:
            now, lead = time.time(), self._lead
            if lead is None or now >= lead.expires_at or lead.epoch == take_from:
                self._lead = Lead((lead.epoch if lead else 0) + 1, holder.id, holder.host, holder.pid, now,
                                  now + ttl, now)
            return replace(self._lead, now=now)  # type: ignore[type-var]

    def renew_lead(self, epoch: int, ttl: float) -> bool:
        with self._lock:
            if self._lead is None or self._lead.epoch != epoch:
                return False
            self._lead = replace(self._lead, expires_at=time.time() + ttl)
            return True

    def release_lead(self, epoch: int) -> None:
        with self._lock:
            if self._lead is not None and self._lead.epoch == epoch:
                self._lead = replace(self._lead, expires_at=0.0)

    def lead(self) -> Lead | None:
        with self._lock:
            return None if self._lead is None else replace(self._lead, now=time.time())


def _normal(fields: dict[str, Any]) -> dict[str, Any]:
    """Fields as the SQL store gives them back: the function list sorted."""
    check_worker_fields(fields)
    if "functions" in fields:
        return {**fields, "functions": tuple(sorted(fields["functions"]))}
    return fields
