"""Dispatch: who may take work (workers, from their presence), what work there is (jobs), and
the round-robin that hands pending tasks to workers with free capacity.

Workers and jobs are mirrored in memory: the engine is the only writer of worker rows and of
task states below "pending", so memory stays exact; changes the CLI makes (submit, cancel,
retry) bump a job's ``revision`` and are picked up by ``JobBook.poll``.

A worker never holds more than ``capacity + prefetch`` open attempts: ``capacity`` tasks
running (its agent's concurrency) and ``prefetch`` queued on the agent, so a slot that frees
up starts the next task at once instead of waiting for a round trip to the coordinator. The
broker's queues stay short and nothing is ever silently dropped for lack of room.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from dockercomp.broker.messages import OfflineReason, Presence, PresenceState
from dockercomp.broker.topics import Topics, WorkerRef
from dockercomp.coordinator.defaults import MAX_PREFETCH
from dockercomp.coordinator.leases import Lease, Leases, PayloadBuilder, chunks, placeholders
from dockercomp.coordinator.store import AttemptOutcome, Job, JobState, Store, TaskState, Worker, WorkerState

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- workers
class PresenceChange(str, Enum):
    NEW = "new"  # first presence ever seen from this worker
    ONLINE = "online"  # online again after being lost, offline or purged (same process)
    RECONNECTED = "reconnected"  # a new connection of the same process, or first seen since we started
    RESTARTED = "restarted"  # a new agent process: whatever the old one held is gone
    LOST = "lost"  # its will: the connection dropped without goodbye
    SHUTDOWN = "shutdown"  # it said goodbye
    STALE = "stale"  # older than what we know (a will arriving after a newer connection)
    UNCHANGED = "unchanged"  # a repeat of what we know (retained presence seen again)


@dataclass(eq=False)
class WorkerSlot:
    """A worker as the engine sees it."""

    id: int
    ref: WorkerRef
    tasks_topic: str
    state: str
    seq: int
    started: float
    capacity: int
    functions: frozenset[str]
    prefetch: int = 0
    host: str = ""
    version: str = ""
    last_seen: float = 0.0
    lost_at: float | None = None
    done: int = 0
    failed: int = 0
    rejected: int = 0
    # Presence seen since this coordinator started: until then a stored "online" is hearsay.
    confirmed: bool = False

    @property
    def key(self) -> str:
        return self.ref.key

    @property
    def limit(self) -> int:
        """Most open attempts it may hold: ``capacity`` running plus ``prefetch`` queued."""
        return self.capacity + self.prefetch


class WorkerPool:
    """Workers known to the store, kept in memory and written through on every presence."""

    def __init__(self, topics: Topics) -> None:
        self.topics = topics
        self.by_key: dict[str, WorkerSlot] = {}
        self.by_id: dict[int, WorkerSlot] = {}
        # dispatchable(), kept between presence changes: sorting 1,000 workers on every
        # engine step was a visible share of the dispatch cost at scale.
        self._dispatchable: list[WorkerSlot] | None = None

    def load(self) -> None:
        self.by_key.clear()
        self.by_id.clear()
        self._dispatchable = None
        for row in Worker.select():
            try:
                ref = WorkerRef(row.volunteer, row.name)
            except ValueError:
                log.warning("ignoring stored worker %r: its name is not valid any more", row.key)
                continue
            self._add(row, ref, confirmed=False)

    def _add(self, row: Worker, ref: WorkerRef, confirmed: bool) -> WorkerSlot:
        slot = WorkerSlot(
            id=row.id, ref=ref, tasks_topic=self.topics.tasks(ref), state=row.state, seq=row.seq,
            started=row.started, capacity=row.capacity, functions=frozenset(json.loads(row.functions or "[]")),
            prefetch=row.prefetch, host=row.host, version=row.version, last_seen=row.last_seen, lost_at=row.lost_at,
            done=row.tasks_done, failed=row.tasks_failed, confirmed=confirmed,
        )
        self.by_key[slot.key] = slot
        self.by_id[slot.id] = slot
        self._dispatchable = None
        return slot

    def get(self, key: str) -> WorkerSlot | None:
        return self.by_key.get(key)

    def __iter__(self):  # noqa: ANN204
        return iter(list(self.by_id.values()))

    def dispatchable(self) -> list[WorkerSlot]:
        """Online workers confirmed since start that take work, in a stable order (do not
        modify the list: it is kept until the next presence change)."""
        if self._dispatchable is None:
            self._dispatchable = [w for _, w in sorted(self.by_id.items())
                                  if w.state == WorkerState.ONLINE.value and w.confirmed and w.capacity > 0
                                  and w.functions]
        return self._dispatchable

    def unconfirm_all(self) -> None:
        """Until its presence is seen again, no worker gets work (after a broker outage)."""
        for worker in self.by_id.values():
            worker.confirmed = False
        self._dispatchable = None

    def apply(self, ref: WorkerRef, presence: Presence, now: float) -> tuple[WorkerSlot, PresenceChange]:
        """Record a presence message; says what it means for the work the worker holds."""
        slot = self.by_key.get(ref.key)
        online = presence.state is PresenceState.ONLINE
        self._dispatchable = None
        if slot is None:
            state = WorkerState.ONLINE if online else WorkerState.LOST
            row = Worker.create(
                key=ref.key, volunteer=ref.volunteer, name=ref.worker, state=state.value, seq=presence.seq,
                first_seen=now, last_seen=now, lost_at=None if online else now, **_details(presence),
            )
            return self._add(row, ref, confirmed=True), PresenceChange.NEW
        if presence.seq < slot.seq:
            return slot, PresenceChange.STALE
        if online:
            if presence.seq == slot.seq and slot.state != WorkerState.ONLINE.value:
                # This connection's will or goodbye was already seen: the online is older news.
                return slot, PresenceChange.STALE
            if slot.started and presence.started and presence.started != slot.started:
                change = PresenceChange.RESTARTED
            elif slot.state != WorkerState.ONLINE.value:
                change = PresenceChange.ONLINE
            elif presence.seq > slot.seq or not slot.confirmed:
                change = PresenceChange.RECONNECTED
            else:
                change = PresenceChange.UNCHANGED
            self._update(slot, presence, WorkerState.ONLINE, now)
            slot.confirmed = True
            return slot, change
        if presence.seq == slot.seq and slot.state != WorkerState.ONLINE.value:
            return slot, PresenceChange.UNCHANGED
        shutdown = presence.reason is OfflineReason.SHUTDOWN
        self._update(slot, presence, WorkerState.OFFLINE if shutdown else WorkerState.LOST, now)
        slot.confirmed = True
        return slot, PresenceChange.SHUTDOWN if shutdown else PresenceChange.LOST

    def _update(self, slot: WorkerSlot, presence: Presence, state: WorkerState, now: float) -> None:
        online = state is WorkerState.ONLINE
        fields = {"state": state.value, "seq": presence.seq, "last_seen": now}
        if online:
            fields.update(_details(presence), lost_at=None, purged_at=None)
            slot.started, slot.capacity = presence.started, presence.capacity
            slot.prefetch = _prefetch(presence)
            slot.functions = frozenset(presence.functions)
            slot.host, slot.version = presence.host, presence.version
            slot.lost_at = None
        elif state is WorkerState.LOST:
            fields["lost_at"] = now
            slot.lost_at = now
        Worker.update(fields).where(Worker.id == slot.id).execute()
        slot.state, slot.seq, slot.last_seen = state.value, presence.seq, now

    def mark_purged(self, worker_id: int) -> WorkerSlot | None:
        slot = self.by_id.get(worker_id)
        if slot is not None:
            slot.state = WorkerState.PURGED.value
            self._dispatchable = None
        return slot


def _details(presence: Presence) -> dict[str, object]:
    return {
        "host": presence.host, "container": presence.container, "image": presence.image,
        "version": presence.version, "cpus": presence.cpus, "capacity": presence.capacity,
        "prefetch": _prefetch(presence), "functions": json.dumps(sorted(presence.functions)),
        "started": presence.started,
    }


def _prefetch(presence: Presence) -> int:
    """What the worker asks to have queued, within MAX_PREFETCH."""
    return min(presence.prefetch, MAX_PREFETCH)


# --------------------------------------------------------------------------- jobs
@dataclass(eq=False)
class JobInfo:
    """A job as the engine sees it, with its tasks counted per state."""

    id: int
    name: str
    function: str
    timeout: float
    max_attempts: int
    state: str
    revision: int
    total: int
    created_at: float
    finished_at: float | None
    counts: dict[str, int] = field(default_factory=lambda: {s.value: 0 for s in TaskState})
    # No pending task left at the last look; reset on every poll and whenever one is returned.
    drained: bool = False

    @property
    def active(self) -> bool:
        return self.state == JobState.ACTIVE.value

    def move(self, source: str, target: str, n: int = 1) -> None:
        self.counts[source] -= n
        self.counts[target] += n


class JobBook:
    """Every job, refreshed from the store by a cheap poll (the jobs table is small)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.by_id: dict[int, JobInfo] = {}

    def get(self, job_id: int) -> JobInfo | None:
        return self.by_id.get(job_id)

    def active(self) -> list[JobInfo]:
        return [job for _, job in sorted(self.by_id.items()) if job.active]

    def poll(self) -> list[JobInfo]:
        """Pick up new jobs and changes made by the CLI; returns the jobs that changed."""
        changed = []
        query = Job.select(Job.id, Job.name, Job.function, Job.timeout, Job.max_attempts, Job.state,
                           Job.revision, Job.total, Job.created_at, Job.finished_at).tuples()
        for job_id, name, function, timeout, max_attempts, state, revision, total, created, finished in query:
            job = self.by_id.get(job_id)
            if job is not None and job.revision == revision and job.state == state and job.total == total:
                job.drained = False
                continue
            if job is None:
                job = self.by_id[job_id] = JobInfo(job_id, name, function, timeout, max_attempts, state,
                                                   revision, total, created, finished)
            job.state, job.revision, job.total, job.finished_at = state, revision, total, finished
            job.counts = self.store.task_counts(job_id)
            job.drained = False
            changed.append(job)
        return changed

    def recount(self, job: JobInfo) -> None:
        job.counts = self.store.task_counts(job.id)

    def complete(self, now: float) -> list[JobInfo]:
        """Mark done the active jobs with nothing pending or assigned; returns them."""
        finished = []
        for job in self.active():
            if job.counts[TaskState.PENDING.value] or job.counts[TaskState.ASSIGNED.value]:
                continue
            # Memory says finished: make sure before closing the job, as a job wrongly marked
            # done would strand its pending tasks.
            self.recount(job)
            if job.counts[TaskState.PENDING.value] or job.counts[TaskState.ASSIGNED.value]:
                log.warning("job %s: task counts drifted; recounted from the store", job.name)
                continue
            Job.update(state=JobState.DONE.value, finished_at=now).where(
                (Job.id == job.id) & (Job.state == JobState.ACTIVE.value)).execute()
            job.state, job.finished_at = JobState.DONE.value, now
            finished.append(job)
        return finished


