"""The coordinator's states and rows: the enums every layer shares, the frozen rows the store
returns, and ``Changes``, the writes one engine step hands the store in one go.

Kept apart from store.py (the interface) so that the rules, the renderers and both stores
share one vocabulary without the interface growing past a readable size; store.py re-exports
every name, so ``from dockercomp.coordinator.store import TaskState`` keeps working.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from dockercomp.broker.defaults import MAX_PAYLOAD_BYTES
from dockercomp.coordinator.replication import SINGLE, Replication

# URL scheme of the in-memory store.
MEMORY_URL = "memory://"


class WorkerState(str, Enum):
    ONLINE = "online"  # retained online presence seen; may receive work
    DRAINING = "draining"  # shutting down: its work still counts, it gets no new work
    PAUSED = "paused"  # connected, takes no work until it announces online again (not lost)
    LOST = "lost"  # its will fired (or a lease/keepalive says so): in-flight work was returned
    OFFLINE = "offline"  # said goodbye on shutdown
    PURGED = "purged"  # lost for longer than the grace period; its retained presence cleared


class JobState(str, Enum):
    ACTIVE = "active"  # has tasks not yet finished
    DONE = "done"  # every task finished, none failed
    FAILED = "failed"  # every task finished, some failed (`retry` makes it active again)
    CANCELLED = "cancelled"  # cancelled by the scientist; pending tasks will not be sent


class TaskState(str, Enum):
    PENDING = "pending"  # waiting for a worker
    ASSIGNED = "assigned"  # sent to a worker; an attempt with a deadline is open
    DONE = "done"  # one accepted result is stored
    FAILED = "failed"  # max attempts used up; each attempt's reason is kept
    CANCELLED = "cancelled"  # its job was cancelled before it finished


class AttemptOutcome(str, Enum):
    OPEN = "open"  # sent, no answer yet
    OK = "ok"  # accepted result
    ERROR = "error"  # the function raised
    TIMEOUT = "timeout"  # the worker killed it at the task's time limit
    CRASHED = "crashed"  # the worker's process running it died
    REJECTED = "rejected"  # the worker refused it (unknown function, malformed)
    EXPIRED = "expired"  # the lease deadline passed without a result
    LOST = "lost"  # the worker died (will) while it held the attempt
    CANCELLED = "cancelled"  # the job was cancelled while it ran
    SUPERSEDED = "superseded"  # another attempt of the task delivered the accepted result
    UNVALIDATED = "unvalidated"  # a replica's value, kept, waiting for a quorum to agree on one
    INVALID = "invalid"  # a replica's value that disagreed with the task's canonical result
    # Handed back by a worker's clean shutdown (released result, or held at its goodbye): not
    # counted against the task's max_attempts (its retries_from moves up by one) nor the worker.
    RELEASED = "released"


# Outcomes that are a failed attempt's reason (shown in ResultRow.errors).
FAILED_OUTCOMES = (
    AttemptOutcome.ERROR.value, AttemptOutcome.TIMEOUT.value, AttemptOutcome.CRASHED.value,
    AttemptOutcome.REJECTED.value, AttemptOutcome.EXPIRED.value, AttemptOutcome.LOST.value,
)
# The states a task may be moved out of, per target state, by the engine's writes (Changes).
# The guards keep a concurrent `cancel` (CLI) in force: only the states the engine itself
# moves a task out of are overwritten.
ALLOWED_FROM = {
    TaskState.DONE.value: (TaskState.ASSIGNED.value, TaskState.PENDING.value, TaskState.FAILED.value),
    TaskState.PENDING.value: (TaskState.ASSIGNED.value,),
    TaskState.FAILED.value: (TaskState.ASSIGNED.value,),
}
# Task states after which a task never changes again (unless retried).
FINISHED_STATES = (TaskState.DONE.value, TaskState.FAILED.value, TaskState.CANCELLED.value)
# Automatic job names; a submitter may not choose one, so they never collide.
AUTO_NAME = re.compile(r"job-\d+\Z")
# Longest JSON text of one task's arguments: the task message must stay under the payload limit.
MAX_ARGS_BYTES = MAX_PAYLOAD_BYTES - 1024
# Worker fields a presence sets (WorkerRow names); the registry writes them through update_worker.
WORKER_FIELDS = frozenset({
    "state", "seq", "host", "container", "image", "version", "cpus", "capacity", "prefetch", "functions",
    "started", "last_seen", "lost_at", "purged_at",
})


# --------------------------------------------------------------------------- rows
@dataclass(frozen=True)
class JobRow:
    id: int
    name: str
    function: str
    timeout: float
    max_attempts: int
    state: str  # JobState value
    created_at: float
    finished_at: float | None
    total: int
    # Bumped by every change made outside the engine (cancel, retry), so a running engine
    # notices it on its next poll and recounts the job's tasks.
    revision: int
    replication: Replication = SINGLE


@dataclass(frozen=True)
class WorkerRow:
    id: int
    key: str  # "volunteer/worker"
    volunteer: str
    name: str
    state: str  # WorkerState value
    seq: int  # connection sequence of the newest presence seen
    host: str
    container: str | None
    image: str | None
    version: str
    cpus: int
    capacity: int
    prefetch: int  # tasks it wants queued beyond capacity
    functions: tuple[str, ...]
    started: float
    first_seen: float
    last_seen: float
    lost_at: float | None
    purged_at: float | None
    tasks_done: int
    tasks_failed: int


@dataclass(frozen=True)
class AttemptRow:
    """One dispatch of a task as `show JOB TASK` lists it."""

    number: int
    worker: str  # "volunteer/worker"
    sent_at: float
    finished_at: float | None
    outcome: str  # AttemptOutcome value
    error: dict[str, Any]  # {type, message, traceback} for a failed attempt, else {}


@dataclass(frozen=True)
class JobProgress:
    job_id: int
    name: str
    function: str
    state: str
    total: int
    pending: int
    assigned: int
    done: int
    failed: int
    cancelled: int
    created_at: float
    finished_at: float | None
    # Of the assigned tasks, those running on a worker (the first `capacity` attempts each
    # worker holds); the rest wait in a worker's prefetch queue.
    running: int = 0
    # Replicated jobs: values received per finished task so far (None: single replica), and
    # tasks waiting for another volunteer to come online (they hold no open attempt).
    replication: float | None = None
    waiting: int = 0

    @property
    def finished(self) -> int:
        return self.done + self.failed + self.cancelled

    @property
    def queued(self) -> int:
        """Assigned tasks waiting in a worker's prefetch queue (not running yet)."""
        return max(0, self.assigned - self.running)


