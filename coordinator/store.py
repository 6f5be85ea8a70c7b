"""The coordinator's durable state (peewee): workers, jobs, tasks, attempts, results.

SQLite file by default (WAL), PostgreSQL for scale: ``Store.open("path.db")`` or
``Store.open("postgresql://user:pass@host:port/db")``. Attempts are kept apart from tasks
(one row per dispatch of a task to a worker), so redundant computation with quorum
validation can later compare several attempts of one task.

Status enums are ``str`` enums with a comment per member.

The models reach the database through ``database_proxy``, bound per thread: every ``Store``
method binds its own database for the calling thread first, so an engine thread and an API
client in one process, or a test holding two stores, never cross. peewee keeps one
connection per thread, so several threads may also share one ``Store``. SQLite transactions start ``IMMEDIATE``: a writer takes the
lock up front and waits up to busy_timeout for it, instead of failing half-way.

The engine's own queries (dispatch, leases, results) live next to their logic in
dispatch.py and leases.py; this module holds what the CLI and the Python API use.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Iterable, Iterator

import peewee as pw

from dockercomp.broker.defaults import MAX_JSON_DEPTH, MAX_PAYLOAD_BYTES
from dockercomp.broker.messages import json_depth
from dockercomp.broker.errors import InvalidName
from dockercomp.broker.topics import validate_name
from dockercomp.coordinator import database
from dockercomp.coordinator.defaults import INSERT_BATCH, MAX_ATTEMPTS, SQLITE_BUSY_TIMEOUT_MS, TASK_TIMEOUT
from dockercomp.coordinator.errors import InvalidInput, StoreError, StoreLocked, UnknownJob



class ThreadDatabaseProxy(pw.DatabaseProxy):
    """A database proxy bound per thread: a coordinator engine thread and an API client in the
    same process may each use their own Store (even on different databases) without one
    rebinding the other's queries. A thread that never bound uses the last store bound."""

    __slots__ = ("_local", "_fallback")

    def __init__(self) -> None:
        object.__setattr__(self, "_local", threading.local())
        object.__setattr__(self, "_fallback", None)
        super().__init__()

    @property  # type: ignore[override]
    def obj(self) -> pw.Database | None:
        bound = getattr(self._local, "db", None)
        return bound if bound is not None else self._fallback

    @obj.setter
    def obj(self, value: pw.Database | None) -> None:
        self._local.db = value
        if value is not None:
            object.__setattr__(self, "_fallback", value)

    def bound_here(self) -> pw.Database | None:
        return getattr(self._local, "db", None)

    def __setattr__(self, attr: str, value: Any) -> None:
        object.__setattr__(self, attr, value)


database_proxy = ThreadDatabaseProxy()


class WorkerState(str, Enum):
    ONLINE = "online"  # retained online presence seen; may receive work
    LOST = "lost"  # its will fired (or a lease/keepalive says so): in-flight work was returned
    OFFLINE = "offline"  # said goodbye on shutdown
    PURGED = "purged"  # lost for longer than the grace period; its retained presence cleared


class JobState(str, Enum):
    ACTIVE = "active"  # has tasks not yet finished
    DONE = "done"  # every task finished (done or failed)
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


class BaseModel(pw.Model):
    class Meta:
        database = database_proxy


class Worker(BaseModel):
    key = pw.CharField(max_length=130, unique=True)  # "volunteer/worker"
    volunteer = pw.CharField(max_length=64, index=True)
    name = pw.CharField(max_length=64)
    state = pw.CharField(max_length=16, default=WorkerState.ONLINE.value, index=True)
    seq = pw.BigIntegerField(default=0)  # connection sequence of the newest presence seen
    host = pw.CharField(max_length=255, default="")
    container = pw.CharField(max_length=128, null=True)
    image = pw.CharField(max_length=255, null=True)
    version = pw.CharField(max_length=64, default="")
    cpus = pw.IntegerField(default=0)
    capacity = pw.IntegerField(default=1)
    prefetch = pw.IntegerField(default=0)  # tasks it wants queued beyond capacity (added later: database.py)
    functions = pw.TextField(default="[]")  # JSON list
    started = pw.DoubleField(default=0.0)
    first_seen = pw.DoubleField()
    last_seen = pw.DoubleField()
    lost_at = pw.DoubleField(null=True)
    purged_at = pw.DoubleField(null=True)
    tasks_done = pw.IntegerField(default=0)
    tasks_failed = pw.IntegerField(default=0)


