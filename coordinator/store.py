"""The coordinator's durable state (peewee): workers, jobs, tasks, attempts, results.

SQLite file by default (WAL), PostgreSQL for scale: ``Store.open("path.db")`` or
``Store.open("postgresql://user:pass@host:port/db")``. Attempts are kept apart from tasks
(one row per dispatch of a task to a worker), so redundant computation with quorum
validation can later compare several attempts of one task.

Status enums are ``str`` enums with a comment per member.

SKELETON written by the lead: models and the signatures the CLI, API and service rely on.
The coordinator-core engineer owns this file and fills in the bodies (keeping signatures).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Iterable, Iterator

import peewee as pw

database_proxy = pw.DatabaseProxy()


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


class Task(BaseModel):
    job = pw.ForeignKeyField(Job, backref="tasks", on_delete="CASCADE")
    index = pw.IntegerField()  # line number in the submitted input, from 0
    args = pw.TextField()  # JSON list
    state = pw.CharField(max_length=16, default=TaskState.PENDING.value)
    attempts = pw.IntegerField(default=0)
    updated_at = pw.DoubleField()

    class Meta:
        indexes = ((("state", "id"), False), (("job", "index"), True))


class Attempt(BaseModel):
    task = pw.ForeignKeyField(Task, backref="attempt_rows", on_delete="CASCADE")
    number = pw.IntegerField()  # 1 for the first dispatch of the task
    worker = pw.ForeignKeyField(Worker, backref="attempts")
    sent_at = pw.DoubleField()
    deadline = pw.DoubleField(index=True)
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


class Store:
    """Opens the database and offers the operations every user of the store needs."""

    def __init__(self, db: pw.Database) -> None:
        self.db = db

    @classmethod
    def open(cls, url: str) -> "Store":
        """A SQLite path (``coordinator.db``, ``sqlite:///path``) or ``postgresql://...``;
        creates tables if missing. Raises StoreError with what to do on failure."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # -- jobs (CLI submit/status/results/cancel/retry; Python API) ---------------------------
    def create_job(
        self,
        function: str,
        args_list: Iterable[list[Any]],
        *,
        name: str | None = None,
        timeout: float = 60.0,
        max_attempts: int = 3,
        on_progress: Callable[[int], None] | None = None,
    ) -> Job:
        """Store a job and all its tasks in one transaction (nothing half-submitted), durable
        when it returns. ``name`` defaults to ``job-<id>``. Raises StoreError on bad input."""
        raise NotImplementedError

    def get_job(self, id_or_name: str | int) -> Job:
        """Raises UnknownJob (with the known names in its message) when missing."""
        raise NotImplementedError

    def jobs(self) -> list[Job]:
        raise NotImplementedError

    def progress(self, job: Job) -> JobProgress:
        raise NotImplementedError

    def results(self, job: Job) -> Iterator[ResultRow]:
        """Every task of the job in input order, with its outcome."""
        raise NotImplementedError

    def cancel_job(self, job: Job) -> int:
        """Cancel pending and assigned tasks; returns how many were cancelled."""
        raise NotImplementedError

    def retry_failed(self, job: Job) -> int:
        """Return failed tasks to pending with a fresh attempt budget; returns how many."""
        raise NotImplementedError

    # -- workers ---------------------------------------------------------------------------
    def workers(self) -> list[Worker]:
        raise NotImplementedError

    def purge_lost(self, older_than: float, now: float) -> list[Worker]:
        """Mark workers lost before ``now - older_than`` as purged; returns them (the caller
        clears their retained presence on the broker)."""
        raise NotImplementedError
