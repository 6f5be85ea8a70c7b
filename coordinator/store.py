"""The coordinator's durable state behind one interface: workers, jobs, tasks, attempts, results.

``Store`` is the interface (huey's ``BaseStorage`` is the model): every read and write the
CLI, the Python API and the engine make goes through it, so the rules above it (ledger.py,
registry.py, dispatch.py, leases.py) never see SQL. Two implementations:

- ``sqlstore.SqlStore`` (peewee): a SQLite file by default (WAL), PostgreSQL for scale:
  ``Store.open("path.db")``, ``Store.open("postgresql://user:pass@host:port/db")``;
- ``memstore.MemoryStore``: ``Store.open("memory://")``, for fast tests of the rules. It lives
  in one process only, so the CLI and ``serve`` cannot share it.

Attempts are kept apart from tasks (one per dispatch of a task to a worker), so redundant
computation with quorum validation can later compare several attempts of one task. Status
enums are ``str`` enums with a comment per member. Rows come back as frozen dataclasses.
"""

from __future__ import annotations

import json
import math
import re
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, ContextManager, Iterable, Iterator

from dockercomp.broker.defaults import MAX_JSON_DEPTH, MAX_PAYLOAD_BYTES
from dockercomp.broker.errors import InvalidName
from dockercomp.broker.messages import json_depth
from dockercomp.broker.topics import validate_name
from dockercomp.coordinator.defaults import INSERT_BATCH, MAX_ATTEMPTS, SQLITE_BUSY_TIMEOUT_MS, TASK_TIMEOUT
from dockercomp.coordinator.errors import InvalidInput, JobBusy, StoreError
from dockercomp.coordinator.heartbeat import Heartbeat
from dockercomp.coordinator.replication import SINGLE, ReplicaAttempt, Replication, VolunteerStats

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
        self.task_states[task_id] = TaskState.DONE.value
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


# --------------------------------------------------------------------------- input
# Built once: json.dumps() with options builds a new encoder for every call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def dump_json(value: Any) -> str:
    """Compact JSON as stored and sent; NaN and Infinity are refused (they are not JSON)."""
    return "null" if value is None else _ENCODER.encode(value)


def encode_args(args: Any, line: int | None = None) -> str:
    """Arguments of one task as stored JSON text, or InvalidInput naming the line."""
    where = f"line {line + 1}: " if line is not None else ""
    if not isinstance(args, (list, tuple)):
        raise InvalidInput(f"{where}task arguments must be a JSON array, got {type(args).__name__}",
                           "write one array per line, e.g. [1, 2]", line)
    try:
        text = dump_json(list(args))
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{where}arguments are not plain JSON ({exc})",
                           "use numbers, strings, booleans, null, arrays and objects only", line) from None
    if len(text) > MAX_ARGS_BYTES:
        raise InvalidInput(f"{where}arguments are {len(text)} bytes, over the {MAX_ARGS_BYTES}-byte limit",
                           "pass large data by reference (a URL or a file name)", line)
    if text.count("[") + text.count("{") >= MAX_JSON_DEPTH and json_depth(args) > MAX_JSON_DEPTH - 1:
        raise InvalidInput(f"{where}arguments are nested deeper than {MAX_JSON_DEPTH - 1} levels", "", line)
    return text


def check_job_options(function: str, name: str | None, timeout: float, max_attempts: int) -> None:
    """InvalidInput for a job option no store may take; the arguments are checked per line."""
    if not isinstance(function, str) or not 0 < len(function) <= 200 or function.strip() != function:
        raise InvalidInput(f"function name {function!r} is not usable",
                           "give the name of a task function, e.g. count_primes")
    if name is not None:
        try:
            validate_name(name, "job name")
        except InvalidName as exc:
            raise InvalidInput(str(exc), "pick another --job NAME") from None
        if AUTO_NAME.match(name):
            raise InvalidInput(f"job name {name!r} is reserved for automatic names",
                               "pick another --job NAME, or leave it out")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
        raise InvalidInput(f"timeout {timeout!r} must be a positive number of seconds")
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise InvalidInput(f"max attempts {max_attempts!r} must be a whole number of at least 1")


