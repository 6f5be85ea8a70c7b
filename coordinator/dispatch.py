"""Dispatch: what work there is (jobs), and the round-robin that hands pending tasks to the
workers with free capacity (who may take work is the registry's: registry.py).

Jobs are mirrored in memory: the engine is the only writer of task states below "pending",
so memory stays exact; changes the CLI makes (submit, cancel, retry) bump a job's
``revision`` and are picked up by ``JobBook.poll``. No SQL here: every read and write goes
through the store interface.

A round's tasks for one worker that announced a batch size go in TaskBatch messages
(``_envelop``), one per worker and round when they fit.

A worker never holds more than ``capacity + prefetch`` open attempts: ``capacity`` tasks
running (its agent's concurrency) and ``prefetch`` queued on the agent, so a slot that frees
up starts the next task at once instead of waiting for a round trip to the coordinator. The
broker's queues stay short and nothing is ever silently dropped for lack of room.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from dockercomp.broker.batches import TASKS_KEY, pack
from dockercomp.coordinator.leases import Lease, Leases, PayloadBuilder, new_nonces
from dockercomp.coordinator.quorum import Quorum
from dockercomp.coordinator.registry import WorkerRegistry, WorkerSlot
from dockercomp.coordinator.replicas import ReplicaDispatch
from dockercomp.coordinator.replication import SINGLE, Replication
from dockercomp.coordinator.room import Room
from dockercomp.coordinator.trust import Trust
from dockercomp.coordinator.store import JobState, NewAttempt, PendingRow, Store, TaskState

log = logging.getLogger(__name__)
_ACTIVE = JobState.ACTIVE.value  # looked up once: an Enum member's value is a slow attribute


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
    replication: Replication = SINGLE
    # Single-replica tasks returned by a failure -> the volunteer that failed them: their retry
    # goes to another volunteer when one has room.
    avoid: dict[int, str] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.state == _ACTIVE

    def move(self, source: str, target: str, n: int = 1) -> None:
        self.counts[source] -= n
        self.counts[target] += n


class JobBook:
    """Every job, refreshed from the store by a cheap poll (the jobs table is small)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.by_id: dict[int, JobInfo] = {}
        self.trust = Trust(store)
        self.quorum = Quorum(self.trust)
        self._active: list[JobInfo] | None = None  # active(), until a job comes, goes or ends

    def get(self, job_id: int) -> JobInfo | None:
        return self.by_id.get(job_id)

    def active(self) -> list[JobInfo]:
        """The active jobs, oldest first. Kept between calls: a step asks five or six times,
        and a coordinator that ran for months holds every job it ever finished (with 1,000 of
        them a call took 0.9 ms, five milliseconds a step). Only ``poll``, ``complete`` and
        ``clear`` change a job's state or the set of jobs, and each drops it."""
        if self._active is None:
            self._active = [job for _, job in sorted(self.by_id.items()) if job.active]
        return self._active

    def clear(self) -> None:
        """Forget every job (the engine reloads them from the store)."""
        self.by_id.clear()
        self._active = None

    def poll(self) -> list[JobInfo]:
        """Pick up new jobs and changes made by the CLI; returns the jobs that changed."""
        changed = []
        self.trust.refresh()
        # Every job's marks, then the rows of those new or changed only: a coordinator that ran
        # for months holds thousands of finished jobs, and this runs twice a second.
        marks = self.store.job_marks()
        for gone in set(self.by_id) - {mark[0] for mark in marks}:
            del self.by_id[gone]  # deleted (`coordinator delete`, or replaced by a new submit)
        stale = []
        for job_id, *mark in marks:
            job = self.by_id.get(job_id)
            if job is None or [job.created_at, job.revision, job.state, job.total] != mark:
                stale.append(job_id)
            else:
                job.drained = False
        for row in self.store.jobs(stale) if stale else ():
            job = self.by_id.get(row.id)
            if job is not None and job.created_at != row.created_at:
                job = None  # another job took a deleted one's id (a database made before ids were kept unique)
            if job is None:
                job = self.by_id[row.id] = JobInfo(row.id, row.name, row.function, row.timeout, row.max_attempts,
                                                   row.state, row.revision, row.total, row.created_at,
                                                   row.finished_at, replication=row.replication)
            job.state, job.revision, job.total, job.finished_at = row.state, row.revision, row.total, row.finished_at
            job.counts = self.store.task_counts(row.id)
            job.avoid.clear()
            if not job.replication.single:
                self.quorum.load_job(self.store, job)
            job.drained = False
            changed.append(job)
        self._active = None  # jobs came, went, or changed state
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
            self.store.finish_job(job.id, now)
            failed = job.counts[TaskState.FAILED.value]  # as the store decides: failed tasks fail the job
            job.state, job.finished_at = (JobState.FAILED if failed else JobState.DONE).value, now
            finished.append(job)
        if finished:
            self._active = None
        return finished