class Job(BaseModel):
    name = pw.CharField(max_length=64, unique=True)
    function = pw.CharField(max_length=200)
    timeout = pw.DoubleField()
    max_attempts = pw.IntegerField()
    state = pw.CharField(max_length=16, default=JobState.ACTIVE.value, index=True)
    created_at = pw.DoubleField()
    finished_at = pw.DoubleField(null=True)
    total = pw.IntegerField(default=0)
    # Bumped by every change made outside the engine (cancel, retry), so a running engine
    # notices it on its next poll and recounts the job's tasks.
    revision = pw.IntegerField(default=0)


class Task(BaseModel):
    job = pw.ForeignKeyField(Job, backref="tasks", on_delete="CASCADE")
    index = pw.IntegerField()  # line number in the submitted input, from 0
    args = pw.TextField()  # JSON list
    state = pw.CharField(max_length=16, default=TaskState.PENDING.value)
    attempts = pw.IntegerField(default=0)  # attempts ever made: numbers 1..attempts exist
    retries_from = pw.IntegerField(default=0)  # `attempts` when `retry` last renewed the budget
    updated_at = pw.DoubleField()

    class Meta:
        # (job, state): dispatch takes a job's oldest pending tasks, and progress counts a
        # job's tasks per state, without scanning other jobs. Nothing more on state: every
        # index on it is rewritten twice per task (database.DROPPED_INDEXES).
        indexes = ((("job", "index"), True), (("job", "state"), False))


class Attempt(BaseModel):
    # Found by task through the unique (task, number) index: no index of its own.
    task = pw.ForeignKeyField(Task, backref="attempt_rows", on_delete="CASCADE", index=False)
    number = pw.IntegerField()  # 1 for the first dispatch of the task
    worker = pw.ForeignKeyField(Worker, backref="attempts")
    sent_at = pw.DoubleField()
    deadline = pw.DoubleField()  # the engine keeps open attempts in memory (leases.py)
    finished_at = pw.DoubleField(null=True)
    outcome = pw.CharField(max_length=16, default=AttemptOutcome.OPEN.value, index=True)
    error = pw.TextField(null=True)  # JSON {type, message, traceback}

    class Meta:
        indexes = ((("task", "number"), True),)


class Result(BaseModel):
    task = pw.ForeignKeyField(Task, unique=True, backref="result_rows", on_delete="CASCADE")
    attempt = pw.ForeignKeyField(Attempt)
    worker = pw.ForeignKeyField(Worker, backref="results")
    value = pw.TextField()  # JSON
    elapsed = pw.DoubleField()
    received_at = pw.DoubleField()


MODELS = [Worker, Job, Task, Attempt, Result]


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

    @property
    def finished(self) -> int:
        return self.done + self.failed + self.cancelled


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


# Outcomes that are a failed attempt's reason (shown in ResultRow.errors).
FAILED_OUTCOMES = (
    AttemptOutcome.ERROR.value, AttemptOutcome.TIMEOUT.value, AttemptOutcome.CRASHED.value,
    AttemptOutcome.REJECTED.value, AttemptOutcome.EXPIRED.value, AttemptOutcome.LOST.value,
)
# Automatic job names; a submitter may not choose one, so they never collide.
_AUTO_NAME = re.compile(r"job-\d+\Z")
# Longest JSON text of one task's arguments: the task message must stay under the payload limit.
MAX_ARGS_BYTES = MAX_PAYLOAD_BYTES - 1024
# Tasks read per query when listing results.
_RESULTS_CHUNK = 1000


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


