"""The coordinator's tables as peewee models (sqlstore.py runs every statement on them;
database.py opens the database and upgrades its schema).

Apart from sqlstore.py so that its queries stay readable in one file; sqlstore re-exports
every model (``from dockercomp.coordinator.sqlstore import Worker`` keeps working).
"""

from __future__ import annotations

import peewee as pw

from dockercomp.coordinator.database import NeverReusedId, database_proxy
from dockercomp.coordinator.rows import AttemptOutcome, JobState, TaskState, WorkerState


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
    id = NeverReusedId()
    name = pw.CharField(max_length=64, unique=True)
    function = pw.CharField(max_length=200)
    timeout = pw.DoubleField()
    max_attempts = pw.IntegerField()
    state = pw.CharField(max_length=16, default=JobState.ACTIVE.value, index=True)
    created_at = pw.DoubleField()
    finished_at = pw.DoubleField(null=True)
    total = pw.IntegerField(default=0)
    revision = pw.IntegerField(default=0)  # JobRow.revision
    replication = pw.TextField(null=True)  # Replication JSON; NULL: one replica (added later: database.py)


class Task(BaseModel):
    id = NeverReusedId()
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
    id = NeverReusedId()
    # Found by task through the unique (task, number) index: no index of its own.
    task = pw.ForeignKeyField(Task, backref="attempt_rows", on_delete="CASCADE", index=False)
    number = pw.IntegerField()  # 1 for the first dispatch of the task
    # No index of its own either: nothing looks attempts up by worker (a worker row is never
    # deleted, so no foreign-key check needs one), and every attempt opened wrote a page of it.
    worker = pw.ForeignKeyField(Worker, backref="attempts", index=False)
    sent_at = pw.DoubleField()
    deadline = pw.DoubleField()  # the engine keeps open attempts in memory (leases.py)
    finished_at = pw.DoubleField(null=True)
    # Indexed only while open (attempt_open, below): every query by outcome alone asks for the
    # open ones, and an index of every outcome was rewritten at each change of it.
    outcome = pw.CharField(max_length=16, default=AttemptOutcome.OPEN.value)
    error = pw.TextField(null=True)  # JSON {type, message, traceback}
    value = pw.TextField(null=True)  # replicated jobs: the value returned, JSON (added later)
    elapsed = pw.DoubleField(null=True)  # replicated jobs: its CPU-seconds, the credit (added later)
    # The attempt's secret, echoed by its result (added later: database.py; "" before nonces).
    nonce = pw.CharField(max_length=64, default="")

    class Meta:
        indexes = ((("task", "number"), True),)


# A partial index: an attempt enters it when opened and leaves it when it ends, so it holds
# only the attempts in flight, and an ended attempt's changes (a replica's value, then its
# verdict) no longer move it in an index. Per result, the attempt writes cost 17 % less
# (11.4 instead of 13.8 µs in a SQLite loop of the engine's statements), and replicated jobs
# gained most (bench.compare, replicas ratio 0.85 -> 0.96). The queries by open outcome use it
# (tests/system/test_dispatch.py).
Attempt.add_index(Attempt.index(Attempt.outcome, name="attempt_open",
                                where=(Attempt.outcome == AttemptOutcome.OPEN.value)))


class Result(BaseModel):
    task = pw.ForeignKeyField(Task, unique=True, backref="result_rows", on_delete="CASCADE")
    # Indexed: deleting a job's attempts checks that no result still refers to them.
    attempt = pw.ForeignKeyField(Attempt)
    worker = pw.ForeignKeyField(Worker, backref="results", index=False)  # as Attempt.worker
    value = pw.TextField()  # JSON
    elapsed = pw.DoubleField()
    received_at = pw.DoubleField()


class Quarantine(BaseModel):
    volunteer = pw.CharField(max_length=64, unique=True)
    reason = pw.TextField()
    since = pw.DoubleField()


MODELS = [Worker, Job, Task, Attempt, Result, Quarantine]