# --------------------------------------------------------------------------- dispatch
# Tasks whose leases are computed before they are opened together (the longest timeout a
# worker holds, which a prefetched task's lease depends on, is updated between chunks).
_OPEN_CHUNK = 500


class Dispatcher:
    """Hands pending tasks round-robin to workers with room: first to idle slots
    (``capacity``), then to the queues the workers asked for (``prefetch``)."""

    def __init__(self, store: Store, payloads: PayloadBuilder, lease_margin: float) -> None:
        self.store = store
        self.payloads = payloads
        self.lease_margin = lease_margin
        self._cursor = 0  # where the next round starts in the worker order: fairness over time
        self.served: set[int] = set()  # workers sent something by the last round (status)
        self.sent = 0  # tasks the last round sent (its messages may carry several: metrics count tasks)
        self.replicas = ReplicaDispatch(self)
        self.room = Room()  # the workers that may have room: a round need not scan the fleet

    def has_work(self, workers: WorkerRegistry, jobs: JobBook, leases: Leases) -> bool:
        """Cheap in-memory check: could a dispatch round send anything?"""
        if all(job.drained for job in jobs.active()):
            return False  # nothing to send: no need to look at the fleet (50,000 workers)
        free = {f for w in _allowed(workers, jobs) if leases.count(w.id) < w.limit for f in w.functions}
        return bool(free) and any(not job.drained and job.function in free for job in jobs.active())

    def dispatch(self, workers: WorkerRegistry, jobs: JobBook, leases: Leases, now: float) -> list[tuple[str, bytes]]:
        """Open attempts for as many pending tasks as workers have room for; returns the
        (topic, payload) messages to publish once the transaction is committed."""
        self.served, self.sent = set(), 0
        if all(job.drained for job in jobs.active()):
            return []  # nothing pending: the free workers (all 50,000 when idle) need no look
        allowed = _allowed(workers, jobs)
        if not allowed:
            return []
        start = self._cursor % len(allowed)
        order = self.room.free(allowed, leases, start, _wanted(jobs))  # rotated to start, less the full ones
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
            if not job.replication.single:
                served, sent = self.replicas.dispatch(job, jobs.quorum, candidates, held, leases, now)
                sends += sent
                last_served = served or last_served
                continue
            rows = self.store.pending_tasks(job.id, wanted)
            if len(rows) < wanted:
                job.drained = True
            if not rows:
                continue
            plan = _round_robin(rows, candidates, held)
            if job.avoid:
                able = {w.ref.volunteer for w in allowed if job.function in w.functions}
                plan = _avoid_repeats(plan, job.avoid, candidates, held, able)
                if not plan:
                    job.drained = True  # until a slot frees up (Ledger._accept) or the next poll
                    continue
            last_served = plan[-1][0]
            sends += self._open(job, plan, leases, now)
        self.room.settle(held)
        if last_served is not None:
            self._cursor = self.room.position(last_served) + 1
        self.sent = len(sends)
        # Looked up among the workers served (not the whole fleet): a round costs per task sent.
        batching = [slot for slot in map(workers.by_id.get, self.served) if slot is not None and slot.batch]
        return _envelop(sends, batching) if batching else sends

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
        sends = []
        for start in range(0, len(plan), _OPEN_CHUNK):
            part = plan[start:start + _OPEN_CHUNK]
            deadlines = [self.deadline(worker, ahead, job.timeout, leases, now) for worker, _, ahead in part]
            nonces = new_nonces(len(part))
            opening: list[NewAttempt] = [(task_id, tried + 1, worker.id, deadline, nonce)
                                         for (worker, (task_id, _, tried, _), _), deadline, nonce
                                         in zip(part, deadlines, nonces)]
            attempt_ids = self.store.open_attempts(opening, now)
            for (worker, (task_id, args, attempts, retries_from), _), deadline, nonce in zip(part, deadlines, nonces):
                payload = self.payloads.build(task_id, job.id, attempts + 1, job.function, args, job.timeout, nonce)
                leases.add(Lease(attempt_ids[task_id], task_id, attempts + 1, job.id, worker.id, now, deadline,
                                 job.timeout, retries_from, payload, nonce))
                sends.append((worker.tasks_topic, payload))
                self.served.add(worker.id)
        job.move(TaskState.PENDING.value, TaskState.ASSIGNED.value, len(plan))
        return sends


