"""Replication and quorum: the replicas of each unfinished task of a replicated job, and the
decision once their values come in.

A replicated task is "assigned" from its first dispatch until it is decided. ``Votes`` holds
what memory needs: the replicas open, the values received, which volunteers (or workers)
already had it. Rules, per value received:

- ``quorum`` values agree (canonical-JSON equality, or the job's validator): the first of
  them is the task's canonical result; the agreeing replicas are validated (credit), the
  others marked invalid, the open ones superseded;
- adaptive job: a trusted volunteer's lone value is accepted (unless the task was picked for
  a spot check, which is replicated like any other);
- no quorum possible with the replicas planned: one more, up to ``max_replicas``; past that
  the task fails with every value seen and who sent it (``ResultRow.replicas``);
- a validator that raises fails the task with its message (the engine goes on).

A replica that fails (error, timeout, lost, ...) is issued again to another volunteer, until
``max_attempts`` replicas of the task failed. Votes are rebuilt from the store on start.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dockercomp.broker.messages import Result
from dockercomp.coordinator import defaults
from dockercomp.coordinator.leases import Lease, error_json
from dockercomp.coordinator.registry import WorkerSlot
from dockercomp.coordinator.replication import Replication, Validator, canonical, load_validator
from dockercomp.coordinator.store import AttemptOutcome, Store, TaskState, dump_json
from dockercomp.coordinator.trust import Trust

if TYPE_CHECKING:
    from dockercomp.coordinator.dispatch import JobInfo
    from dockercomp.coordinator.ledger import Ledger

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Vote:
    attempt_id: int
    number: int
    worker_id: int
    volunteer: str
    value: Any
    value_json: str
    elapsed: float
    key: str | None = None  # canonical(value), once: every later vote of the task compares with it

    def canonical(self) -> str:
        if self.key is None:
            # A value without objects has no key order: its stored text is already canonical.
            plain = self.value is None or type(self.value) in _PLAIN or (
                type(self.value) is list and all(type(v) in _PLAIN for v in self.value))
            self.key = self.value_json if plain else canonical(self.value)
        return self.key


# Types whose compact JSON (store.dump_json) is canonical JSON (replication.canonical): no keys to sort.
_PLAIN = frozenset({int, float, str, bool})


@dataclass(eq=False)
class Votes:
    """One replicated task being decided."""

    task_id: int
    job_id: int
    args: str
    retries_from: int
    number: int = 0  # attempts made so far (the next one is number + 1)
    target: int = 1  # replicas wanted
    open: dict[int, Lease] = field(default_factory=dict)  # attempt id -> lease
    votes: list[Vote] = field(default_factory=list)
    failures: int = 0
    volunteers: set[str] = field(default_factory=set)  # had a replica: get no other
    disputed: set[str] = field(default_factory=set)  # volunteers whose value here is in a dispute (Trust)
    workers: set[int] = field(default_factory=set)

    def missing(self) -> int:
        """Replicas to send now."""
        return max(0, self.target - len(self.votes) - len(self.open))

    def excludes(self, worker: WorkerSlot, replication: Replication) -> bool:
        if replication.distinct == "worker":
            return worker.id in self.workers
        return worker.ref.volunteer in self.volunteers


class Quorum:
    """Votes of every unfinished replicated task, and the rules above."""

    def __init__(self, trust: Trust, rng: random.Random | None = None) -> None:
        self.trust = trust
        self.rng = rng or random.Random()
        self.tasks: dict[int, Votes] = {}
        self.wanting: dict[int, dict[int, Votes]] = {}  # job -> tasks missing replicas, oldest first
        self._validators: dict[str, Validator] = {}
        self.ledger: "Ledger | None" = None  # set by the ledger: leases and worker slots

    # -- memory -------------------------------------------------------------------------------
    def load_job(self, store: Store, job: "JobInfo") -> None:
        """(Re)build the votes of a job's assigned tasks from the store, with the leases of
        their open replicas."""
        slots = self.ledger.workers.by_id if self.ledger is not None else {}
        for task_id in [t for t, v in self.tasks.items() if v.job_id == job.id]:
            self._settle(self.tasks.pop(task_id))
        self.wanting.pop(job.id, None)
        if job.replication.single or not job.active:
            return
        for row in store.replica_attempts(job.id):
            votes = self.tasks.get(row.task_id)
            if votes is None:
                votes = self.tasks[row.task_id] = Votes(row.task_id, job.id, row.args, row.retries_from,
                                                        target=job.replication.replicas)
            votes.number = max(votes.number, row.number)
            if row.number <= row.retries_from:
                continue  # before the last `retry`: another round
            votes.workers.add(row.worker_id)
            slot = slots.get(row.worker_id)
            if slot is not None:
                votes.volunteers.add(slot.ref.volunteer)
            if row.outcome == AttemptOutcome.UNVALIDATED.value and row.value is not None:
                volunteer = slot.ref.volunteer if slot is not None else ""
                votes.votes.append(Vote(row.attempt_id, row.number, row.worker_id, volunteer, json.loads(row.value),
                                        row.value, row.elapsed or 0.0))
            elif row.outcome == AttemptOutcome.OPEN.value:
                lease = self.ledger.leases.get(row.task_id, row.number) if self.ledger is not None else None
                if lease is not None:
                    votes.open[lease.attempt_id] = lease
            else:
                votes.failures += 1
        for votes in self.tasks.values():
            if votes.job_id == job.id:
                votes.target = max(votes.target, len(votes.votes) + 1) if votes.votes else votes.target
                votes.target = min(votes.target, job.replication.max_replicas)
                self._recheck(votes)

    def _recheck(self, votes: Votes | None) -> None:
        if votes is not None and votes.missing():
            self.wanting.setdefault(votes.job_id, {})[votes.task_id] = votes

    def start(self, job: "JobInfo", task_id: int, args: str, tried: int, retries_from: int,
              first: WorkerSlot) -> Votes:
        """A pending task's first dispatch; adaptive: a trusted first volunteer's replica may go
        alone (bar the spot-check share)."""
        replication = job.replication
        target = replication.replicas
        if (replication.adaptive and self.trust.trusted(first.ref.volunteer)
                and self.rng.random() >= defaults.SPOT_CHECK):
            target = 1
        votes = self.tasks[task_id] = Votes(task_id, job.id, args, retries_from, tried, target)
        return votes

    def opened(self, votes: Votes, lease: Lease, worker: WorkerSlot) -> None:
        votes.number = lease.number
        votes.open[lease.attempt_id] = lease
        votes.volunteers.add(worker.ref.volunteer)
        votes.workers.add(worker.id)
        if votes.missing():
            self.wanting.setdefault(votes.job_id, {})[votes.task_id] = votes
        elif votes.job_id in self.wanting:
            self.wanting[votes.job_id].pop(votes.task_id, None)

    def want(self, job_id: int) -> list[Votes]:
        return list(self.wanting.get(job_id, {}).values())

    def _settle(self, votes: Votes) -> None:
        for volunteer in votes.disputed:
            self.trust.settle(volunteer)
        votes.disputed.clear()

    def _done(self, votes: Votes, ledger: "Ledger") -> None:
        self._settle(votes)
        self.tasks.pop(votes.task_id, None)
        wanting = self.wanting.get(votes.job_id)
        if wanting is not None:
            wanting.pop(votes.task_id, None)
        for lease in votes.open.values():
            ledger.leases.remove(lease)
            ledger.changes.supersede(lease.attempt_id)
            ledger.status.worker_changed(lease.worker_id)
        votes.open.clear()

    # -- values and failures --------------------------------------------------------------------
    def on_value(self, ledger: "Ledger", job: "JobInfo", lease: Lease, slot: WorkerSlot, result: Result,
                 now: float) -> None:
        votes = self.tasks.get(lease.task_id)
        value_json = dump_json(result.value)
        if votes is None:  # not in memory (cannot happen unless the state was lost): keep the value
            log.warning("replica %d of task %d has no votes in memory; value kept unvalidated",
                        lease.number, lease.task_id)
            ledger.changes.reported.append((lease.attempt_id, value_json, result.elapsed, None))
            return
        votes.open.pop(lease.attempt_id, None)
        vote = Vote(lease.attempt_id, lease.number, slot.id, slot.ref.volunteer, result.value, value_json,
                    result.elapsed)
        votes.votes.append(vote)
        ledger.changes.reported.append((lease.attempt_id, value_json, result.elapsed, None))
        replication = job.replication
        try:
            groups = self._groups(replication, votes.votes)
        except Exception as exc:  # noqa: BLE001 - the scientist's validator: its failure fails the task
            message = f"validator {replication.validator} raised {type(exc).__name__}: {exc}"
            log.warning("task %d: %s", votes.task_id, message)
            self._fail(ledger, job, votes, "ValidatorError", message)
            return
        best = max(groups, key=len)
        if len(groups) > 1:
            for v in votes.votes:
                if v.volunteer not in votes.disputed:
                    votes.disputed.add(v.volunteer)
                    self.trust.dispute(v.volunteer)
        if len(best) >= replication.quorum:
            self._accept(ledger, job, votes, best, now)
            return
        if votes.target == 1 and len(votes.votes) == 1:
            if replication.adaptive and self.trust.trusted(vote.volunteer):
                self._accept_alone(ledger, job, votes, vote, now)
                return
            votes.target = replication.replicas  # no longer trusted: replicate after all
        remaining = votes.target - len(votes.votes)
        if len(best) + remaining < replication.quorum:
            votes.target = min(replication.max_replicas, len(votes.votes) + replication.quorum - len(best))
            if len(best) + votes.target - len(votes.votes) < replication.quorum:
                seen = "; ".join(f"{ledger.worker_key(v.worker_id)}: {v.value_json[:60]}" for v in votes.votes)
                self._fail(ledger, job, votes, "NoQuorum",
                           f"no {replication.quorum} of {len(votes.votes)} values agreed ({seen})")
                return
        self._recheck(votes)
        job.drained = False

    def on_failure(self, ledger: "Ledger", job: "JobInfo", lease: Lease, outcome: AttemptOutcome, now: float) -> None:
        votes = self.tasks.get(lease.task_id)
        if votes is None:
            return
        votes.open.pop(lease.attempt_id, None)
        votes.failures += 1
        slot = ledger.workers.by_id.get(lease.worker_id)
        if slot is not None:
            self.trust.failed(job.id, slot.ref.volunteer, outcome, now)
        if votes.failures >= job.max_attempts:
            self._done(votes, ledger)
            ledger.changes.set_task(votes.task_id, TaskState.FAILED)
            job.move(TaskState.ASSIGNED.value, TaskState.FAILED.value)
            ledger.finished += 1
            return
        self._recheck(votes)
        job.drained = False

    def on_release(self, job: "JobInfo", lease: Lease) -> None:
        """A replica handed back on a clean shutdown: it is owed again, and no failure counts."""
        votes = self.tasks.get(lease.task_id)
        if votes is None:
            return
        votes.open.pop(lease.attempt_id, None)
        self._recheck(votes)
        job.drained = False

    # -- decisions ------------------------------------------------------------------------------
    def _groups(self, replication: Replication, votes: list[Vote]) -> list[list[Vote]]:
        """Votes in groups that agree; a group's first vote is its representative."""
        if replication.validator is None:
            by_key: dict[str, list[Vote]] = {}
            for vote in votes:
                by_key.setdefault(vote.canonical(), []).append(vote)
            return list(by_key.values())
        validator = self._validators.get(replication.validator)
        if validator is None:
            validator = self._validators[replication.validator] = load_validator(replication.validator)
        groups: list[list[Vote]] = []
        for vote in votes:
            for group in groups:
                if validator(group[0].value, vote.value):
                    group.append(vote)
                    break
            else:
                groups.append([vote])
        return groups

    def _accept(self, ledger: "Ledger", job: "JobInfo", votes: Votes, best: list[Vote], now: float) -> None:
        first = best[0]
        changes = ledger.changes
        changes.accept(votes.task_id, first.attempt_id, first.worker_id, first.value_json, first.elapsed, now)
        agreeing = {id(v) for v in best}
        for vote in votes.votes:
            slot = ledger.workers.by_id.get(vote.worker_id)
            if id(vote) in agreeing:
                if vote is not first:
                    changes.ok_attempts.append(vote.attempt_id)
                    changes.worker_done[vote.worker_id] += 1
                self.trust.validated(job.id, vote.volunteer, vote.elapsed)
                if slot is not None:
                    slot.done += 1
            else:
                changes.invalid_attempts.append(vote.attempt_id)
                self.trust.invalid(job.id, vote.volunteer, now)
            ledger.status.worker_changed(vote.worker_id)
        self._finish(ledger, job, votes)

    def _accept_alone(self, ledger: "Ledger", job: "JobInfo", votes: Votes, vote: Vote, now: float) -> None:
        ledger.changes.accept(votes.task_id, vote.attempt_id, vote.worker_id, vote.value_json, vote.elapsed, now)
        self.trust.accepted_alone(vote.volunteer, vote.elapsed)
        slot = ledger.workers.by_id.get(vote.worker_id)
        if slot is not None:
            slot.done += 1
        self._finish(ledger, job, votes)

    def _finish(self, ledger: "Ledger", job: "JobInfo", votes: Votes) -> None:
        self._done(votes, ledger)
        job.move(TaskState.ASSIGNED.value, TaskState.DONE.value)
        ledger.finished += 1

    def _fail(self, ledger: "Ledger", job: "JobInfo", votes: Votes, kind: str, message: str) -> None:
        attempt_id, value, elapsed, _ = ledger.changes.reported[-1]
        ledger.changes.reported[-1] = (attempt_id, value, elapsed, error_json(kind, message))
        self._done(votes, ledger)
        ledger.changes.set_task(votes.task_id, TaskState.FAILED)
        job.move(TaskState.ASSIGNED.value, TaskState.FAILED.value)
        ledger.finished += 1