# --------------------------------------------------------------------------- dispatch
PendingRow = tuple[int, str, int, int]  # task id, args JSON, attempts so far, retries_from


class Dispatcher:
    """Hands pending tasks round-robin to workers with room: first to idle slots
    (``capacity``), then to the queues the workers asked for (``prefetch``)."""

    def __init__(self, store: Store, payloads: PayloadBuilder, lease_margin: float) -> None:
        self.store = store
        self.payloads = payloads
        self.lease_margin = lease_margin
        self._cursor = 0  # where the next round starts in the worker order: fairness over time
        self.served: set[int] = set()  # workers sent something by the last round (status)

    def has_work(self, workers: WorkerPool, jobs: JobBook, leases: Leases) -> bool:
        """Cheap in-memory check: could a dispatch round send anything?"""
        free = {f for w in workers.dispatchable() if leases.count(w.id) < w.limit for f in w.functions}
        return bool(free) and any(not job.drained and job.function in free for job in jobs.active())

    def dispatch(self, workers: WorkerPool, jobs: JobBook, leases: Leases, now: float) -> list[tuple[str, bytes]]:
        """Open attempts for as many pending tasks as workers have room for; returns the
        (topic, payload) messages to publish once the transaction is committed."""
        self.served = set()
        order = workers.dispatchable()
        if not order:
            return []
        start = self._cursor % len(order)
        order = order[start:] + order[:start]
        held = {w.id: leases.count(w.id) for w in order}
        sends: list[tuple[str, bytes]] = []
        last_served = None
        for job in jobs.active():
            if job.drained:
                continue
            candidates = [w for w in order if held[w.id] < w.limit and job.function in w.functions]
            wanted = sum(w.limit - held[w.id] for w in candidates)
            if not wanted:
                continue
            rows = self._pending(job, wanted)
            if len(rows) < wanted:
                job.drained = True
            if not rows:
                continue
            plan = _round_robin(rows, candidates, held)
            last_served = plan[-1][0]
            sends += self._open(job, plan, leases, now)
        if last_served is not None:
            self._cursor = start + order.index(last_served) + 1
        return sends

    def _pending(self, job: JobInfo, limit: int) -> list[PendingRow]:
        p = self.store.db.param
        sql = (f"SELECT id, args, attempts, retries_from FROM task WHERE job_id = {p} AND state = {p} "
               f"ORDER BY id LIMIT {p}")
        if self.store.is_postgres:
            sql += " FOR UPDATE"  # a concurrent `cancel` waits for this transaction
        return list(self.store.db.execute_sql(sql, (job.id, TaskState.PENDING.value, limit)).fetchall())

    def deadline(self, worker: WorkerSlot, ahead: int, timeout: float, leases: Leases, now: float) -> float:
        """When the lease of a task sent now ends, ``ahead`` tasks being held by the worker
        before it.

        The agent runs ``capacity`` tasks at a time from a FIFO queue. A task that finds a
        free slot (ahead < capacity) starts at once: timeout + margin, as always. A prefetched
        one first waits for the tasks ahead of it; at worst each ``capacity`` of them runs
        for the longest timeout among them, so it starts within ``waves - 1`` such spans,
        waves = ceil((ahead + 1) / capacity), and the lease allows for exactly that."""
        waits = -(-(ahead + 1) // worker.capacity) - 1
        if waits <= 0:
            return now + timeout + self.lease_margin
        longest = max(timeout, leases.longest_timeout(worker.id))
        return now + timeout + waits * longest + self.lease_margin

    def _open(self, job: JobInfo, plan: list[tuple[WorkerSlot, PendingRow, int]], leases: Leases,
              now: float) -> list[tuple[str, bytes]]:
        db, p = self.store.db, self.store.db.param
        sends = []
        for part in chunks(plan, 500):
            deadlines = [self.deadline(worker, ahead, job.timeout, leases, now) for worker, _, ahead in part]
            values: list[Any] = []
            for (worker, (task_id, _args, attempts, _base), _), deadline in zip(part, deadlines):
                values += (task_id, attempts + 1, worker.id, now, deadline, AttemptOutcome.OPEN.value)
            row = f"({p}, {p}, {p}, {p}, {p}, {p})"
            inserted = db.execute_sql(
                "INSERT INTO attempt (task_id, number, worker_id, sent_at, deadline, outcome) "
                f"VALUES {', '.join([row] * len(part))} RETURNING id, task_id", values).fetchall()
            attempt_ids = {task_id: attempt_id for attempt_id, task_id in inserted}
            task_ids = [row_[0] for _, row_, _ in part]
            db.execute_sql(f"UPDATE task SET state = {p}, attempts = attempts + 1, updated_at = {p} "
                           f"WHERE id IN ({placeholders(p, task_ids)})", [TaskState.ASSIGNED.value, now, *task_ids])
            for (worker, (task_id, args, attempts, retries_from), _), deadline in zip(part, deadlines):
                payload = self.payloads.build(task_id, job.id, attempts + 1, job.function, args, job.timeout)
                leases.add(Lease(attempt_ids[task_id], task_id, attempts + 1, job.id, worker.id, now, deadline,
                                 job.timeout, retries_from, payload))
                sends.append((worker.tasks_topic, payload))
                self.served.add(worker.id)
        job.move(TaskState.PENDING.value, TaskState.ASSIGNED.value, len(plan))
        return sends


def _round_robin(rows: list[PendingRow], candidates: list[WorkerSlot],
                 held: dict[int, int]) -> list[tuple[WorkerSlot, PendingRow, int]]:
    """Deal ``rows`` to ``candidates`` in turn: first one task per worker with an idle slot
    until none is left, then into the workers' prefetch queues, each up to its limit.
    Returns (worker, row, tasks the worker held before it); updates ``held``."""
    plan = []
    i = 0
    for tier in ("capacity", "limit"):
        ring = [w for w in candidates if held[w.id] < getattr(w, tier)]
        turn = 0
        while ring and i < len(rows):
            turn %= len(ring)
            worker = ring[turn]
            plan.append((worker, rows[i], held[worker.id]))
            held[worker.id] += 1
            i += 1
            if held[worker.id] >= getattr(worker, tier):
                del ring[turn]  # full at this tier: the next worker moves into its turn
            else:
                turn += 1
    return plan