def _envelop(sends: list[tuple[str, bytes]], batching: list[WorkerSlot]) -> list[tuple[str, bytes]]:
    """The round's task messages, those of each worker that takes batches (``batching``) joined
    into TaskBatch messages of at most its batch size (broker/batches.py): one message per worker
    and round instead of one per task. The others get their Task messages as they are."""
    batch = {w.tasks_topic: w.batch for w in batching}
    out: list[tuple[str, bytes]] = []
    grouped: dict[str, list[bytes]] = {}
    for topic, payload in sends:
        if topic in batch:
            grouped.setdefault(topic, []).append(payload)
        else:
            out.append((topic, payload))
    for topic, payloads in grouped.items():
        out += [(topic, message) for message in pack(TASKS_KEY, payloads, batch[topic])]
    return out


def _round_robin(rows: list[PendingRow], candidates: list[WorkerSlot],
                 held: dict[int, int]) -> list[tuple[WorkerSlot, PendingRow, int]]:
    """Deal ``rows`` to ``candidates`` in turn: first one task per worker with an idle slot
    until none is left, then into the workers' prefetch queues, each up to its limit.
    Returns (worker, row, tasks the worker held before it); updates ``held``."""
    plan = []
    i = 0
    for tier in ("capacity", "limit"):
        ring = [w for w in candidates if held[w.id] < getattr(w, tier)]
        # Turn by turn, pass after pass; a worker full at this tier drops out of the next pass
        # (deleting it from the ring in place cost O(ring) each: quadratic at 50,000 workers).
        while ring and i < len(rows):
            still = []
            for worker in ring:
                if i >= len(rows):
                    break
                plan.append((worker, rows[i], held[worker.id]))
                held[worker.id] += 1
                i += 1
                if held[worker.id] < getattr(worker, tier):
                    still.append(worker)
            ring = still
    return plan


# Workers a round looks at, at least, when it walks the fleet (room.py) for its pending tasks.
_MIN_WANTED = 64


def _wanted(jobs: JobBook) -> int | None:
    """Most workers a round can give tasks to: its jobs' pending tasks, each worker taking at
    least one. None (every worker with room) when a job is replicated (replicas of assigned
    tasks may be owed) or has retries to move off a volunteer (they look for alternatives)."""
    wanted = 0
    for job in jobs.active():
        if job.drained:
            continue
        if not job.replication.single or job.avoid:
            return None
        wanted += job.counts[TaskState.PENDING.value]
    # A floor: counts refreshed by the last poll may lag the store a little; a round never
    # looks at too few workers to find the tasks' takers.
    return max(wanted, _MIN_WANTED)


def _allowed(workers: WorkerRegistry, jobs: JobBook) -> list[WorkerSlot]:
    """Dispatchable workers, less those of quarantined volunteers."""
    order = workers.dispatchable()
    quarantined = jobs.trust.quarantined
    return [w for w in order if w.ref.volunteer not in quarantined] if quarantined else order


def _avoid_repeats(plan: list[tuple[WorkerSlot, PendingRow, int]], avoid: dict[int, str],
                   candidates: list[WorkerSlot], held: dict[int, int],
                   able: set[str]) -> list[tuple[WorkerSlot, PendingRow, int]]:
    """Move each retried task off the volunteer that just failed it: swap workers with another
    entry of the plan, else take a candidate with room left; else, while another volunteer
    online (``able``: those that run the function) could take it later, the task waits for
    it; only when none is online does it go back to the same volunteer. Returns the plan;
    updates ``held``."""
    off = {row[0]: avoid[row[0]] for _, row, _ in plan if row[0] in avoid}  # task -> volunteer to avoid
    waiting: set[int] = set()
    for i, (worker, row, ahead) in enumerate(plan):
        bad = off.get(row[0])
        if bad is None or worker.ref.volunteer != bad:
            continue
        swap = next((j for j, (other, other_row, _) in enumerate(plan) if j not in waiting
                     and other.ref.volunteer != bad and off.get(other_row[0]) != bad), None)
        spare = next((w for w in candidates if w.ref.volunteer != bad and held[w.id] < w.limit), None)
        if swap is not None:
            other, other_row, other_ahead = plan[swap]
            plan[i], plan[swap] = (other, row, other_ahead), (worker, other_row, ahead)
        elif spare is not None:
            plan[i] = (spare, row, held[spare.id])
            held[spare.id] += 1
            held[worker.id] -= 1
        elif able - {bad}:
            waiting.add(i)  # another volunteer is online, only busy: the task waits for it
            held[worker.id] -= 1
    kept = [entry for i, entry in enumerate(plan) if i not in waiting]
    for _, row, _ in kept:
        avoid.pop(row[0], None)
    return kept