def check_worker_fields(fields: dict[str, Any]) -> None:
    unknown = set(fields) - WORKER_FIELDS
    if unknown:
        raise ValueError(f"not worker fields: {sorted(unknown)}")


def name_taken(name: str) -> InvalidInput:
    return InvalidInput(f"a job named {name!r} already exists",
                        "pick another --job NAME (`dockercomp coordinator status` lists them), or replace that "
                        "job: `submit --replace` (API: replace=True)")


def job_busy(name: str, held: int) -> JobBusy:
    return JobBusy(f"job {name!r} still has {held} task(s) on workers",
                   f"cancel it (`dockercomp coordinator cancel {name}`) and retry once its workers answered "
                   "(within a task's timeout)")


def no_tasks() -> InvalidInput:
    return InvalidInput("the input holds no tasks", "give one JSON array of arguments per line")


def encoded_batches(args_list: Iterable[Any], size: int = INSERT_BATCH) -> Iterator[list[tuple[int, str]]]:
    """(index, args JSON) per task in lists of ``size``; InvalidInput at the first bad line."""
    batch: list[tuple[int, str]] = []
    for index, args in enumerate(args_list):
        batch.append((index, encode_args(args, index)))
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def error_detail(error: str | None) -> dict[str, Any]:
    """A stored attempt error ({type, message, traceback} JSON); damaged text is kept as the message."""
    if not error:
        return {}
    try:
        detail = json.loads(error)
    except ValueError:
        return {"message": error}
    return detail if isinstance(detail, dict) else {"message": str(detail)}


def error_entry(number: int, worker: str, outcome: str, error: str | None) -> dict[str, Any]:
    """One failed attempt as ResultRow.errors shows it."""
    detail = json.loads(error) if error else {}
    return {"attempt": number, "worker": worker, "outcome": outcome,
            "type": detail.get("type", outcome), "message": detail.get("message", "")}


def decode_functions(text: str | None) -> tuple[str, ...]:
    """A worker's stored function list (JSON text); a damaged one reads as empty."""
    try:
        names = json.loads(text or "[]")
    except ValueError:
        return ()
    return tuple(n for n in names if isinstance(n, str)) if isinstance(names, list) else ()


