"""Leases: the open attempts, and the writes that close them.

Every dispatch opens an attempt with a deadline (the job's timeout plus a margin, plus the
wait in the worker's queue for a prefetched task: ``Dispatcher.deadline``). The engine
keeps the open attempts in memory (``Leases``), indexed by wire identity (task id, attempt
number), by task and by worker, so a result, a will or a deadline finds them without a query.
They are rebuilt from the store on start: the store is the truth, memory an index of it.

``Changes`` gathers one engine step's closings and acceptances and writes them in a few
statements at the end of the step (inside the step's transaction), so a burst of results
costs a handful of queries, not several per result.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import peewee as pw

from dockercomp.coordinator.store import Attempt, AttemptOutcome, Job, Task, TaskState, dump_json

# Rows per IN (...) list: far below SQLite's 32,766 variables per statement.
_IN_CHUNK = 900


def chunks(items: list[Any], size: int = _IN_CHUNK) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


@dataclass(slots=True, eq=False)
class Lease:
    """One open attempt: sent to ``worker_id``, answer expected before ``deadline``."""

    attempt_id: int
    task_id: int
    number: int  # attempt number, 1-based, as on the wire
    job_id: int
    worker_id: int
    sent_at: float
    deadline: float  # wall-clock time (seconds since the epoch), survives restarts
    timeout: float  # the job's time limit per task, as sent
    retries_from: int  # the task's attempt count when `retry` last renewed its budget
    payload: bytes  # the task message, kept to resend when the worker reconnects

    @property
    def key(self) -> tuple[int, int]:
        return (self.task_id, self.number)

    def budget_used(self) -> int:
        """Attempts counted against the job's max_attempts, this one included."""
        return self.number - self.retries_from


