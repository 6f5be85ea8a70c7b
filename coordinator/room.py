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


class Room:
    def __init__(self) -> None:
        self._order: list[WorkerSlot] | None = None
        self._leases: Leases | None = None
        self._position: dict[int, int] = {}
        self._slots: dict[int, WorkerSlot] = {}
        self._ids: set[int] = set()

    def free(self, order: list[WorkerSlot], leases: Leases, start: int) -> list[WorkerSlot]:
        """The workers of ``order`` with room, in ``order`` rotated to begin at ``start``."""
        if order is not self._order or leases is not self._leases:
            self._order, self._leases = order, leases
            self._position = {w.id: i for i, w in enumerate(order)}
            self._slots = {w.id: w for w in order}
            self._ids = set(self._slots)
        else:
            self._ids.update(worker_id for worker_id in leases.freed if worker_id in self._slots)
        leases.freed.clear()
        full = [worker_id for worker_id in self._ids if leases.count(worker_id) >= self._slots[worker_id].limit]
        self._ids.difference_update(full)
        n = len(order)
        ranked = sorted(self._ids, key=lambda worker_id: (self._position[worker_id] - start) % n)
        return [self._slots[worker_id] for worker_id in ranked]

    def settle(self, held: dict[int, int]) -> None:
        """After a round: the workers it filled (``held``: open attempts each now holds) leave."""
        self._ids.difference_update(worker_id for worker_id, count in held.items()
                                    if count >= self._slots[worker_id].limit)

    def position(self, worker: WorkerSlot) -> int:
        """Where ``worker`` stands in the dispatchable order the last ``free`` was given."""
        return self._position[worker.id]
