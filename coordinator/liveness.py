"""Which workers' heartbeats stopped (agent/liveness.py sends them): they are lost, will or no will.

A worker that announces ``heartbeat`` H in its presence re-publishes that presence, not
retained, every H seconds. Silent for longer than ``bound(H) = misses x H + slack`` (3 x H +
5 s by default), it is marked lost by the engine and its work returned at once (service.py,
as for an unanswered rebirth request); its next beat or presence brings it back. A worker
that announces no heartbeat (an older agent, a simulated one) is never watched here: its
will, goodbye and rebirth answers say it all, as before.

Cost at the coordinator: a beat is byte for byte the last live presence, so it is recognised
by one dictionary lookup and one comparison, without decoding it or writing to the store
(``beat``); the deadlines are a dictionary scanned at most once a ``check`` interval.
"""

from __future__ import annotations

from dockercomp.broker.messages import Presence
from dockercomp.coordinator import defaults
from dockercomp.coordinator.registry import _ALIVE, WorkerRegistry, WorkerSlot


class Liveness:
    """Deadlines of the workers that beat, and the presence each last confirmed."""

    def __init__(self, misses: float = defaults.HEARTBEAT_MISSES, slack: float = defaults.HEARTBEAT_SLACK,
                 check: float = defaults.HEARTBEAT_CHECK) -> None:
        self.misses = misses
        self.slack = slack
        self.check = check
        # worker id -> (deadline, its bound): silent past the deadline means lost.
        self._deadlines: dict[int, tuple[float, float]] = {}
        self._last: dict[int, bytes] = {}  # worker id -> the live presence payload last applied
        self._next_check = float("-inf")

    def bound(self, interval: float) -> float:
        """Seconds of silence after which a worker beating every ``interval`` s is lost."""
        return self.misses * interval + self.slack

    def beat(self, slot: WorkerSlot | None, payload: bytes, now: float) -> bool:
        """True for a beat of a confirmed worker that holds work and repeats the presence last
        applied: its deadline moves on, and nothing else follows (no decoding, no write)."""
        if slot is None or not slot.confirmed or slot.state not in _ALIVE or self._last.get(slot.id) != payload:
            return False
        entry = self._deadlines.get(slot.id)
        if entry is None:
            return False
        self._deadlines[slot.id] = (now + entry[1], entry[1])
        slot.last_seen = now  # in memory only: written with its next change (lost: when it was last heard)
        return True

    def applied(self, slot: WorkerSlot, presence: Presence, payload: bytes, now: float) -> None:
        """A live presence was applied: watch the worker if it beats and still holds work."""
        if presence.heartbeat > 0 and slot.state in _ALIVE:
            bound = self.bound(presence.heartbeat)
            self._deadlines[slot.id] = (now + bound, bound)
            self._last[slot.id] = payload
        else:
            self.forget(slot.id)

    def forget(self, worker_id: int) -> None:
        self._deadlines.pop(worker_id, None)
        self._last.pop(worker_id, None)

    def postpone(self, now: float) -> None:
        """Nobody could reach us (the coordinator was cut off): every worker gets a full bound
        from now, its beats not counted as missed."""
        self._deadlines = {worker_id: (max(deadline, now + bound), bound)
                           for worker_id, (deadline, bound) in self._deadlines.items()}

    def silent(self, workers: WorkerRegistry, now: float) -> list[tuple[WorkerSlot, float]]:
        """Workers past their deadline that still hold work, each with its bound (taken off
        the watch: the caller marks them lost). Scans at most once a ``check`` interval."""
        if now < self._next_check:
            return []
        self._next_check = now + self.check
        overdue = [(worker_id, bound) for worker_id, (deadline, bound) in self._deadlines.items() if deadline <= now]
        silent = []
        for worker_id, bound in overdue:
            self.forget(worker_id)
            slot = workers.by_id.get(worker_id)
            if slot is not None and slot.state in _ALIVE:
                silent.append((slot, bound))
        return silent

    def __len__(self) -> int:
        return len(self._deadlines)