class Leases:
    """The open attempts, indexed three ways."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[int, int], Lease] = {}
        self._by_task: dict[int, Lease] = {}
        self._by_worker: dict[int, dict[tuple[int, int], Lease]] = {}
        # Per worker, how many of its leases have each timeout: the longest one bounds how
        # long the tasks ahead of a prefetched task can take (Dispatcher.deadline).
        self._timeouts: dict[int, Counter[float]] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def add(self, lease: Lease) -> None:
        old = self._by_key.get(lease.key)
        if old is not None:
            self.remove(old)
        self._by_key[lease.key] = lease
        self._by_task[lease.task_id] = lease
        self._by_worker.setdefault(lease.worker_id, {})[lease.key] = lease
        timeouts = self._timeouts.get(lease.worker_id)
        if timeouts is None:
            timeouts = self._timeouts[lease.worker_id] = Counter()
        timeouts[lease.timeout] += 1

    def get(self, task_id: int, number: int) -> Lease | None:
        return self._by_key.get((task_id, number))

    def of_task(self, task_id: int) -> Lease | None:
        return self._by_task.get(task_id)

    def remove(self, lease: Lease) -> None:
        if self._by_key.get(lease.key) is not lease:
            return  # not held (any more): removing twice must not uncount another lease
        del self._by_key[lease.key]
        if self._by_task.get(lease.task_id) is lease:
            del self._by_task[lease.task_id]
        held = self._by_worker.get(lease.worker_id)
        if held is not None:
            held.pop(lease.key, None)
        timeouts = self._timeouts[lease.worker_id]
        timeouts[lease.timeout] -= 1
        if timeouts[lease.timeout] <= 0:
            del timeouts[lease.timeout]

    def of_worker(self, worker_id: int) -> list[Lease]:
        return list(self._by_worker.get(worker_id, {}).values())

    def count(self, worker_id: int) -> int:
        held = self._by_worker.get(worker_id)
        return len(held) if held else 0

    def longest_timeout(self, worker_id: int) -> float:
        """The longest time limit among the tasks the worker holds (0 when it holds none)."""
        timeouts = self._timeouts.get(worker_id)
        return max(timeouts) if timeouts else 0.0

    def expired(self, now: float) -> list[Lease]:
        # A linear pass: open attempts number at most the fleet's total capacity.
        return [lease for lease in self._by_key.values() if lease.deadline <= now]

    def __iter__(self) -> Iterator[Lease]:
        return iter(list(self._by_key.values()))

    @classmethod
    def load(cls, lease_payload: "PayloadBuilder") -> "Leases":
        """Every open attempt in the store, with its task message rebuilt for resending."""
        leases = cls()
        query = (Attempt.select(Attempt.id, Attempt.task, Attempt.number, Task.job, Attempt.worker, Attempt.sent_at,
                                Attempt.deadline, Task.retries_from, Task.args, Job.function, Job.timeout)
                 .join(Task).join(Job)
                 .where(Attempt.outcome == AttemptOutcome.OPEN.value).tuples())
        for (attempt_id, task_id, number, job_id, worker_id, sent_at, deadline, retries_from, args, function,
             timeout) in query:
            payload = lease_payload.build(task_id, job_id, number, function, args, timeout)
            leases.add(Lease(attempt_id, task_id, number, job_id, worker_id, sent_at, deadline, timeout,
                             retries_from, payload))
        return leases


class PayloadBuilder:
    """Task messages built from the stored JSON text of the arguments, without re-encoding
    them; byte-for-byte what ``broker.messages.Task(...).encode()`` produces."""

    def __init__(self, version: int) -> None:
        self._prefix = '{"v":%d,"task_id":"' % version
        # (function, timeout) -> the text around the arguments: a job's tasks all share it.
        self._parts: dict[tuple[str, float], tuple[str, str]] = {}

    def build(self, task_id: int, job_id: int, attempt: int, function: str, args_json: str, timeout: float) -> bytes:
        parts = self._parts.get((function, timeout))
        if parts is None:
            if len(self._parts) >= 1024:  # one entry per job shape; a long-running engine sees many
                self._parts.clear()
            parts = self._parts[(function, timeout)] = (
                f',"function":{json.dumps(function)},"args":', f',"timeout":{json.dumps(float(timeout))}}}')
        head = f'{self._prefix}{task_id}","job_id":"{job_id}","attempt":{attempt}'
        return f"{head}{parts[0]}{args_json}{parts[1]}".encode()


def error_json(kind: str, message: str, traceback: str = "") -> str:
    return dump_json({"type": kind, "message": message, "traceback": traceback})


@dataclass
class Changes:
    """One engine step's writes, applied by ``flush`` in a few statements.

    Task states are kept per task (the last one wins), so a task closed and then accepted in
    the same step is written once, in its final state.
    """

    results: list[tuple[int, int, int, str, float, float]] = field(default_factory=list)
    ok_attempts: list[int] = field(default_factory=list)
    superseded_attempts: list[int] = field(default_factory=list)
    closed_attempts: list[tuple[int, str, str | None]] = field(default_factory=list)
    task_states: dict[int, str] = field(default_factory=dict)
    worker_done: Counter[int] = field(default_factory=Counter)
    worker_failed: Counter[int] = field(default_factory=Counter)

    def __bool__(self) -> bool:
        return bool(self.results or self.ok_attempts or self.superseded_attempts or self.closed_attempts
                    or self.task_states or self.worker_done or self.worker_failed)

    def accept(self, task_id: int, attempt_id: int, worker_id: int, value_json: str, elapsed: float, now: float) -> None:
        self.results.append((task_id, attempt_id, worker_id, value_json, elapsed, now))
        self.ok_attempts.append(attempt_id)
        self.task_states[task_id] = TaskState.DONE.value
        self.worker_done[worker_id] += 1

    def supersede(self, attempt_id: int) -> None:
        self.superseded_attempts.append(attempt_id)

    def close(self, attempt_id: int, outcome: AttemptOutcome, error: str | None, worker_id: int | None) -> None:
        """Close an attempt without a value (failed, expired, lost, cancelled)."""
        self.closed_attempts.append((attempt_id, outcome.value, error))
        if worker_id is not None:
            self.worker_failed[worker_id] += 1

    def set_task(self, task_id: int, state: TaskState) -> None:
        self.task_states[task_id] = state.value

    def flush(self, db: pw.Database, now: float) -> None:
        """Write everything gathered so far and start empty again.

        Hand-written SQL: these statements run once per engine step, and building them with
        peewee's query builder cost more than executing them. One statement per kind of
        change, never one per row (executemany): the sqlite3 module releases the GIL for every
        row, and each time the network thread took it the engine waited to get it back."""
        p = db.param
        row = f"({p}, {p}, {p}, {p}, {p}, {p})"
        for part in chunks(self.results, 500):
            db.execute_sql("INSERT INTO result (task_id, attempt_id, worker_id, value, elapsed, received_at) "
                           f"VALUES {', '.join([row] * len(part))}", [v for result in part for v in result])
        for ids in chunks(self.ok_attempts):
            db.execute_sql(f"UPDATE attempt SET outcome = {p}, finished_at = {p} WHERE id IN ({placeholders(p, ids)})",
                           [AttemptOutcome.OK.value, now, *ids])
        for ids in chunks(self.superseded_attempts):
            db.execute_sql(f"UPDATE attempt SET outcome = {p}, finished_at = {p} "
                           f"WHERE outcome = {p} AND id IN ({placeholders(p, ids)})",
                           [AttemptOutcome.SUPERSEDED.value, now, AttemptOutcome.OPEN.value, *ids])
        if self.closed_attempts:
            db.cursor().executemany(f"UPDATE attempt SET outcome = {p}, error = {p}, finished_at = {p} WHERE id = {p}",
                                    [(outcome, error, now, attempt_id) for attempt_id, outcome, error in self.closed_attempts])
        by_state: dict[str, list[int]] = {}
        for task_id, state in self.task_states.items():
            by_state.setdefault(state, []).append(task_id)
        for state, ids in by_state.items():
            # Guards keep a concurrent `cancel` (CLI) in force: only the states the engine
            # itself moves a task out of are overwritten.
            sources = _ALLOWED_FROM[state]
            for part in chunks(ids):
                db.execute_sql(f"UPDATE task SET state = {p}, updated_at = {p} WHERE id IN ({placeholders(p, part)}) "
                               f"AND state IN ({placeholders(p, sources)})", [state, now, *part, *sources])
        _add_counts(db, "tasks_done", self.worker_done)
        _add_counts(db, "tasks_failed", self.worker_failed)
        self.clear()

    def clear(self) -> None:
        self.results.clear()
        self.ok_attempts.clear()
        self.superseded_attempts.clear()
        self.closed_attempts.clear()
        self.task_states.clear()
        self.worker_done.clear()
        self.worker_failed.clear()


# The states a task may be moved out of, per target state, by the engine's writes.
_ALLOWED_FROM = {
    TaskState.DONE.value: [TaskState.ASSIGNED.value, TaskState.PENDING.value, TaskState.FAILED.value],
    TaskState.PENDING.value: [TaskState.ASSIGNED.value],
    TaskState.FAILED.value: [TaskState.ASSIGNED.value],
}


def _add_counts(db: pw.Database, column: str, counts: Counter[int]) -> None:
    """worker.<column> += n for each (worker id, n), in one statement per 400 workers."""
    p = db.param
    for part in chunks(list(counts.items()), 400):
        cases = " ".join([f"WHEN {p} THEN {p}"] * len(part))
        db.execute_sql(f"UPDATE worker SET {column} = {column} + CASE id {cases} END "
                       f"WHERE id IN ({placeholders(p, part)})",
                       [v for worker_id, n in part for v in (worker_id, n)] + [worker_id for worker_id, _ in part])


def placeholders(param: str, values: list[Any]) -> str:
    return ", ".join([param] * len(values))


@dataclass(frozen=True)
class AttemptRecord:
    """A closed (or unknown-to-memory) attempt as stored: for late and duplicate results."""

    attempt_id: int
    worker_id: int
    outcome: str
    task_state: str
    job_id: int


def find_attempt(task_id: int, number: int) -> AttemptRecord | None:
    row = (Attempt.select(Attempt.id, Attempt.worker, Attempt.outcome, Task.state, Task.job)
           .join(Task).where((Attempt.task == task_id) & (Attempt.number == number)).tuples().first())
    return AttemptRecord(*row) if row else None


def task_exists(task_id: int) -> bool:
    return Task.select(pw.SQL("1")).where(Task.id == task_id).exists()
