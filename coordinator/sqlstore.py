"""The store on a SQL database (peewee): a SQLite file (WAL) by default, PostgreSQL for scale.

Every SQL statement of the coordinator is here (database.py opens the database and upgrades
its schema). The models reach the database through ``database_proxy``, bound per thread:
every ``SqlStore`` method binds its own database for the calling thread first, so an engine
thread and an API client in one process, or a test holding two stores, never cross. peewee
keeps one connection per thread, so several threads may also share one store. SQLite
transactions start ``IMMEDIATE``: a writer takes the lock up front and waits up to
busy_timeout for it, instead of failing half-way.

The engine's writes are hand-written, batched SQL: they run once per engine step, and
building them with peewee's query builder cost more than executing them.
"""

from __future__ import annotations

import io
import json
import os
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Sequence

import peewee as pw

from dockercomp.coordinator import database, heartbeat, leadership, unroutable
from dockercomp.coordinator.checkpoint import Checkpointer
from dockercomp.coordinator.database import database_proxy
from dockercomp.coordinator.errors import StoreError, StoreLocked, UnknownJob, UnknownTask
from dockercomp.coordinator.heartbeat import Heartbeat
from dockercomp.coordinator.leadership import Holder, Lead
from dockercomp.coordinator.models import MODELS, Attempt, Job, Quarantine, Result, Task, Worker  # noqa: F401 (re-exported)
from dockercomp.coordinator.replication import SINGLE, Replication
from dockercomp.coordinator.sqlreplicas import ReplicaQueries
from dockercomp.coordinator.store import (
    ALLOWED_FROM,
    FAILED_OUTCOMES,
    AttemptOutcome,
    AttemptRecord,
    AttemptRow,
    Changes,
    JobMark,
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
    decode_functions,
    dump_json,
    error_detail,
    error_entry,
    job_busy,
    name_taken,
    no_tasks,
)

# Tasks read per query when listing results.
_RESULTS_CHUNK = 1000
# Rows per IN (...) list: far below SQLite's 32,766 variables per statement.
_IN_CHUNK = 900
# peewee's translation of driver errors into its own (``SqlStore.failures`` catches those), for
# the statements the engine runs on the driver's cursor directly.
_DB_ERRORS = pw.__exception_wrapper__
# Values the engine's statements bind on every step, looked up once (an Enum member's .value
# is a descriptor call: it showed in the engine's profile).
_OPEN, _OK, _SUPERSEDED = AttemptOutcome.OPEN.value, AttemptOutcome.OK.value, AttemptOutcome.SUPERSEDED.value
_PENDING, _ASSIGNED = TaskState.PENDING.value, TaskState.ASSIGNED.value




def _chunks(items: list[Any], size: int = _IN_CHUNK) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _marks(param: str, values: Sequence[Any]) -> str:
    return ", ".join([param] * len(values))


def _job_row(row: Job) -> JobRow:
    return JobRow(row.id, row.name, row.function, row.timeout, row.max_attempts, row.state, row.created_at,
                  row.finished_at, row.total, row.revision, Replication.from_json(row.replication))


def _worker_row(row: Worker) -> WorkerRow:
    return WorkerRow(
        id=row.id, key=row.key, volunteer=row.volunteer, name=row.name, state=row.state, seq=row.seq,
        host=row.host, container=row.container, image=row.image, version=row.version, cpus=row.cpus,
        capacity=row.capacity, prefetch=row.prefetch, functions=decode_functions(row.functions),
        started=row.started, first_seen=row.first_seen, last_seen=row.last_seen, lost_at=row.lost_at,
        purged_at=row.purged_at, tasks_done=row.tasks_done, tasks_failed=row.tasks_failed,
    )


def _worker_columns(fields: dict[str, Any]) -> dict[str, Any]:
    check_worker_fields(fields)
    if "functions" in fields:
        fields = {**fields, "functions": dump_json(sorted(fields["functions"]))}
    return fields


