"""Dispatch of a replicated job: each task's replicas go to distinct volunteers (or, when the
job relaxes it, distinct workers), never again to one that already had the task, a failed
replica included. Tasks missing replicas (a failure, a disagreement, a volunteer that was not
online) are served before new pending tasks. A single-replica job never comes here
(``Dispatcher.dispatch``), so its hot path is unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dockercomp.coordinator.leases import Lease, Leases, new_nonces
from dockercomp.coordinator.quorum import Quorum, Votes
from dockercomp.coordinator.registry import WorkerSlot
from dockercomp.coordinator.store import NewAttempt, TaskState

if TYPE_CHECKING:
    from dockercomp.coordinator.dispatch import Dispatcher, JobInfo


class ReplicaDispatch:
    def __init__(self, dispatcher: "Dispatcher") -> None:
        self.dispatcher = dispatcher

    def dispatch(self, job: "JobInfo", quorum: Quorum, candidates: list[WorkerSlot], held: dict[int, int],
                 leases: Leases, now: float) -> tuple[WorkerSlot | None, list[tuple[str, bytes]]]:
        """Open the replicas the workers in ``candidates`` have room for; returns the last
        worker served and the messages to send. Updates ``held``."""
        ring = candidates
        pos = 0
        distinct_workers = job.replication.distinct == "worker"

        def pick(votes: Votes | None, need: int) -> list[WorkerSlot]:
            nonlocal pos
            picked: list[WorkerSlot] = []
            k = 0
            for k in range(len(ring)):
                w = ring[(pos + k) % len(ring)]
                if held[w.id] >= w.limit or (votes is not None and votes.excludes(w, job.replication)):
                    continue
                if any(p is w or (not distinct_workers and p.ref.volunteer == w.ref.volunteer) for p in picked):
                    continue
                picked.append(w)
                if len(picked) >= need:
                    break
            pos = (pos + k + 1) % len(ring)
            return picked

        plan: list[tuple[Votes, WorkerSlot, int]] = []
        for votes in quorum.want(job.id):
            if not any(held[w.id] < w.limit for w in ring):
                break
            for w in pick(votes, votes.missing()):
                plan.append((votes, w, held[w.id]))
                held[w.id] += 1
        free = sum(w.limit - held[w.id] for w in ring)
        fresh = 0
        if free > 0:
            # Every task takes a slot of `replicas` distinct volunteers while that many have room,
            # then one of each that still has some: at most free / replicas tasks, plus the room
            # of the roomiest one. Asking free / replicas alone left a lone worker with room
            # half filled (its tasks found no partner), and the rest went in another message.
            room: dict[object, int] = {}
            for w in ring:
                group = w.id if distinct_workers else w.ref.volunteer
                room[group] = room.get(group, 0) + w.limit - held[w.id]
            asked = -(-free // job.replication.replicas) + max(room.values())
            rows = self.dispatcher.store.pending_tasks(job.id, asked)
            job.drained = len(rows) < asked
            for task_id, args, tried, retries_from in rows:
                picked = pick(None, job.replication.replicas)
                if not picked:
                    break  # no room left: the task stays pending
                votes = quorum.start(job, task_id, args, tried, retries_from, picked[0])
                fresh += 1
                for w in picked[:votes.target]:
                    plan.append((votes, w, held[w.id]))
                    held[w.id] += 1
        if not plan:
            return None, []
        sends = self._open(job, quorum, plan, leases, now)
        job.move(TaskState.PENDING.value, TaskState.ASSIGNED.value, fresh)
        return plan[-1][1], sends

    def _open(self, job: "JobInfo", quorum: Quorum, plan: list[tuple[Votes, WorkerSlot, int]], leases: Leases,
              now: float) -> list[tuple[str, bytes]]:
        """Open the plan in rounds, a task at most once per round (the store opens one attempt
        per task per call)."""
        rounds: list[list[tuple[Votes, WorkerSlot, int]]] = []
        seen: dict[int, int] = {}
        for item in plan:
            r = seen.get(item[0].task_id, 0)
            seen[item[0].task_id] = r + 1
            if r == len(rounds):
                rounds.append([])
            rounds[r].append(item)
        d = self.dispatcher
        sends = []
        for part in rounds:
            deadlines = [d.deadline(worker, ahead, job.timeout, leases, now) for _, worker, ahead in part]
            nonces = new_nonces(len(part))
            opening: list[NewAttempt] = [(votes.task_id, votes.number + 1, worker.id, deadline, nonce)
                                         for (votes, worker, _), deadline, nonce in zip(part, deadlines, nonces)]
            attempt_ids = d.store.open_attempts(opening, now)
            for (votes, worker, _), deadline, nonce in zip(part, deadlines, nonces):
                number = votes.number + 1
                payload = d.payloads.build(votes.task_id, job.id, number, job.function, votes.args, job.timeout,
                                           nonce)
                lease = Lease(attempt_ids[votes.task_id], votes.task_id, number, job.id, worker.id, now, deadline,
                              job.timeout, votes.retries_from, payload, nonce)
                leases.add(lease)
                quorum.opened(votes, lease, worker)
                sends.append((worker.tasks_topic, payload))
                d.served.add(worker.id)
        return sends
