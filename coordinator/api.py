"""The scientist's Python API, for notebooks and scripts; the ``coordinator`` CLI is built on it.

>>> from coordinator.api import connect
>>> client = connect("dockercomp.db")          # same --db as `dockercomp coordinator serve`
>>> job = client.submit("count_primes", [[0, 10_000], [10_000, 20_000]], name="primes")
>>> job.wait()                                  # rich progress bar; returns JobProgress
>>> [row.value for row in job.results()]        # input order
[1229, 1033]
>>> for row in job.as_completed(): ...          # as they finish

Submitting writes to the store (durable on return); a running ``dockercomp coordinator serve`` on
the same database picks new work up at its next poll of the jobs (0.5 s), or at once when the
client knows the broker (``broker=`` or ``$DOCKERCOMP_BROKER``): ``submit`` then publishes a
nudge that wakes it. The API reads progress and results back from the store; only the nudge
and ``Client.purge`` use the broker.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from dockercomp.broker.connection import MqttConnection
from dockercomp.broker.defaults import BROKER_URL_ENV, DEFAULT_BROKER_URL
from dockercomp.broker.errors import BrokerError, SettingsError
from dockercomp.broker.settings import BrokerSettings
from dockercomp.broker.topics import Topics, WorkerRef
from dockercomp.coordinator.defaults import DB_PATH, DB_URL_ENV, NUDGE_TIMEOUT, WAIT_POLL_INTERVAL
from dockercomp.coordinator.errors import CoordinatorError
from dockercomp.coordinator.heartbeat import Liveness, liveness
from dockercomp.coordinator.replication import Replication
from dockercomp.coordinator.store import (
    FINISHED_STATES,
    AttemptRow,
    JobProgress,
    JobRow,
    ResultRow,
    Store,
    TaskState,
    WorkerRow,
    WorkerState,
)

log = logging.getLogger(__name__)

# Broker used when neither --broker/broker= nor DOCKERCOMP_BROKER says otherwise.
DEFAULT_BROKER = DEFAULT_BROKER_URL

# Seconds between two looks at the store while waiting for a job (a COUNT query each).
POLL_INTERVAL = WAIT_POLL_INTERVAL

# Seconds of waiting before, and between, looks at why a job does not progress (a few queries
# each): long enough for agents and `serve` started with the job to have connected.
STALL_CHECK_INTERVAL = 5.0

# Seconds `purge` waits for the broker before reporting it unreachable.
BROKER_CONNECT_TIMEOUT = 5.0


class JobTimeout(CoordinatorError, TimeoutError):
    """``Job.wait``/``as_completed`` gave up; the job goes on, wait again to keep following it."""

    def __init__(self, progress: JobProgress, waited: float, why: str = "") -> None:
        self.progress = progress
        self.waited = waited
        self.why = why  # what holds the job up, when known (Job.stalled)
        if not why and not progress.done:
            why = "are workers online? (`dockercomp coordinator workers`)"
        super().__init__(
            f"job {progress.name!r} not finished after {waited:.0f} s: "
            f"{progress.finished}/{progress.total} tasks finished" + (f" — {why}" if why else "")
        )


class JobStalled(UserWarning):
    """Warned once by ``Job.wait``/``as_completed`` when the job cannot move: no online worker
    offers its function, or `serve` is not running (the message says which)."""


class TasksFailed(CoordinatorError):
    """``Job.values`` found tasks without a value; ``rows`` holds them (failed or cancelled)."""

    def __init__(self, job: str, rows: list[ResultRow]) -> None:
        self.job = job
        self.rows = rows
        first = rows[0]
        why = ""
        if first.errors:
            last = first.errors[-1]
            why = f": {last.get('type') or last.get('outcome')}: {last.get('message', '')}".rstrip(": ")
        super().__init__(
            f"{len(rows)} task(s) of job {job!r} have no value; first is #{first.index} "
            f"({first.state}{why}) — see `dockercomp coordinator results {job}`, or `dockercomp coordinator retry {job}`"
        )


def default_db() -> str:
    """``$DOCKERCOMP_DB``, else the coordinator's default database file."""
    return os.environ.get(DB_URL_ENV) or DB_PATH