@dataclass(frozen=True)
class ResultRow:
    """One task's outcome as the scientist sees it (results CLI/API)."""

    task_id: int
    index: int
    args: list[Any]
    state: str  # TaskState value
    value: Any  # when done
    worker: str | None  # "volunteer/worker" that computed the accepted result
    attempts: int
    elapsed: float | None
    errors: list[dict[str, Any]]  # one per failed attempt: {attempt, worker, outcome, type, message}
    # Replicated jobs: every value received, {attempt, worker, outcome, value} (outcome ok:
    # agreed with the canonical value, invalid: disagreed, unvalidated: no quorum (yet)).
    replicas: list[dict[str, Any]] = field(default_factory=list)


# A pending task as dispatch takes it: task id, args JSON, attempts so far, retries_from.
PendingRow = tuple[int, str, int, int]
# What tells a job's row changed (the engine's poll): id, created_at, revision, state, total.
JobMark = tuple[int, float, int, str, int]
# An attempt to open: task id, attempt number, worker id, lease deadline, nonce.
NewAttempt = tuple[int, int, int, float, str]


@dataclass(frozen=True)
class OpenAttempt:
    """An open attempt with what is needed to rebuild its lease and task message."""

    attempt_id: int
    task_id: int
    number: int
    job_id: int
    worker_id: int
    sent_at: float
    deadline: float
    retries_from: int
    args: str  # JSON text as stored
    function: str
    timeout: float
    nonce: str  # the attempt's secret, sent in its task message ("" if opened before nonces)


@dataclass(frozen=True)
class AttemptRecord:
    """A closed (or unknown-to-memory) attempt as stored: for late and duplicate results."""

    attempt_id: int
    worker_id: int
    outcome: str
    task_state: str
    job_id: int
    nonce: str  # the attempt's secret: a late result must echo it too


_DONE = TaskState.DONE.value  # looked up once: Changes.accept runs for every result


@dataclass
class Changes:
    """One engine step's closings and acceptances, written by ``Store.apply`` at once.

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
    # Replicas: values received (attempt id, value JSON, elapsed), written before ok_attempts
    # so a replica both reported and validated in one step keeps its value.
    # (attempt id, value JSON, elapsed, error JSON when the task failed on it: no quorum, validator).
    reported: list[tuple[int, str, float, str | None]] = field(default_factory=list)
    invalid_attempts: list[int] = field(default_factory=list)

    # Per task, attempts closed without using its budget (released): retries_from += n.
    uncharged: Counter[int] = field(default_factory=Counter)

    def __bool__(self) -> bool:
        return bool(self.results or self.ok_attempts or self.superseded_attempts or self.closed_attempts
                    or self.task_states or self.worker_done or self.worker_failed or self.reported
                    or self.invalid_attempts or self.uncharged)

    def accept(self, task_id: int, attempt_id: int, worker_id: int, value_json: str, elapsed: float, now: float) -> None:
        self.results.append((task_id, attempt_id, worker_id, value_json, elapsed, now))
        self.ok_attempts.append(attempt_id)
        self.task_states[task_id] = _DONE
        self.worker_done[worker_id] += 1

    def supersede(self, attempt_id: int) -> None:
        """Close an open attempt whose task got its result from another attempt."""
        self.superseded_attempts.append(attempt_id)

    def close(self, attempt_id: int, outcome: AttemptOutcome, error: str | None, worker_id: int | None) -> None:
        """Close an attempt without a value (failed, expired, lost, cancelled); ``worker_id``
        when it counts as a failure of that worker."""
        self.closed_attempts.append((attempt_id, outcome.value, error))
        if worker_id is not None:
            self.worker_failed[worker_id] += 1

    def set_task(self, task_id: int, state: TaskState) -> None:
        self.task_states[task_id] = state.value

    def uncharge(self, task_id: int) -> None:
        """The task's latest attempt does not count against its budget (released)."""
        self.uncharged[task_id] += 1

    def clear(self) -> None:
        self.results.clear()
        self.ok_attempts.clear()
        self.superseded_attempts.clear()
        self.closed_attempts.clear()
        self.task_states.clear()
        self.worker_done.clear()
        self.worker_failed.clear()
        self.reported.clear()
        self.invalid_attempts.clear()
        self.uncharged.clear()
