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
from abc import ABC, abstractmethod
from typing import Any, Callable, ContextManager, Iterable, Iterator

from dockercomp.broker.defaults import MAX_JSON_DEPTH
from dockercomp.broker.errors import InvalidName
from dockercomp.broker.messages import json_depth
from dockercomp.broker.topics import validate_name
from dockercomp.coordinator.defaults import INSERT_BATCH, MAX_ATTEMPTS, SQLITE_BUSY_TIMEOUT_MS, TASK_TIMEOUT
from dockercomp.coordinator.errors import InvalidInput, JobBusy, StoreError
from dockercomp.coordinator.heartbeat import Heartbeat
from dockercomp.coordinator.leadership import Holder, Lead
from dockercomp.coordinator.replication import SINGLE, ReplicaAttempt, Replication, VolunteerStats
from dockercomp.coordinator.rows import (  # re-exported: the store's vocabulary
    ALLOWED_FROM,
    AUTO_NAME,
    AttemptOutcome,
    AttemptRecord,
    AttemptRow,
    Changes,
    FAILED_OUTCOMES,
    FINISHED_STATES,
    JobMark,
    JobProgress,
    JobRow,
    JobState,
    MAX_ARGS_BYTES,
    MEMORY_URL,
    NewAttempt,
    OpenAttempt,
    PendingRow,
    ResultRow,
    TaskState,
    WORKER_FIELDS,
    WorkerRow,
    WorkerState,
)

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
            validate_name(name, "job name", dots=True)
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
    def jobs(self, ids: Iterable[int] | None = None) -> list[JobRow]:
        """Every job (or those of ``ids`` that exist), by id."""

    def job_marks(self) -> list[JobMark]:
        """Every job's (id, created_at, revision, state, total), by id: what the engine's poll
        compares with the jobs it holds, without building a row per job (JobBook.poll)."""
        return [(job.id, job.created_at, job.revision, job.state, job.total) for job in self.jobs()]

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

    # -- which coordinator is active (leadership.py, leader.py) ------------------------------------
    @abstractmethod
    def claim_lead(self, holder: Holder, ttl: float, take_from: int | None = None) -> Lead:
        """In its own transaction: take the lead for ``ttl`` seconds if it expired (or is still
        at epoch ``take_from``), raising its epoch by one; returns the lead as it is now."""

    @abstractmethod
    def renew_lead(self, epoch: int, ttl: float) -> bool:
        """Inside the caller's transaction: extend the lead of ``epoch`` by ``ttl`` seconds from
        now; False (nothing written) when another coordinator took it over."""

    @abstractmethod
    def release_lead(self, epoch: int) -> None:
        """Let the lead of ``epoch`` expire at once (a clean stop); no-op if another holds it."""

    @abstractmethod
    def lead(self) -> Lead | None:
        """The lead as stored (None: no `serve` ever claimed it on this store)."""

    def fence_sessions(self, idle_timeout: float) -> None:
        """Have the database end this store's sessions that sit idle inside a transaction for
        ``idle_timeout`` seconds (PostgreSQL): a frozen holder must not keep the lead's row
        locked and so block its successor. No-op elsewhere."""