def default_broker() -> str:
    """``$DOCKERCOMP_BROKER``, else a broker on this machine."""
    return os.environ.get(BROKER_URL_ENV) or DEFAULT_BROKER


@dataclass(frozen=True)
class WorkerInfo:
    """A worker as the store knows it, with the tasks it holds right now."""

    key: str  # "volunteer/worker"
    volunteer: str
    name: str
    state: str  # WorkerState value
    host: str
    container: str | None
    image: str | None
    version: str
    cpus: int
    capacity: int
    prefetch: int  # tasks it asks to have queued beyond capacity
    functions: list[str]
    in_flight: int  # open attempts: tasks sent to it and not answered yet
    tasks_done: int
    tasks_failed: int
    first_seen: float
    last_seen: float
    lost_at: float | None
    purged_at: float | None
    quarantined: str | None = None  # why its volunteer gets no work (until released)

    @classmethod
    def from_row(cls, row: WorkerRow, in_flight: int, quarantined: str | None = None) -> WorkerInfo:
        return cls(
            key=row.key, volunteer=row.volunteer, name=row.name, state=row.state, host=row.host,
            container=row.container, image=row.image, version=row.version, cpus=row.cpus,
            capacity=row.capacity, prefetch=row.prefetch, functions=list(row.functions), in_flight=in_flight,
            tasks_done=row.tasks_done, tasks_failed=row.tasks_failed, first_seen=row.first_seen,
            last_seen=row.last_seen, lost_at=row.lost_at, purged_at=row.purged_at, quarantined=quarantined,
        )  # fmt: skip


@dataclass(frozen=True)
class PurgeReport:
    """What ``Client.purge`` did: workers purged in the store, and whether their retained
    presence was cleared on the broker (``broker_error`` says why not)."""

    purged: list[WorkerInfo]
    cleared: bool
    broker_url: str
    broker_error: str | None
    topics: list[str]  # retained presence and status topics of the purged workers


