"""The attempt ledger: what each answer, death and deadline does to the attempts it concerns.

Every dispatch opens an attempt (a lease, leases.py); the ledger closes it, exactly once:

- **accept** a result of an open attempt from the worker that holds it: the task is done;
- **close-failed** an attempt that ended without a value (the function raised, timed out,
  crashed, was refused): the task goes back to pending, or fails when its attempt budget
  (``max_attempts`` since the last retry) is used up, or at once when the failure is the
  task's own (``Result.deterministic``: bad arguments, a value that cannot be sent back);
- **release** what a worker held when it died, shut down or restarted (closed as lost);
- **expire** an attempt whose lease deadline passed without an answer;
- a **late** result (for an attempt already closed) is still accepted when it is a value
  and the task has none yet (any other attempt of the task is superseded);
- a **forged** result (it does not echo the nonce of an attempt that was sent), a
  **duplicate** (the task already has its value), a **foreign** result (from a worker that
  never held that attempt) and an **unknown** task are **rejected**, counted and logged.

A replicated job's values go to the quorum (quorum.py), which decides the task's canonical
result; its failed replicas are re-issued there too. A single-replica task's retry avoids the
volunteer that just failed it (``JobInfo.avoid``, dispatch.py); trust.py keeps the rates that
quarantine a volunteer.

Pure over the store interface: the writes of one engine step gather in a ``store.Changes``
and ``flush`` hands them to the store in one go, inside the step's transaction. No SQL, no
transport; a clock is passed in as ``now``.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Callable

from dockercomp.broker.messages import Outcome, Result
from dockercomp.broker.topics import WorkerRef
from dockercomp.coordinator.dispatch import JobBook, JobInfo
from dockercomp.coordinator.leases import Lease, Leases, error_json, nonce_matches
from dockercomp.coordinator.registry import WorkerRegistry, WorkerSlot
from dockercomp.coordinator.status import Rejection, Rejections, StatusPublisher
from dockercomp.coordinator.store import (
    FAILED_OUTCOMES,
    AttemptOutcome,
    Changes,
    JobState,
    Store,
    TaskState,
    dump_json,
)

log = logging.getLogger(__name__)

# Task states a late value may still complete (any but done and cancelled).
_OPEN_TO_LATE = (TaskState.PENDING.value, TaskState.ASSIGNED.value, TaskState.FAILED.value)
# The states' values, looked up once (an Enum member's .value is a descriptor call).
_ASSIGNED, _DONE = TaskState.ASSIGNED.value, TaskState.DONE.value
_ACTIVE = JobState.ACTIVE.value


def _what(result: Result) -> str:
    """How a rejection names the result: built only when one is logged."""
    return f"result for task {result.task_id} attempt {result.attempt}"


class Ledger:
    """Opens nothing (dispatch does), closes every attempt. ``finished`` counts the tasks
    finished (done or failed) since the caller last reset it."""

    def __init__(self, store: Store, workers: WorkerRegistry, jobs: JobBook, status: StatusPublisher,
                 rejections: Rejections, leases: Leases | None = None) -> None:
        self.store = store
        self.workers = workers
        self.jobs = jobs
        self.status = status
        self.rejections = rejections
        self.leases = leases if leases is not None else Leases()
        self.changes = Changes()
        self.finished = 0
        self.now = 0.0  # the step's clock, for rules called without one (close_failed)
        self.on_flush: Callable[[Changes], None] | None = None  # metrics.py counts closings here
        # metrics.py: the seconds from each task message sent to the result that closed its
        # attempt, appended here as results are handled (None: nobody asks, nothing is kept).
        self.latencies: list[float] | None = None
        jobs.quorum.ledger = self

    def reset(self, leases: Leases) -> None:
        """Start over from the store's open attempts (after a load or a failed transaction)."""
        self.leases = leases
        self.changes = Changes()

    def flush(self, now: float) -> None:
        """Write what this step decided (inside the caller's transaction)."""
        self.now = now
        if self.on_flush is not None:
            self.on_flush(self.changes)
        self.store.apply(self.changes, now)

    def worker_key(self, worker_id: int) -> str:
        slot = self.workers.by_id.get(worker_id)
        return slot.key if slot is not None else f"worker #{worker_id}"

    # -- rejections ----------------------------------------------------------------------------
    def reject(self, kind: Rejection, ref: WorkerRef, detail: str, level: int = logging.WARNING) -> None:
        """Count and log a message that changes nothing; held against its sender unless stale."""
        self.rejections.reject(kind, ref.key, detail, level)
        slot = self.workers.get(ref.key)
        if slot is not None and kind is not Rejection.STALE:
            slot.rejected += 1
            self.status.worker_changed(slot.id)
        self.status.summary_changed()

    # -- results -------------------------------------------------------------------------------
    def on_result(self, ref: WorkerRef, result: Result, now: float) -> None:
        """A decoded result from ``ref`` (the topic it came on names the sender)."""
        self.now = now
        text = result.task_id
        task_id = int(text) if text.isascii() and text.isdigit() and len(text) < 19 else None
        slot = self.workers.get(ref.key)
        if task_id is None:
            self.reject(Rejection.UNKNOWN, ref, f"{_what(result)}: no such task")
            return
        if slot is None:
            self.reject(Rejection.FOREIGN, ref, f"{_what(result)}: the sender never registered")
            return
        lease = self.leases.get(task_id, result.attempt)
        if lease is None:
            self._late(ref, slot, task_id, result, _what(result), now)
            return
        if not nonce_matches(lease.nonce, result.nonce):
            self.reject(Rejection.FORGED, ref, f"{_what(result)}: it does not carry the nonce of that attempt")
            return
        if lease.worker_id != slot.id:
            self.reject(Rejection.FOREIGN, ref, f"{_what(result)}: that attempt was sent to another worker")
            return
        # From here on the result closes its open attempt, whatever it says.
        if self.latencies is not None:
            self.latencies.append(now - lease.sent_at)
        job = self.jobs.by_id.get(lease.job_id)
        if job is None or job.state != _ACTIVE:  # JobInfo.active, without its Enum look-up
            self.leases.remove(lease)  # cancelled: the answer only frees the worker's slot
            self.changes.close(lease.attempt_id, AttemptOutcome.CANCELLED, None, None)
            self.status.worker_changed(slot.id)
            return
        if result.elapsed > lease.timeout:
            # The worker's word: no task runs past its time limit, and credit is counted from it.
            result = replace(result, elapsed=lease.timeout)
        ok = result.outcome is Outcome.OK
        if ok and job.replication.single:  # the common case first
            self.leases.remove(lease)
            self._accept(lease.attempt_id, task_id, job, _ASSIGNED, slot, result, now)
        elif ok:
            self.leases.remove(lease)
            self.jobs.quorum.on_value(self, job, lease, slot, result, now)
            self.status.worker_changed(slot.id)
            self.status.job_changed(job.id)
        elif result.outcome is Outcome.RELEASED:
            self.hand_back(lease, dump_json(result.error.to_object() if result.error else None))
        else:
            error = result.error.to_object() if result.error else {"type": result.outcome.value, "message": ""}
            self.close_failed(lease, AttemptOutcome(result.outcome.value), dump_json(error),
                              deterministic=result.deterministic)

    def _late(self, ref: WorkerRef, slot: WorkerSlot, task_id: int, result: Result, what: str, now: float) -> None:
        """A result for an attempt that is not open: late, duplicate, foreign or unknown."""
        self.flush(now)  # the look-up must see this step's writes
        record = self.store.find_attempt(task_id, result.attempt)
        if record is None:
            if self.store.task_exists(task_id):
                # Nobody was sent this attempt, so no answer to it can be genuine: a guess.
                self.reject(Rejection.FORGED, ref, f"{what}: that attempt was never sent")
            else:
                self.reject(Rejection.UNKNOWN, ref, f"{what}: no such task")
            return
        if not nonce_matches(record.nonce, result.nonce):
            self.reject(Rejection.FORGED, ref, f"{what}: it does not carry the nonce of that attempt")
            return
        if record.worker_id != slot.id:
            self.reject(Rejection.FOREIGN, ref, f"{what}: that attempt was sent to another worker")
            return
        if record.task_state == TaskState.DONE.value:
            self.reject(Rejection.DUPLICATE, ref, f"{what}: the task already has its result", logging.INFO)
            return
        job = self.jobs.get(record.job_id)
        if job is not None and not job.replication.single:
            # A replica's late value: its slot was re-issued already; counting it too would let
            # one volunteer vote twice.
            self.reject(Rejection.LATE, ref, f"{what}: replica already closed ({record.outcome})", logging.INFO)
            return
        if not (result.ok and job is not None and job.state != JobState.CANCELLED.value
                and record.task_state in _OPEN_TO_LATE):
            self.reject(Rejection.LATE, ref, f"{what}: attempt already closed ({record.outcome}), "
                        f"task {record.task_state}", logging.INFO)
            return
        other = self.leases.of_task(task_id)
        if other is not None:
            # Another attempt is running for this task: it is superseded by this answer.
            self.leases.remove(other)
            self.changes.supersede(other.attempt_id)
            self.status.worker_changed(other.worker_id)
        log.info("accepted late %s from %s (attempt was %s)", what, ref.key, record.outcome)
        if record.outcome in FAILED_OUTCOMES:
            # Closing it counted a failure of this worker; the attempt is now ok, so the
            # counters (in memory and stored) must say so too.
            slot.failed -= 1
            self.changes.worker_failed[slot.id] -= 1
        self._accept(record.attempt_id, task_id, job, record.task_state, slot, result, now)

    def _accept(self, attempt_id: int, task_id: int, job: JobInfo | None, previous: str, slot: WorkerSlot,
                result: Result, now: float) -> None:
        """The task is done with this value (``previous``: the task's state before)."""
        value = result.value
        self.changes.accept(task_id, attempt_id, slot.id, "null" if value is None else dump_json(value),
                            result.elapsed, now)
        slot.done += 1
        status = self.status
        status.worker_changed(slot.id)
        if job is not None:
            self.jobs.trust.accepted(job.id, slot.ref.volunteer)
            if job.avoid:
                job.drained = False  # a slot freed up: a retry waiting for another volunteer may go
            counts = job.counts  # JobInfo.move, inlined: once per result
            counts[previous] -= 1
            counts[_DONE] += 1
            status.job_changed(job.id)
        self.finished += 1

    # -- attempts that end without a value -------------------------------------------------------
    def close_failed(self, lease: Lease, outcome: AttemptOutcome, error: str, deterministic: bool = False) -> None:
        """Close an open attempt that produced no value; the task goes back to pending, or
        fails when its attempts are used up. A ``deterministic`` failure (the task's own
        fault, DETERMINISTIC_ERRORS) fails the task at once and is not held against the worker."""
        self.leases.remove(lease)
        self.changes.close(lease.attempt_id, outcome, error, None if deterministic else lease.worker_id)
        worker = self.workers.by_id.get(lease.worker_id)
        if worker is not None:
            if not deterministic:
                worker.failed += 1
            self.status.worker_changed(worker.id)
        job = self.jobs.get(lease.job_id)
        if job is None or not job.active:
            return  # cancelled meanwhile: the task stays cancelled
        if not job.replication.single:
            # Replicated: one volunteer's word, deterministic or not, never decides a task.
            self.jobs.quorum.on_failure(self, job, lease, outcome, self.now)
            self.status.job_changed(job.id)
            return
        if worker is not None and not deterministic:
            self.jobs.trust.failed(job.id, worker.ref.volunteer, outcome, self.now)
            job.avoid[lease.task_id] = worker.ref.volunteer  # the retry goes elsewhere if it can
        if deterministic or lease.budget_used() >= job.max_attempts:
            self.changes.set_task(lease.task_id, TaskState.FAILED)
            job.move(TaskState.ASSIGNED.value, TaskState.FAILED.value)
            self.finished += 1
        else:
            self.changes.set_task(lease.task_id, TaskState.PENDING)
            job.move(TaskState.ASSIGNED.value, TaskState.PENDING.value)
            job.drained = False
            if worker is not None:
                job.avoid[lease.task_id] = worker.ref.volunteer  # the retry goes elsewhere if it can
        self.status.job_changed(job.id)

    def release(self, slot: WorkerSlot, message: str) -> None:
        """Everything ``slot`` held is lost with it (will, goodbye, restart)."""
        for lease in self.leases.of_worker(slot.id):
            self.close_failed(lease, AttemptOutcome.LOST, error_json("WorkerLost", message))

    def hand_back(self, lease: Lease, error: str | None) -> None:
        """Close an attempt a worker handed back on a clean shutdown (released): the task goes
        back to pending with its attempt budget unchanged, and the worker is not blamed."""
        self.leases.remove(lease)
        self.changes.close(lease.attempt_id, AttemptOutcome.RELEASED, error, None)
        self.status.worker_changed(lease.worker_id)
        job = self.jobs.get(lease.job_id)
        if job is None or not job.active:
            return  # cancelled meanwhile: the task stays cancelled
        if not job.replication.single:
            self.jobs.quorum.on_release(job, lease)  # the replica is opened again, elsewhere
            self.status.job_changed(job.id)
            return
        self.changes.uncharge(lease.task_id)
        self.changes.set_task(lease.task_id, TaskState.PENDING)
        job.move(TaskState.ASSIGNED.value, TaskState.PENDING.value)
        job.drained = False
        self.status.job_changed(job.id)

    def expire(self, now: float) -> set[int]:
        """Close the attempts whose lease deadline has passed; returns the ids of the workers
        that held them (they must show life before they get more work)."""
        self.now = now
        holders: set[int] = set()
        for lease in self.leases.expired(now):
            holders.add(lease.worker_id)
            worker = self.workers.by_id.get(lease.worker_id)
            name = worker.key if worker else f"worker #{lease.worker_id}"
            limit = lease.deadline - lease.sent_at
            log.info("lease of task %d attempt %d on %s expired; returning the task",
                     lease.task_id, lease.number, name)
            self.close_failed(lease, AttemptOutcome.EXPIRED,
                              error_json("LeaseExpired", f"no result from {name} within {limit:g} s"))
        return holders