class Store:
    """Opens the database and offers the operations every user of the store needs."""

    def __init__(self, db: pw.Database) -> None:
        self.db = db
        self.url = ""

    @classmethod
    def open(cls, url: str) -> "Store":
        """A SQLite path (``coordinator.db``, ``sqlite:///path``) or ``postgresql://...``;
        creates tables if missing. Raises StoreError with what to do on failure."""
        url = str(url)
        db = database.connect(url, SQLITE_BUSY_TIMEOUT_MS)  # a module global: tests shorten it
        store = cls(db)
        store.url = database.describe(url)
        with store._errors("open the database"):
            database_proxy.initialize(db)
            db.connect(reuse_if_open=True)
            db.create_tables(MODELS, safe=True)
            database.upgrade(db)
        return store

    @property
    def is_postgres(self) -> bool:
        return isinstance(self.db, pw.PostgresqlDatabase)

    @property
    def is_sqlite(self) -> bool:
        return isinstance(self.db, pw.SqliteDatabase)

    def close(self) -> None:
        """Close this thread's connection (other threads close their own when they end)."""
        if not self.db.is_closed():
            self.db.close()

    def bind(self) -> None:
        """Point the models at this store's database, for the calling thread."""
        if database_proxy.bound_here() is not self.db:
            database_proxy.initialize(self.db)

    def transaction(self) -> Any:
        """One atomic unit of work (SQLite: BEGIN IMMEDIATE)."""
        self.bind()
        return self.db.atomic()

    def relax_durability(self) -> None:
        """For the engine's connection: a commit survives a crash of the process but not
        necessarily of the machine (SQLite WAL, synchronous=NORMAL). Losing the last results
        to a power cut only means recomputing them: their leases are still open."""
        if self.is_sqlite:
            self.bind()
            self.db.execute_sql("PRAGMA synchronous=NORMAL")

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """Turn database failures into a StoreError that says what to do."""
        self.bind()
        try:
            yield
        except pw.OperationalError as exc:
            text = str(exc)
            if "locked" in text or "busy" in text:
                raise StoreLocked(f"cannot {doing}: the database {self.url} is locked by another process",
                                  "wait for the other command to finish and retry") from None
            hint = ("is the PostgreSQL server running, and the URL right?" if self.is_postgres
                    else "check the path and that this user may write to it")
            raise StoreError(f"cannot {doing} ({self.url}): {text.strip()}", hint) from None
        except pw.DatabaseError as exc:
            raise StoreError(f"cannot {doing} ({self.url}): {str(exc).strip()}",
                             "is this a dockercomp coordinator database?") from None

    # -- jobs (CLI submit/status/results/cancel/retry; Python API) ---------------------------
    def create_job(
        self,
        function: str,
        args_list: Iterable[list[Any]],
        *,
        name: str | None = None,
        timeout: float = TASK_TIMEOUT,
        max_attempts: int = MAX_ATTEMPTS,
        on_progress: Callable[[int], None] | None = None,
    ) -> Job:
        """Store a job and all its tasks in one transaction (nothing half-submitted), durable
        when it returns. ``name`` defaults to ``job-<id>``. Raises StoreError on bad input."""
        if not isinstance(function, str) or not 0 < len(function) <= 200 or function.strip() != function:
            raise InvalidInput(f"function name {function!r} is not usable",
                               "give the name of a task function, e.g. count_primes")
        if name is not None:
            try:
                validate_name(name, "job name")
            except InvalidName as exc:
                raise InvalidInput(str(exc), "pick another --job NAME") from None
            if _AUTO_NAME.match(name):
                raise InvalidInput(f"job name {name!r} is reserved for automatic names",
                                   "pick another --job NAME, or leave it out")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
            raise InvalidInput(f"timeout {timeout!r} must be a positive number of seconds")
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise InvalidInput(f"max attempts {max_attempts!r} must be a whole number of at least 1")
        now = time.time()
        with self._errors("store the job"), self.db.atomic():
            if name is not None and Job.select().where(Job.name == name).exists():
                raise InvalidInput(f"a job named {name!r} already exists",
                                   "pick another --job NAME (`dockercomp coordinator status` lists them)")
            job = Job.create(name=name or f"job-new-{os.getpid()}-{now}", function=function,
                             timeout=float(timeout), max_attempts=max_attempts, created_at=now)
            if name is None:
                job.name = f"job-{job.id}"
                job.save(only=[Job.name])
            total = 0
            rows: list[tuple[int, int, str, str, int, int, float]] = []
            pending = TaskState.PENDING.value
            for index, args in enumerate(args_list):
                rows.append((job.id, index, encode_args(args, index), pending, 0, 0, now))
                if len(rows) >= INSERT_BATCH:
                    self._insert_tasks(rows)
                    total += len(rows)
                    rows = []
                    if on_progress is not None:
                        on_progress(total)
            if rows:
                self._insert_tasks(rows)
                total += len(rows)
                if on_progress is not None:
                    on_progress(total)
            if total == 0:
                raise InvalidInput("the input holds no tasks", "give one JSON array of arguments per line")
            job.total = total
            job.save(only=[Job.total])
        return job

    def _insert_tasks(self, rows: list[tuple[int, int, str, str, int, int, float]]) -> None:
        if self.is_sqlite:
            # Plain DB-API calls skip peewee's per-row query building: ~5x faster.
            self.db.cursor().executemany(
                'INSERT INTO "task" ("job_id", "index", "args", "state", "attempts", "retries_from", "updated_at")'
                " VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        else:
            # COPY: one stream instead of 5,000 bound rows; ~10x faster than INSERT ... VALUES.
            # Text format: tab-separated, backslash escaped. Compact JSON holds no raw tab or
            # newline (json.dumps escapes control characters), so only backslashes need doubling.
            lines = "".join(f"{job}\t{index}\t{args.replace(chr(92), chr(92) * 2)}\t{state}\t{a}\t{r}\t{at!r}\n"
                            for job, index, args, state, a, r, at in rows)
            self.db.cursor().copy_expert(
                'COPY "task" ("job_id", "index", "args", "state", "attempts", "retries_from", "updated_at") FROM STDIN',
                io.StringIO(lines))

    def get_job(self, id_or_name: str | int) -> Job:
        """Raises UnknownJob (with the known names in its message) when missing."""
        with self._errors("read jobs"):
            job = None
            text = str(id_or_name).strip()
            if text.isdigit():
                job = Job.get_or_none(Job.id == int(text))
            if job is None:
                job = Job.get_or_none(Job.name == text)
            if job is None:
                known = [j.name for j in Job.select(Job.name).order_by(Job.id.desc()).limit(50)]
                raise UnknownJob(id_or_name, known)
            return job

    def jobs(self) -> list[Job]:
        with self._errors("read jobs"):
            return list(Job.select().order_by(Job.id))

    def task_counts(self, job_id: int) -> dict[str, int]:
        """Tasks of one job per TaskState value (every state present, zero when none)."""
        counts = {state.value: 0 for state in TaskState}
        with self._errors("count tasks"):
            query = (Task.select(Task.state, pw.fn.COUNT(Task.id).alias("n"))
                     .where(Task.job == job_id).group_by(Task.state).tuples())
            for state, n in query:
                counts[state] = n
        return counts

    def progress(self, job: Job) -> JobProgress:
        with self._errors("read progress"):
            fresh = Job.get_or_none(Job.id == job.id)
            if fresh is None:
                raise UnknownJob(job.id, [])
            counts = self.task_counts(fresh.id)
        return JobProgress(
            job_id=fresh.id, name=fresh.name, function=fresh.function, state=fresh.state,
            total=fresh.total, pending=counts["pending"], assigned=counts["assigned"],
            done=counts["done"], failed=counts["failed"], cancelled=counts["cancelled"],
            created_at=fresh.created_at, finished_at=fresh.finished_at,
        )

    def results(self, job: Job) -> Iterator[ResultRow]:
        """Every task of the job in input order, with its outcome."""
        last_index = -1
        while True:
            with self._errors("read results"):
                tasks = list(Task.select(Task.id, Task.index, Task.args, Task.state, Task.attempts)
                             .where((Task.job == job.id) & (Task.index > last_index))
                             .order_by(Task.index).limit(_RESULTS_CHUNK).tuples())
                if not tasks:
                    return
                ids = [t[0] for t in tasks]
                accepted = {
                    task_id: (value, elapsed, key)
                    for task_id, value, elapsed, key in (
                        Result.select(Result.task, Result.value, Result.elapsed, Worker.key)
                        .join(Worker).where(Result.task.in_(ids)).tuples())
                }
                errors: dict[int, list[dict[str, Any]]] = {}
                failed = (Attempt.select(Attempt.task, Attempt.number, Attempt.outcome, Attempt.error, Worker.key)
                          .join(Worker).where(Attempt.task.in_(ids) & Attempt.outcome.in_(FAILED_OUTCOMES))
                          .order_by(Attempt.task, Attempt.number).tuples())
                for task_id, number, outcome, error, key in failed:
                    detail = json.loads(error) if error else {}
                    errors.setdefault(task_id, []).append({
                        "attempt": number, "worker": key, "outcome": outcome,
                        "type": detail.get("type", outcome), "message": detail.get("message", ""),
                    })
            for task_id, index, args, state, attempts in tasks:
                value, elapsed, key = accepted.get(task_id, (None, None, None))
                yield ResultRow(
                    task_id=task_id, index=index, args=json.loads(args), state=state,
                    value=json.loads(value) if value is not None else None, worker=key,
                    attempts=attempts, elapsed=elapsed, errors=errors.get(task_id, []),
                )
            last_index = tasks[-1][1]

    def cancel_job(self, job: Job) -> int:
        """Cancel pending and assigned tasks; returns how many were cancelled.

        Open attempts stay open: the engine closes each when its worker answers, dies or
        its lease ends, so the worker's capacity is counted right until then."""
        now = time.time()
        with self._errors("cancel the job"), self.db.atomic():
            count = (Task.update(state=TaskState.CANCELLED.value, updated_at=now)
                     .where((Task.job == job.id) & Task.state.in_([TaskState.PENDING.value, TaskState.ASSIGNED.value]))
                     .execute())
            fields: dict[Any, Any] = {Job.revision: Job.revision + 1}
            if count:
                fields.update({Job.state: JobState.CANCELLED.value, Job.finished_at: now})
            Job.update(fields).where(Job.id == job.id).execute()
        return count

    def retry_failed(self, job: Job) -> int:
        """Return failed tasks to pending with a fresh attempt budget; returns how many."""
        now = time.time()
        with self._errors("retry the job"), self.db.atomic():
            count = (Task.update(state=TaskState.PENDING.value, retries_from=Task.attempts, updated_at=now)
                     .where((Task.job == job.id) & (Task.state == TaskState.FAILED.value)).execute())
            if count:
                Job.update(state=JobState.ACTIVE.value, finished_at=None, revision=Job.revision + 1
                           ).where(Job.id == job.id).execute()
        return count

    # -- workers ---------------------------------------------------------------------------
    def workers(self) -> list[Worker]:
        with self._errors("read workers"):
            return list(Worker.select().order_by(Worker.key))

    def inflight(self) -> dict[str, int]:
        """Open attempts per worker key (tasks a worker holds right now, as far as we know)."""
        with self._errors("read workers"):
            query = (Attempt.select(Worker.key, pw.fn.COUNT(Attempt.id)).join(Worker)
                     .where(Attempt.outcome == AttemptOutcome.OPEN.value).group_by(Worker.key).tuples())
            return dict(query)

    def purge_lost(self, older_than: float, now: float) -> list[Worker]:
        """Mark workers lost before ``now - older_than`` as purged; returns them (the caller
        clears their retained presence on the broker)."""
        with self._errors("purge workers"), self.db.atomic():
            lost = list(Worker.select().where((Worker.state == WorkerState.LOST.value)
                                              & (Worker.lost_at <= now - older_than)))
            if lost:
                Worker.update(state=WorkerState.PURGED.value, purged_at=now).where(
                    Worker.id.in_([w.id for w in lost])).execute()
                for worker in lost:
                    worker.state, worker.purged_at = WorkerState.PURGED.value, now
        return lost