class Client:
    """A connection to the coordinator's store: submit jobs, follow them, fetch results.

    ``db`` is a SQLite path or ``postgresql://…`` URL (default ``$DOCKERCOMP_DB``, else
    ``coordinator.defaults.DB_PATH`` in the current directory); ``broker`` is used by ``purge``
    and by ``submit``, which nudges a running ``serve`` over it so dispatch starts at once
    (``nudge``: default on when the broker is known, from ``broker`` or ``$DOCKERCOMP_BROKER``;
    without a nudge ``serve`` finds the job at its next poll). ``poll_interval``, ``clock``
    and ``sleep`` are injectable so tests need no real waiting.
    """

    def __init__(
        self,
        db: str | None = None,
        *,
        broker: str | None = None,
        poll_interval: float = POLL_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        create: bool = True,
        nudge: bool | None = None,
    ) -> None:
        self.db = db or default_db()
        self.nudge = nudge if nudge is not None else bool(broker or os.environ.get(BROKER_URL_ENV))
        self.broker = broker or default_broker()
        self.poll_interval = poll_interval
        self.clock = clock
        self.sleep = sleep
        # create=False: DatabaseMissing (naming the path) instead of a new, empty database.
        self.store = Store.open(self.db, create=create)

    # -- jobs --------------------------------------------------------------------------------
    def submit(
        self,
        function: str,
        args_list: Iterable[Iterable[Any]],
        *,
        name: str | None = None,
        timeout: float = 60.0,
        max_attempts: int = 3,
        on_progress: Callable[[int], None] | None = None,
        replace: bool = False,
        replicas: int = 1,
        quorum: int | None = None,
        max_replicas: int | None = None,
        distinct: str = "volunteer",
        validator: str | None = None,
        adaptive: bool = False,
    ) -> Job:
        """Store a job: one task per argument list, all or nothing, durable on return.

        Replication (docs/running-in-public.md): each task goes to ``replicas`` distinct
        volunteers (``distinct="worker"``: workers) and is done when ``quorum`` values agree
        (canonical JSON, or the ``validator`` named); more replicas up to ``max_replicas``
        otherwise. ``adaptive``: a trusted volunteer's value is accepted alone, bar spot checks.
        ``args_list`` may be any iterable, a generator included: it is read once, in batches,
        as the tasks are stored (memory stays flat however many tasks it yields).

        Raises InvalidInput naming the first unusable argument list, a bad option or a name
        already taken (nothing is stored then), and StoreError when the database fails.
        ``replace=True``: a job of that name is deleted in the same transaction (rerunning a
        notebook cell); if anything fails, the old job stays as it was.
        """
        # Streamed: the store pulls ``args_list`` batch by batch inside its transaction, so a
        # generator of a million tasks never sits in memory whole (tuples are taken as lists).
        row = self.store.create_job(
            function, args_list,  # type: ignore[arg-type]
            name=name, timeout=timeout, max_attempts=max_attempts, on_progress=on_progress, replace=replace,
            replication=Replication.make(replicas, quorum, max_replicas, distinct, validator, adaptive),
        )
        if self.nudge:
            self.nudge_coordinator()
        return Job(self, row)

    def nudge_coordinator(self, timeout: float = NUDGE_TIMEOUT) -> bool:
        """Tell a running ``serve`` that new work is stored (it polls its jobs at once);
        True once the broker took the nudge. Never raises: without it the job is picked up at
        the engine's next poll anyway (the broker may be down, or this account may not nudge)."""
        connection: MqttConnection | None = None
        try:
            settings = BrokerSettings.from_url(self.broker)
            # A fresh client id each time: two submits at once must not take over each other.
            connection = MqttConnection(settings, client_id=f"dockercomp-submit-{uuid.uuid4().hex[:12]}")
            connection.start()
            connection.wait_connected(timeout)
            connection.publish(Topics(settings.root).coordinator_nudge, b"", qos=1)
            return connection.flush(timeout)
        except (SettingsError, BrokerError, OSError) as exc:  # the URL names no password (masked)
            log.warning("job stored; could not nudge the coordinator (%s): it is picked up at its next poll", exc)
            return False
        finally:
            if connection is not None:
                connection.close(timeout)

    def job(self, id_or_name: str | int) -> Job:
        """A submitted job by id or name; UnknownJob (naming the known ones) when missing."""
        return Job(self, self.store.get_job(id_or_name))

    def jobs(self) -> list[Job]:
        return [Job(self, row) for row in self.store.jobs()]

    # -- the coordinator and its workers ---------------------------------------------------------
    def liveness(self) -> Liveness:
        """Whether `dockercomp coordinator serve` runs on this store now (its heartbeat)."""
        return liveness(self.store.heartbeat())

    def offering(self, function: str) -> list[str]:
        """Keys of the online workers that offer ``function``."""
        return [row.key for row in self.store.workers()
                if row.state == WorkerState.ONLINE.value and function in row.functions]

    def unroutable(self, function: str) -> str:
        """"no online worker offers 'f'" (with the functions they do offer), or "" when one does."""
        if self.offering(function):
            return ""
        offered = sorted({f for row in self.store.workers() if row.state == WorkerState.ONLINE.value
                          for f in row.functions})
        return (f"no online worker offers {function!r}"
                + (f" (they offer: {', '.join(offered)})" if offered else " (no worker is online)"))

    def workers(self) -> list[WorkerInfo]:
        """Every worker ever seen, with how many tasks each holds right now."""
        in_flight = self.store.inflight()
        held = self.store.quarantines()
        return [WorkerInfo.from_row(row, in_flight.get(row.key, 0), held.get(row.volunteer))
                for row in self.store.workers()]

    def purge(
        self,
        older_than: float = 0.0,
        *,
        broker: str | None = None,
        connect_timeout: float = BROKER_CONNECT_TIMEOUT,
        now: float | None = None,
    ) -> PurgeReport:
        """Purge workers lost for more than ``older_than`` seconds (0: every lost worker) and
        clear their retained presence on the broker when it is reachable.

        The store is purged even when the broker is not; the report then carries the error
        and the topics still holding a retained presence.
        """
        settings = BrokerSettings.from_url(broker or self.broker)
        topics = Topics(settings.root)
        purged = self.store.purge_lost(older_than, time.time() if now is None else now)
        infos = [WorkerInfo.from_row(row, 0) for row in purged]
        refs = [WorkerRef(w.volunteer, w.name) for w in infos]
        retained = [topic for ref in refs for topic in (topics.presence(ref), topics.status_worker(ref))]
        if not refs:
            return PurgeReport(infos, True, settings.url, None, [])
        try:
            clear_retained(settings, topics, refs, connect_timeout)
        except BrokerError as exc:
            return PurgeReport(infos, False, settings.url, str(exc), retained)
        return PurgeReport(infos, True, settings.url, None, retained)

    # -- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(db: str | None = None, **options: Any) -> Client:
    """``Client(db, **options)``: the short form for notebooks."""
    return Client(db, **options)


