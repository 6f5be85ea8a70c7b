"""Which dispatchable workers may have room, kept between dispatch rounds.

A round used to count every dispatchable worker's open attempts to find the few with room:
at 50,000 workers that scan, not the tasks, was most of a round's cost (issue 14). This keeps
the set of workers that may have room: filled once per change of the dispatchable list (a
presence, a cap), then grown by the workers whose leases closed since the last round
(``Leases.freed``) and shrunk as workers fill up. A round then costs what its free workers
cost. The set may hold a worker that filled up meanwhile (each round checks again), never
miss one that has room.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dockercomp.coordinator.leases import Leases
    from dockercomp.coordinator.registry import WorkerSlot


# A round walks the fleet for the workers it can use once they are fewer than 1/this of the
# workers that may have room: the walk then meets a free worker every few steps.
_WALK_FACTOR = 4


class Room:
    def __init__(self) -> None:
        self._order: list[WorkerSlot] | None = None
        self._leases: Leases | None = None
        self._position: dict[int, int] = {}
        self._slots: dict[int, WorkerSlot] = {}
        self._ids: set[int] = set()

    def free(self, order: list[WorkerSlot], leases: Leases, start: int, wanted: int | None = None) -> list[WorkerSlot]:
        """The workers of ``order`` with room, in ``order`` rotated to begin at ``start``; with
        ``wanted`` (the round has at most that many tasks to give), only the first ``wanted``
        of them when that is far fewer than the workers that may have room."""
        if order is not self._order or leases is not self._leases:
            self._order, self._leases = order, leases
            self._position = {w.id: i for i, w in enumerate(order)}
            self._slots = {w.id: w for w in order}
            self._ids = set(self._slots)
        else:
            self._ids.update(worker_id for worker_id in leases.freed if worker_id in self._slots)
        leases.freed.clear()
        if wanted is not None and wanted * _WALK_FACTOR < len(self._ids):
            return self._walk(order, leases, start, wanted)
        full = [worker_id for worker_id in self._ids if leases.count(worker_id) >= self._slots[worker_id].limit]
        self._ids.difference_update(full)
        n = len(order)
        ranked = sorted(self._ids, key=lambda worker_id: (self._position[worker_id] - start) % n)
        return [self._slots[worker_id] for worker_id in ranked]

    def _walk(self, order: list[WorkerSlot], leases: Leases, start: int, wanted: int) -> list[WorkerSlot]:
        """The first ``wanted`` workers with room from ``start`` on, in order: most workers
        may have room (a 10,000-task job on 50,000 workers), so a walk meets one within a few
        steps, and the round costs its tasks, not the fleet's size."""
        picked: list[WorkerSlot] = []
        n = len(order)
        ids = self._ids
        for step in range(n):
            worker = order[(start + step) % n]
            if worker.id not in ids:
                continue
            if leases.count(worker.id) >= worker.limit:
                ids.discard(worker.id)
                continue
            picked.append(worker)
            if len(picked) >= wanted:
                break
        return picked

    def settle(self, held: dict[int, int]) -> None:
        """After a round: the workers it filled (``held``: open attempts each now holds) leave."""
        self._ids.difference_update(worker_id for worker_id, count in held.items()
                                    if count >= self._slots[worker_id].limit)

    def position(self, worker: WorkerSlot) -> int:
        """Where ``worker`` stands in the dispatchable order the last ``free`` was given."""
        return self._position[worker.id]
