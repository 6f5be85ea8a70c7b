"""Keeping a big fleet's long-lived objects out of CPython's cyclic garbage collector.

Every registered worker keeps objects alive for as long as it stays (its slot, its refs,
its presence fields, its place in the indexes): 50,000 workers are a few million of them.
Each collection of the oldest generation walks them all again, and the engine allocates
enough per task (leases, messages, rows) to trigger collections often: the same 10,000-task
job cost 0.090 ms of engine CPU per task on 50,000 workers against 0.059 on 1,000, and the
same with the collector off (bench/engine_cpu.py --per-volunteer).

``gc.freeze()`` moves every object tracked now into the permanent generation, which
collections skip; reference counting still frees them when they are dropped (a purged
worker's slot goes as before). It is done when the fleet has grown by a share since the last
time, so a fleet freezes a handful of times while it registers (about 18 times up to 50,000).
A young collection first, so the garbage of the moment is not frozen with the fleet.

Frozen objects no longer count in the collector's own guard either: CPython collects the
oldest generation at every tenth collection of the middle one, but only once the objects
promoted since the last time reach a quarter of the long-lived ones. With the fleet frozen, the
long-lived ones left are the tasks in flight (50,000 workers hold 50,000, each with paho's
message, its info and a Condition, a dozen objects), promoted as fast as they are made: nearly
every tenth collection was a full one, each walking all of them (24 full collections, 2.9 s, in
the bench's 110,000 tasks on 50,000 workers; 15 on 1,000 took 0.02 s). So while frozen, the oldest generation
is collected at every ``HEAP_FULL_COLLECTION_EVERY``-th one instead (2 full collections in that
run), and thawing gives the collector its thresholds back.

A frozen object that later becomes part of an unreachable cycle is not collected while frozen:
the engine's state does hold cycles (the coordinator's own object graph, ~14,000 objects at
2,000 workers, found unreachable only after a thaw once it was dropped). So when that state
is rebuilt (a reload after a failed transaction) or the fleet shrinks by the same share
(purges), ``thaw`` unfreezes, collects everything once, and the next check freezes the heap
as it is then.
"""

from __future__ import annotations

import gc
import logging

from dockercomp.coordinator import defaults

log = logging.getLogger(__name__)


class HeapFreezer:
    """Calls ``gc.freeze()`` when the count of registered workers reaches the next mark."""

    def __init__(self, floor: int = defaults.HEAP_FREEZE_WORKERS,
                 growth: float = defaults.HEAP_FREEZE_GROWTH,
                 full_every: int = defaults.HEAP_FULL_COLLECTION_EVERY) -> None:
        self.floor = floor
        self.growth = growth
        self.full_every = full_every
        self._thresholds: tuple[int, ...] | None = None  # the collector's own, while they are raised
        self.frozen_at = 0  # workers at the last freeze (0: not frozen)
        self.freezes = 0

    @property
    def next_mark(self) -> int:
        """Workers at which the next check freezes: the floor, or the growth share past the
        last freeze."""
        if not self.frozen_at:
            return self.floor
        return max(self.frozen_at + 1, int(self.frozen_at * (1 + self.growth)))

    def check(self, workers: int) -> bool:
        """Freeze if ``workers`` reached the mark (thaw first if the fleet shrank by the
        growth share since the last freeze); returns whether it froze."""
        if self.frozen_at and workers * (1 + self.growth) < self.frozen_at:
            self.thaw()
        if workers < self.next_mark:
            return False
        gc.collect(1)  # the young generations' garbage is not frozen along
        gc.freeze()
        if self._thresholds is None:
            self._thresholds = gc.get_threshold()
            young, middle, oldest = self._thresholds
            gc.set_threshold(young, middle, max(oldest, self.full_every))
        self.freezes += 1
        self.frozen_at = workers
        log.debug("heap frozen at %d workers (%d objects); next at %d", workers, gc.get_freeze_count(),
                  self.next_mark)
        return True

    def thaw(self) -> None:
        """Give everything frozen back to the collector and collect once (the cycles dropped
        since are freed); the next check at or above the floor freezes again."""
        if not self.frozen_at:
            return
        gc.unfreeze()
        if self._thresholds is not None:
            gc.set_threshold(*self._thresholds)
            self._thresholds = None
        gc.collect()
        self.frozen_at = 0