class SqlStore(ReplicaQueries, Store):
    """The store on SQLite or PostgreSQL (``Store.open(url)``)."""

    failures = (StoreError, pw.PeeweeException)

    def __init__(self, db: pw.Database, url: str = "") -> None:
        self.db = db
        self.url = url
        self.checkpointer: Checkpointer | None = None  # the engine's SQLite WAL checkpoints

    @classmethod
    def open(cls, url: str, busy_timeout_ms: int = database.SQLITE_BUSY_TIMEOUT_MS,  # type: ignore[override]
             create: bool = True) -> "SqlStore":
        """Creates tables if missing. Raises StoreError with what to do on failure, and
        DatabaseMissing without ``create`` when there is no coordinator database yet."""
        url = str(url)
        if not create:
            database.check_exists(url)  # before connecting: SQLite would create the file
        store = cls(database.connect(url, busy_timeout_ms), database.describe(url))
        with store._errors("open the database"):
            database_proxy.initialize(store.db)
            store.db.connect(reuse_if_open=True)
            if not create and not store.db.table_exists("job"):
                store.db.close()
                raise database.missing(url, store.url)
            store.db.create_tables(MODELS, safe=True)
            heartbeat.create_table(store.db)
            leadership.create_table(store.db)
            unroutable.create_table(store.db)
            database.upgrade(store.db)
        return store

    @property
    def is_postgres(self) -> bool:
        return isinstance(self.db, pw.PostgresqlDatabase)

    @property
    def is_sqlite(self) -> bool:
        return isinstance(self.db, pw.SqliteDatabase)

    def close(self) -> None:
        checkpointer = None
        if self.checkpointer is not None and self.checkpointer.owner == threading.get_ident():
            checkpointer, self.checkpointer = self.checkpointer, None
            checkpointer.stop()  # the engine's: its last checkpoint first, while still connected
        if not self.db.is_closed():
            self.db.close()
        if checkpointer is not None:
            checkpointer.release()  # after the connection: closing it before drops SQLite's locks

    def bind(self) -> None:
        if database_proxy.bound_here() is not self.db:
            database_proxy.initialize(self.db)

    def transaction(self) -> Any:
        self.bind()
        if self.checkpointer is not None and self.checkpointer.owner == threading.get_ident():
            return self._engine_transaction(self.checkpointer)
        return self.db.atomic()

    @contextmanager
    def _engine_transaction(self, checkpointer: Checkpointer) -> Iterator[None]:
        with self.db.atomic():
            yield
        # The WAL grew big: the engine finishes the checkpoint (checkpoint.py); not inside an
        # outer transaction, where SQLite refuses one.
        if checkpointer.due and not self.db.in_transaction():
            checkpointer.finish(lambda sql: self.db.execute_sql(sql).fetchall())

    def relax_durability(self) -> None:
        """SQLite WAL with synchronous=NORMAL: losing the last results to a power cut only
        means recomputing them, as their leases are still open. The WAL's checkpoints leave the
        engine's commits for a thread of their own (coordinator/checkpoint.py)."""
        if self.is_sqlite:
            self.bind()
            self.db.execute_sql("PRAGMA synchronous=NORMAL")
            self.db.execute_sql("PRAGMA wal_autocheckpoint=0")
            if self.checkpointer is None:
                self.checkpointer = Checkpointer(self.db.database).start()

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

    # -- jobs ----------------------------------------------------------------------------------
    def _insert_job(self, function: str, name: str | None, timeout: float, max_attempts: int,
                    batches: Iterator[list[tuple[int, str]]], on_progress: Callable[[int], None] | None,
                    replace: bool = False, replication: Replication = SINGLE) -> JobRow:
        now = time.time()
        with self._errors("store the job"), self.db.atomic():
            old = Job.get_or_none(Job.name == name) if name is not None else None
            if old is not None:
                if not replace:
                    raise name_taken(old.name)
                self._delete_job(old.id, old.name)
            job = Job.create(name=name or f"job-new-{os.getpid()}-{now}", function=function,
                             timeout=timeout, max_attempts=max_attempts, created_at=now,
                             replication=replication.to_json())
            if name is None:
                job.name = f"job-{job.id}"
                job.save(only=[Job.name])
            total = 0
            pending = TaskState.PENDING.value
            for batch in batches:
                self._insert_tasks([(job.id, index, args, pending, 0, 0, now) for index, args in batch])
                total += len(batch)
                if on_progress is not None:
                    on_progress(total)
            if total == 0:
                raise no_tasks()
            job.total = total
            job.save(only=[Job.total])
        return _job_row(job)

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

    def get_job(self, id_or_name: str | int) -> JobRow:
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
            return _job_row(job)

    def jobs(self, ids: Iterable[int] | None = None) -> list[JobRow]:
        parts: Iterable[list[int] | None] = [None] if ids is None else _chunks(sorted(set(ids)))
        with self._errors("read jobs"):
            return [JobRow(*row[:-1], Replication.from_json(row[-1])) for part in parts
                    for row in Job.select(Job.id, Job.name, Job.function, Job.timeout, Job.max_attempts, Job.state,
                                          Job.created_at, Job.finished_at, Job.total, Job.revision, Job.replication)
                    .where(True if part is None else Job.id.in_(part)).order_by(Job.id).tuples()]

    def job_marks(self) -> list[JobMark]:
        # The driver's cursor: through peewee's rows, 1,000 jobs took 10 ms, twice a second.
        with self._errors("read jobs"), _DB_ERRORS:
            cursor = self.db.cursor()
            cursor.execute("SELECT id, created_at, revision, state, total FROM job ORDER BY id")
            return cursor.fetchall()

    def task_counts(self, job_id: int) -> dict[str, int]:
        counts = {state.value: 0 for state in TaskState}
        with self._errors("count tasks"):
            query = (Task.select(Task.state, pw.fn.COUNT(Task.id).alias("n"))
                     .where(Task.job == job_id).group_by(Task.state).tuples())
            for state, n in query:
                counts[state] = n
        return counts

    def results(self, job: JobRow) -> Iterator[ResultRow]:
        last_index = -1
        while True:
            with self._errors("read results"):
                tasks = list(Task.select(Task.id, Task.index, Task.args, Task.state, Task.attempts)
                             .where((Task.job == job.id) & (Task.index > last_index))
                             .order_by(Task.index).limit(_RESULTS_CHUNK).tuples())
                if not tasks:
                    return
            rows = self._result_rows(tasks, job)
            yield from rows
            last_index = tasks[-1][1]

    def _result_rows(self, tasks: list[tuple[int, int, str, str, int]], job: JobRow) -> list[ResultRow]:
        """ResultRows of these (id, index, args, state, attempts) tasks of ``job``, in their order."""
        with self._errors("read results"):
            ids = [t[0] for t in tasks]
            accepted = {
                task_id: (value, elapsed, key)
                for task_id, value, elapsed, key in (
                    Result.select(Result.task, Result.value, Result.elapsed, Worker.key)
                    .join(Worker).where(Result.task.in_(ids)).tuples())
            }
            errors: dict[int, list[dict[str, Any]]] = {}
            failed = (Attempt.select(Attempt.task, Attempt.number, Attempt.outcome, Attempt.error, Worker.key)
                      .join(Worker).where(Attempt.task.in_(ids) & (Attempt.outcome.in_(FAILED_OUTCOMES) | (
                          (Attempt.outcome == AttemptOutcome.UNVALIDATED.value) & Attempt.error.is_null(False))))
                      .order_by(Attempt.task, Attempt.number).tuples())
            for task_id, number, outcome, error, key in failed:
                errors.setdefault(task_id, []).append(error_entry(number, key, outcome, error))
            replicas = self.replica_values(ids) if not job.replication.single else {}
            failed_ids = [t[0] for t in tasks if t[3] == TaskState.FAILED.value]
            for task_id, text in unroutable.reasons(self.db, failed_ids).items():
                errors.setdefault(task_id, []).append(unroutable.error_entry(text))
        rows = []
        for task_id, index, args, state, attempts in tasks:
            value, elapsed, key = accepted.get(task_id, (None, None, None))
            rows.append(ResultRow(
                task_id=task_id, index=index, args=json.loads(args), state=state,
                value=json.loads(value) if value is not None else None, worker=key,
                attempts=attempts, elapsed=elapsed, errors=errors.get(task_id, []),
                replicas=replicas.get(task_id, []),
            ))
        return rows

    def running_count(self, job_id: int) -> int:
        p = self.db.param
        sql = ("SELECT COUNT(*) FROM (SELECT t.job_id, w.capacity, "
               "ROW_NUMBER() OVER (PARTITION BY a.worker_id ORDER BY a.id) AS n "
               "FROM attempt a JOIN task t ON t.id = a.task_id JOIN worker w ON w.id = a.worker_id "
               f"WHERE a.outcome = {p}) held WHERE held.job_id = {p} AND held.n <= held.capacity")
        with self._errors("count running tasks"):
            return int(self.db.execute_sql(sql, (AttemptOutcome.OPEN.value, job_id)).fetchone()[0])

    def attempts(self, job: JobRow, index: int) -> tuple[ResultRow, list[AttemptRow]]:
        with self._errors("read attempts"):
            task = Task.get_or_none((Task.job == job.id) & (Task.index == index))
            if task is None:
                raise UnknownTask(f"job {job.name!r} has no task #{index}",
                                  f"its tasks are numbered 0 to {job.total - 1} (input order)")
            rows = [AttemptRow(number, key, sent_at, finished_at, outcome,
                               error_detail(error) if outcome in FAILED_OUTCOMES else {})
                    for number, key, sent_at, finished_at, outcome, error in (
                        Attempt.select(Attempt.number, Worker.key, Attempt.sent_at, Attempt.finished_at,
                                       Attempt.outcome, Attempt.error)
                        .join(Worker).where(Attempt.task == task.id).order_by(Attempt.number).tuples())]
        [result] = self._result_rows([(task.id, task.index, task.args, task.state, task.attempts)], job)
        return result, rows

    def fail_pending(self, job_id: int, reason: str, now: float) -> int:
        self.bind()
        return unroutable.fail_pending(self.db, job_id, reason, now)

    def delete_job(self, job: JobRow) -> int:
        with self._errors("delete the job"), self.db.atomic():
            return self._delete_job(job.id, job.name)

    def _delete_job(self, job_id: int, name: str) -> int:
        """Inside a transaction: JobBusy while a worker holds a task, else delete it all."""
        p = self.db.param
        tasks = f"SELECT id FROM task WHERE job_id = {p}"
        held = self.db.execute_sql(f"SELECT COUNT(*) FROM attempt WHERE outcome = {p} AND task_id IN ({tasks})",
                                   (AttemptOutcome.OPEN.value, job_id)).fetchone()[0]
        if held:
            raise job_busy(name, held)
        unroutable.forget_job(self.db, job_id)
        self.db.execute_sql(f"DELETE FROM result WHERE task_id IN ({tasks})", (job_id,))
        self.db.execute_sql(f"DELETE FROM attempt WHERE task_id IN ({tasks})", (job_id,))
        count = self.db.execute_sql(f"DELETE FROM task WHERE job_id = {p}", (job_id,)).rowcount
        self.db.execute_sql(f"DELETE FROM job WHERE id = {p}", (job_id,))
        return int(count)

    def task_ids(self, job_id: int, states: Iterable[str]) -> set[int]:
        with self._errors("read tasks"):
            query = Task.select(Task.id).where((Task.job == job_id) & Task.state.in_(list(states))).tuples()
            return {task_id for (task_id,) in query}

    def cancel_job(self, job: JobRow) -> int:
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

    def retry_failed(self, job: JobRow) -> int:
        now = time.time()
        with self._errors("retry the job"), self.db.atomic():
            count = (Task.update(state=TaskState.PENDING.value, retries_from=Task.attempts, updated_at=now)
                     .where((Task.job == job.id) & (Task.state == TaskState.FAILED.value)).execute())
            if count:
                Job.update(state=JobState.ACTIVE.value, finished_at=None, revision=Job.revision + 1
                           ).where(Job.id == job.id).execute()
        return count

    # -- workers ---------------------------------------------------------------------------------
    def workers(self) -> list[WorkerRow]:
        with self._errors("read workers"):
            return [_worker_row(row) for row in Worker.select().order_by(Worker.key)]

    def inflight(self) -> dict[str, int]:
        with self._errors("read workers"):
            query = (Attempt.select(Worker.key, pw.fn.COUNT(Attempt.id)).join(Worker)
                     .where(Attempt.outcome == AttemptOutcome.OPEN.value).group_by(Worker.key).tuples())
            return dict(query)

    def purge_lost(self, older_than: float, now: float) -> list[WorkerRow]:
        with self._errors("purge workers"), self.db.atomic():
            lost = list(Worker.select().where((Worker.state == WorkerState.LOST.value)
                                              & (Worker.lost_at <= now - older_than)).order_by(Worker.key))
            if lost:
                Worker.update(state=WorkerState.PURGED.value, purged_at=now).where(
                    Worker.id.in_([w.id for w in lost])).execute()
                for worker in lost:
                    worker.state, worker.purged_at = WorkerState.PURGED.value, now
        return [_worker_row(row) for row in lost]

    # -- the engine: workers ----------------------------------------------------------------------
    def add_worker(self, key: str, volunteer: str, name: str, first_seen: float, **fields: Any) -> WorkerRow:
        self.bind()
        row = Worker.create(key=key, volunteer=volunteer, name=name, first_seen=first_seen,
                            **{"last_seen": first_seen, **_worker_columns(fields)})
        return _worker_row(row)

    def update_worker(self, worker_id: int, **fields: Any) -> None:
        self.bind()
        Worker.update(_worker_columns(fields)).where(Worker.id == worker_id).execute()

    def purged_among(self, worker_ids: list[int]) -> list[int]:
        self.bind()
        purged = []
        for part in _chunks(worker_ids):
            purged += [worker_id for (worker_id,) in Worker.select(Worker.id).where(
                Worker.id.in_(part) & (Worker.state == WorkerState.PURGED.value)).tuples()]
        return purged

    # -- the engine: jobs and dispatch --------------------------------------------------------------
    def finish_job(self, job_id: int, now: float) -> None:
        self.bind()
        failed = Task.select(pw.SQL("1")).where((Task.job == job_id) & (Task.state == TaskState.FAILED.value)).exists()
        Job.update(state=JobState.FAILED.value if failed else JobState.DONE.value, finished_at=now).where(
            (Job.id == job_id) & (Job.state == JobState.ACTIVE.value)).execute()

    def beat(self, beat: Heartbeat) -> None:
        with self._errors("record the heartbeat"), self.db.atomic():
            heartbeat.write(self.db, beat)

    def heartbeat(self) -> Heartbeat | None:
        with self._errors("read the heartbeat"):
            return heartbeat.read(self.db)

    def pending_tasks(self, job_id: int, limit: int) -> list[PendingRow]:
        p = self.db.param
        sql = (f"SELECT id, args, attempts, retries_from FROM task WHERE job_id = {p} AND state = {p} "
               f"ORDER BY id LIMIT {p}")
        if self.is_postgres:
            sql += " FOR UPDATE"  # a concurrent `cancel` waits for this transaction
        cursor = self.db.cursor()
        with _DB_ERRORS:
            cursor.execute(sql, (job_id, _PENDING, limit))
            return cursor.fetchall()

    def open_attempts(self, attempts: list[NewAttempt], now: float) -> dict[int, int]:
        p = self.db.param
        row = f"({p}, {p}, {p}, {p}, {p}, {p}, {p})"
        opened: dict[int, int] = {}
        cursor = self.db.cursor()
        insert = "INSERT INTO attempt (task_id, number, worker_id, sent_at, deadline, outcome, nonce) VALUES "
        with _DB_ERRORS:
            for part in _chunks(attempts, 500):
                values: list[Any] = []
                for task_id, number, worker_id, deadline, nonce in part:
                    values += (task_id, number, worker_id, now, deadline, _OPEN, nonce)
                if len(part) == 1 and self.is_sqlite:
                    # A lone attempt (every one at window 1): its id without RETURNING, which
                    # costs SQLite 14-28 instead of 8 us (the rows are buffered, then fetched).
                    cursor.execute(insert + row, values)
                    opened[part[0][0]] = cursor.lastrowid
                else:
                    cursor.execute(insert + f"{', '.join([row] * len(part))} RETURNING id, task_id", values)
                    opened.update((task_id, attempt_id) for attempt_id, task_id in cursor.fetchall())
                task_ids = [a[0] for a in part]
                cursor.execute(f"UPDATE task SET state = {p}, attempts = attempts + 1, updated_at = {p} "
                               f"WHERE id IN ({_marks(p, task_ids)})", [_ASSIGNED, now, *task_ids])
        return opened

    def open_leases(self) -> list[OpenAttempt]:
        self.bind()
        query = (Attempt.select(Attempt.id, Attempt.task, Attempt.number, Task.job, Attempt.worker, Attempt.sent_at,
                                Attempt.deadline, Task.retries_from, Task.args, Job.function, Job.timeout,
                                Attempt.nonce)
                 .join(Task).join(Job)
                 .where(Attempt.outcome == AttemptOutcome.OPEN.value).tuples())
        return [OpenAttempt(*row) for row in query]

    def extend_deadlines(self, by: float) -> None:
        p = self.db.param
        self.db.execute_sql(f"UPDATE attempt SET deadline = deadline + {p} WHERE outcome = {p}",
                            (by, AttemptOutcome.OPEN.value))

    # -- the engine: the ledger ------------------------------------------------------------------
    def apply(self, changes: Changes, now: float) -> None:
        """One statement per kind of change, never one per row (executemany) where it can be
        helped: the sqlite3 module releases the GIL for every row, and each time the network
        thread took it the engine waited to get it back. The statements go to the driver's
        cursor directly (peewee's execute_sql adds a logging check and a cursor per statement),
        inside peewee's error translation, so a failure is one of ``failures`` as anywhere else."""
        if not changes:
            return
        p = self.db.param
        row = f"({p}, {p}, {p}, {p}, {p}, {p})"
        cursor = self.db.cursor()
        with _DB_ERRORS:
            for part in _chunks(changes.results, 500):
                cursor.execute("INSERT INTO result (task_id, attempt_id, worker_id, value, elapsed, received_at) "
                               f"VALUES {', '.join([row] * len(part))}", [v for result in part for v in result])
            self.write_replicas(changes, now)
            for ids in _chunks(changes.ok_attempts):
                cursor.execute(f"UPDATE attempt SET outcome = {p}, finished_at = {p} WHERE id IN ({_marks(p, ids)})",
                               [_OK, now, *ids])
            for ids in _chunks(changes.superseded_attempts):
                cursor.execute(f"UPDATE attempt SET outcome = {p}, finished_at = {p} "
                               f"WHERE outcome = {p} AND id IN ({_marks(p, ids)})",
                               [_SUPERSEDED, now, _OPEN, *ids])
            if changes.closed_attempts:
                cursor.executemany(f"UPDATE attempt SET outcome = {p}, error = {p}, finished_at = {p} WHERE id = {p}",
                                   [(outcome, error, now, attempt_id)
                                    for attempt_id, outcome, error in changes.closed_attempts])
            by_state: dict[str, list[int]] = {}
            for task_id, state in changes.task_states.items():
                by_state.setdefault(state, []).append(task_id)
            for state, ids in by_state.items():
                sources = ALLOWED_FROM[state]
                for part in _chunks(ids):
                    cursor.execute(f"UPDATE task SET state = {p}, updated_at = {p} WHERE id IN ({_marks(p, part)}) "
                                   f"AND state IN ({_marks(p, sources)})", [state, now, *part, *sources])
            self._add_counts(cursor, "tasks_done", changes.worker_done)
            self._add_counts(cursor, "tasks_failed", changes.worker_failed)
            if changes.uncharged:
                cursor.executemany(f"UPDATE task SET retries_from = retries_from + {p} WHERE id = {p}",
                                   [(n, task_id) for task_id, n in changes.uncharged.items()])
        changes.clear()

    def _add_counts(self, cursor: Any, column: str, counts: dict[int, int]) -> None:
        """worker.<column> += n for each (worker id, n), in one statement per 400 workers."""
        p = self.db.param
        for part in _chunks(list(counts.items()), 400):
            cases = " ".join([f"WHEN {p} THEN {p}"] * len(part))
            cursor.execute(f"UPDATE worker SET {column} = {column} + CASE id {cases} END "
                           f"WHERE id IN ({_marks(p, part)})",
                           [v for worker_id, n in part for v in (worker_id, n)] + [w for w, _ in part])

    def find_attempt(self, task_id: int, number: int) -> AttemptRecord | None:
        self.bind()
        row = (Attempt.select(Attempt.id, Attempt.worker, Attempt.outcome, Task.state, Task.job, Attempt.nonce)
               .join(Task).where((Attempt.task == task_id) & (Attempt.number == number)).tuples().first())
        return AttemptRecord(*row) if row else None

    def task_exists(self, task_id: int) -> bool:
        self.bind()
        return Task.select(pw.SQL("1")).where(Task.id == task_id).exists()

    # -- which coordinator is active (leadership.py) -----------------------------------------------
    def claim_lead(self, holder: Holder, ttl: float, take_from: int | None = None) -> Lead:
        with self._errors("claim the lead"):
            return leadership.claim(self.db, holder, ttl, take_from)

    def renew_lead(self, epoch: int, ttl: float) -> bool:
        self.bind()
        return leadership.renew(self.db, epoch, ttl)

    def release_lead(self, epoch: int) -> None:
        with self._errors("release the lead"):
            leadership.release(self.db, epoch)

    def lead(self) -> Lead | None:
        with self._errors("read the lead"):
            return leadership.read(self.db)

    def fence_sessions(self, idle_timeout: float) -> None:
        if self.is_postgres:
            # A connection option, so that sessions opened later (other threads, reconnects) get it.
            self.db.connect_params["options"] = f"-c idle_in_transaction_session_timeout={int(idle_timeout * 1000)}"
            self.close()