# --------------------------------------------------------------------------- the interface
class Store(ABC):
    """Every operation on the coordinator's state. Implementations: SqlStore, MemoryStore.

    Methods for the CLI and the API come first, then those of the engine (one writer: the
    engine is the only one to write workers, attempts and results)."""

    url: str = ""
    # Exceptions that mean "the store failed" (the engine rolls back, reloads and goes on).
    failures: tuple[type[BaseException], ...] = (StoreError,)

    @classmethod
    def open(cls, url: str, create: bool = True) -> "Store":
        """``memory://`` for the in-memory store; else a SQLite path (``coordinator.db``,
        ``sqlite:///path``) or ``postgresql://...``, creating tables if missing. Raises
        StoreError with what to do on failure; with ``create=False`` (commands that only
        read) DatabaseMissing instead of creating a database that does not exist yet."""
        url = str(url)
        if url.startswith(MEMORY_URL):
            from dockercomp.coordinator.memstore import MemoryStore

            return MemoryStore(url)
        from dockercomp.coordinator.sqlstore import SqlStore  # peewee only for a database

        # Read here, at call time: tests shorten it by patching this module.
        return SqlStore.open(url, SQLITE_BUSY_TIMEOUT_MS, create=create)

    @property
    def is_postgres(self) -> bool:
        return False

    @property
    def is_sqlite(self) -> bool:
        return False

    def close(self) -> None:
        """Close this thread's connection (other threads close their own when they end)."""

    def bind(self) -> None:
        """Make this store the one the calling thread's queries use (SQL); no-op otherwise."""

    def relax_durability(self) -> None:
        """For the engine: a commit may be lost to a power cut (never to a crash of the process)."""

    @abstractmethod
    def transaction(self) -> ContextManager[Any]:
        """One atomic unit of work: all of it is stored, or none (SQLite: BEGIN IMMEDIATE)."""

    # -- jobs (CLI submit/status/results/cancel/retry; Python API) ---------------------------
    def create_job(self, function: str, args_list: Iterable[list[Any]], *, name: str | None = None,
                   timeout: float = TASK_TIMEOUT, max_attempts: int = MAX_ATTEMPTS,
                   on_progress: Callable[[int], None] | None = None, replace: bool = False,
                   replication: Replication = SINGLE) -> JobRow:
        """Store a job and all its tasks in one transaction (nothing half-submitted), durable
        when it returns. ``name`` defaults to ``job-<id>``. Raises InvalidInput on bad input.
        ``replace``: a job of that name is deleted in the same transaction (kept when this
        fails; JobBusy while it has tasks on workers)."""
        check_job_options(function, name, timeout, max_attempts)
        return self._insert_job(function, name, float(timeout), max_attempts, encoded_batches(args_list),
                                on_progress, replace, replication)

    @abstractmethod
    def _insert_job(self, function: str, name: str | None, timeout: float, max_attempts: int,
                    batches: Iterator[list[tuple[int, str]]], on_progress: Callable[[int], None] | None,
                    replace: bool = False, replication: Replication = SINGLE) -> JobRow:
        """create_job once the options are checked: raises name_taken() (unless ``replace``:
        then the old job is deleted as by delete_job), no_tasks(), or what ``batches``
        raises, and then stores nothing."""

    @abstractmethod
    def get_job(self, id_or_name: str | int) -> JobRow:
        """Raises UnknownJob (with the known names in its message) when missing."""

    @abstractmethod
    def jobs(self) -> list[JobRow]:
        """Every job, by id."""

    @abstractmethod
    def task_counts(self, job_id: int) -> dict[str, int]:
        """Tasks of one job per TaskState value (every state present, zero when none)."""

    def progress(self, job: JobRow) -> JobProgress:
        fresh = self.get_job(job.id)
        counts = self.task_counts(fresh.id)
        return JobProgress(
            job_id=fresh.id, name=fresh.name, function=fresh.function, state=fresh.state,
            total=fresh.total, pending=counts["pending"], assigned=counts["assigned"],
            done=counts["done"], failed=counts["failed"], cancelled=counts["cancelled"],
            created_at=fresh.created_at, finished_at=fresh.finished_at,
            running=self.running_count(fresh.id) if counts["assigned"] else 0,
            **self._replica_progress(fresh),
        )

    def _replica_progress(self, job: JobRow) -> dict[str, Any]:
        if job.replication.single:
            return {}
        finished, values, waiting = self.replica_counts(job.id)
        return {"replication": round(values / finished, 3) if finished else None, "waiting": waiting}

    @abstractmethod
    def running_count(self, job_id: int) -> int:
        """The job's open attempts that run on their worker now: per worker, the first
        ``capacity`` of its open attempts (by when they were sent); the others are queued."""

    @abstractmethod
    def attempts(self, job: JobRow, index: int) -> tuple[ResultRow, list[AttemptRow]]:
        """Task number ``index`` (input order, from 0) of the job and every attempt of it, with
        each failed one's error and traceback. UnknownTask when the job has no such task."""

    @abstractmethod
    def fail_pending(self, job_id: int, reason: str, now: float) -> int:
        """Fail the job's pending tasks for want of a worker (unroutable.py), each keeping
        ``reason`` as its error; returns how many."""

    @abstractmethod
    def delete_job(self, job: JobRow) -> int:
        """Delete the job with its tasks, attempts and results, at once; returns the tasks
        deleted. JobBusy (nothing deleted) while a worker holds one of its tasks."""

    @abstractmethod
    def results(self, job: JobRow) -> Iterator[ResultRow]:
        """Every task of the job in input order, with its outcome."""

    @abstractmethod
    def task_ids(self, job_id: int, states: Iterable[str]) -> set[int]:
        """Ids of the job's tasks in one of ``states``."""

    @abstractmethod
    def cancel_job(self, job: JobRow) -> int:
        """Cancel pending and assigned tasks; returns how many were cancelled.

        Open attempts stay open: the engine closes each when its worker answers, dies or
        its lease ends, so the worker's capacity is counted right until then."""

    @abstractmethod
    def retry_failed(self, job: JobRow) -> int:
        """Return failed tasks to pending with a fresh attempt budget; returns how many."""

    # -- workers -------------------------------------------------------------------------------
    @abstractmethod
    def workers(self) -> list[WorkerRow]:
        """Every worker ever seen, by key."""

    @abstractmethod
    def inflight(self) -> dict[str, int]:
        """Open attempts per worker key (tasks a worker holds right now, as far as we know)."""

    @abstractmethod
    def purge_lost(self, older_than: float, now: float) -> list[WorkerRow]:
        """Mark workers lost before ``now - older_than`` as purged; returns them (the caller
        clears their retained presence on the broker)."""

    # -- the engine: workers ------------------------------------------------------------------
    @abstractmethod
    def add_worker(self, key: str, volunteer: str, name: str, first_seen: float, **fields: Any) -> WorkerRow:
        """A worker seen for the first time; ``fields`` among WORKER_FIELDS."""

    @abstractmethod
    def update_worker(self, worker_id: int, **fields: Any) -> None:
        """Write a presence's fields (among WORKER_FIELDS)."""

    @abstractmethod
    def purged_among(self, worker_ids: list[int]) -> list[int]:
        """Which of these workers are purged (`dockercomp coordinator purge` ran meanwhile)."""

    # -- the engine: jobs and dispatch ---------------------------------------------------------
    @abstractmethod
    def finish_job(self, job_id: int, now: float) -> None:
        """Mark an active job done, or failed when some of its tasks failed."""

    # -- the engine: its heartbeat --------------------------------------------------------------
    @abstractmethod
    def beat(self, heartbeat: Heartbeat) -> None:
        """Record the engine's heartbeat (replacing the previous one)."""

    @abstractmethod
    def heartbeat(self) -> Heartbeat | None:
        """The engine's latest heartbeat; None if no `serve` ever ran on this store."""

    @abstractmethod
    def pending_tasks(self, job_id: int, limit: int) -> list[PendingRow]:
        """The job's oldest ``limit`` pending tasks (locked against a concurrent cancel)."""

    @abstractmethod
    def open_attempts(self, attempts: list[NewAttempt], now: float) -> dict[int, int]:
        """Record tasks sent (assigned, attempts + 1) with their new attempts; returns the
        attempt id per task id."""

    @abstractmethod
    def open_leases(self) -> list[OpenAttempt]:
        """Every open attempt (to rebuild the engine's leases on start)."""

    @abstractmethod
    def extend_deadlines(self, by: float) -> None:
        """Push every open attempt's deadline ``by`` seconds later (after a broker outage)."""

    # -- the engine: the ledger's writes and look-ups -----------------------------------------
    @abstractmethod
    def apply(self, changes: Changes, now: float) -> None:
        """Write a step's closings and acceptances (in a few statements), then clear them."""

    @abstractmethod
    def find_attempt(self, task_id: int, number: int) -> AttemptRecord | None:
        """An attempt by wire identity, with its task's state and job."""

    @abstractmethod
    def task_exists(self, task_id: int) -> bool:
        ...

    # -- replication, trust and credit (issue 11) -------------------------------------------------
    @abstractmethod
    def replica_attempts(self, job_id: int) -> list[ReplicaAttempt]:
        """Every attempt of the job's assigned tasks, by task and number (votes on start)."""

    @abstractmethod
    def replica_counts(self, job_id: int) -> tuple[int, int, int]:
        """(tasks done or failed, values received for them, assigned tasks holding no open
        attempt: waiting for another volunteer)."""

    @abstractmethod
    def volunteer_stats(self) -> list[VolunteerStats]:
        """Every volunteer with a worker or a quarantine, by credit then name."""

    @abstractmethod
    def quarantines(self) -> dict[str, str]:
        """The quarantined volunteers and why."""

    @abstractmethod
    def quarantine(self, volunteer: str, reason: str, now: float) -> None:
        """Quarantine a volunteer (the engine) until ``release``."""

    @abstractmethod
    def release(self, volunteer: str) -> bool:
        """Lift a volunteer's quarantine (an operator); False if it was not quarantined."""