def clear_retained(settings: BrokerSettings, topics: Topics, refs: list[WorkerRef], timeout: float) -> None:
    """Delete the retained presence and status of each worker on the broker (the engine's
    clear_retained_presence) and wait until the broker acknowledged. Raises BrokerError
    (ConnectionFailed when the broker cannot be reached within ``timeout``)."""
    from dockercomp.coordinator.service import clear_retained_presence  # the engine, only when purging

    connection = MqttConnection(settings, client_id=f"dockercomp-purge-{os.getpid()}")
    connection.start()
    try:
        connection.wait_connected(timeout)
        clear_retained_presence(connection, topics, refs)
        if not connection.flush(timeout):
            raise BrokerError(f"the broker at {settings.url} did not acknowledge within {timeout:.0f} s")
    finally:
        connection.close(timeout)


class Job:
    """A submitted job. Cheap to keep: every call reads the store afresh."""

    def __init__(self, client: Client, row: JobRow) -> None:
        self._client = client
        self._store = client.store
        self.id: int = row.id
        self.name: str = row.name
        self.function: str = row.function
        self.total: int = row.total
        self.timeout: float = row.timeout
        self.max_attempts: int = row.max_attempts
        self.created_at: float = row.created_at

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.name!r} {self.function} ×{self.total}>"

    def _row(self) -> JobRow:
        return self._store.get_job(self.id)

    # -- state ---------------------------------------------------------------------------------
    def progress(self) -> JobProgress:
        """Counts of tasks per state, right now."""
        return self._store.progress(self._row())

    @property
    def state(self) -> str:
        return self._row().state

    def finished(self) -> bool:
        """True when no task is pending or running (all done, failed or cancelled)."""
        return _is_finished(self.progress())

    def cancel(self) -> int:
        """Cancel the tasks not finished yet; returns how many were cancelled."""
        return self._store.cancel_job(self._row())

    def retry(self) -> int:
        """Give failed tasks a fresh attempt budget; returns how many go back to pending."""
        return self._store.retry_failed(self._row())

    def delete(self) -> int:
        """Delete the job with its tasks and results; returns how many tasks. JobBusy while
        workers hold some of its tasks (cancel it first)."""
        return self._store.delete_job(self._row())

    def attempts(self, index: int) -> tuple[ResultRow, list[AttemptRow]]:
        """Task ``index`` (input order) and every attempt of it, with errors and tracebacks."""
        return self._store.attempts(self._row(), index)

    def stalled(self) -> str:
        """Why the job makes no progress, when it can be told: no online worker offers its
        function, or the coordinator is not running; "" otherwise."""
        why = self._client.unroutable(self.function)
        alive = self._client.liveness()
        if not alive.running:
            why = "; ".join(filter(None, [why, alive.sentence()]))
        return why

    # -- waiting -------------------------------------------------------------------------------
    def wait(self, timeout: float | None = None, progress: bool = True) -> JobProgress:
        """Block until every task is finished; returns the final counts.

        ``progress=True`` shows a rich progress bar (terminal or notebook). Raises JobTimeout
        after ``timeout`` seconds (the job itself goes on).
        """
        if not progress:
            return self._wait_quietly(timeout)
        from dockercomp.coordinator.render import job_progress_bar  # rich only when asked for

        with job_progress_bar(self.name, self.total) as update:
            return self._wait_quietly(timeout, update)

    def _wait_quietly(
        self, timeout: float | None, update: Callable[[JobProgress], None] | None = None
    ) -> JobProgress:
        clock, sleep = self._client.clock, self._client.sleep
        started = clock()
        watch = _StallWatch(self, clock)
        while True:
            current = self.progress()
            if update is not None:
                update(current)
            if _is_finished(current):
                return current
            watch.check()
            waited = clock() - started
            if timeout is not None and waited >= timeout:
                raise JobTimeout(current, waited, self.stalled())
            sleep(self._client.poll_interval)

    def as_completed(self, timeout: float | None = None) -> Iterator[ResultRow]:
        """Each task's row as soon as it is finished (done, failed or cancelled), in the order
        they finish; ends when all are. Raises JobTimeout after ``timeout`` seconds."""
        clock, sleep = self._client.clock, self._client.sleep
        started = clock()
        seen: set[int] = set()
        watch = _StallWatch(self, clock)
        while True:
            finished = self._finished_count()
            if finished > len(seen):
                fresh = self._finished_ids() - seen
                for row in self._rows(fresh):
                    seen.add(row.task_id)
                    yield row
            if len(seen) >= self.total:
                return
            watch.check()
            waited = clock() - started
            if timeout is not None and waited >= timeout:
                raise JobTimeout(self.progress(), waited, self.stalled())
            sleep(self._client.poll_interval)

    def _finished_count(self) -> int:
        counts = self._store.task_counts(self.id)
        return sum(counts[state] for state in FINISHED_STATES)

    def _finished_ids(self) -> set[int]:
        return self._store.task_ids(self.id, FINISHED_STATES)

    def _rows(self, task_ids: set[int]) -> list[ResultRow]:
        if not task_ids:
            return []
        return [row for row in self._store.results(self._row()) if row.task_id in task_ids]

    # -- results -------------------------------------------------------------------------------
    def results(self) -> list[ResultRow]:
        """Every task in input order: state, value, worker, attempts, elapsed, errors."""
        return list(self._store.results(self._row()))

    def values(self) -> list[Any]:
        """The values in input order; TasksFailed when some task has none (failed,
        cancelled or not finished yet — wait() first)."""
        rows = self.results()
        missing = [row for row in rows if row.state != TaskState.DONE.value]
        if missing:
            raise TasksFailed(self.name, missing)
        return [row.value for row in rows]


class _StallWatch:
    """Asks ``Job.stalled`` now and then while waiting, and warns (JobStalled) the first time it
    says something: a misspelt function would otherwise keep a notebook cell waiting forever."""

    def __init__(self, job: Job, clock: Callable[[], float]) -> None:
        self.job = job
        self.clock = clock
        self.due = clock() + STALL_CHECK_INTERVAL  # workers and `serve` may be starting up just now
        self.warned = False

    def check(self) -> None:
        if self.warned or self.clock() < self.due:
            return
        self.due = self.clock() + STALL_CHECK_INTERVAL
        why = self.job.stalled()
        if why:
            self.warned = True
            warnings.warn(f"job {self.job.name!r} cannot progress: {why}", JobStalled, stacklevel=4)


def _is_finished(progress: JobProgress) -> bool:
    return progress.finished >= progress.total


__all__ = [
    "Client", "Job", "JobStalled", "JobTimeout", "PurgeReport", "TasksFailed", "WorkerInfo", "WorkerState",
    "connect", "default_broker", "default_db",
]  # fmt: skip
