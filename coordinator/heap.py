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
A young collection first, so the garbage of the moment is not frozen with the fleet; what a
frozen object later forms into an unreachable cycle is never collected, which the engine's
own data does not do (it holds no cycles that it drops).
"""

from __future__ import annotations

import gc
import logging

from dockercomp.coordinator import defaults

log = logging.getLogger(__name__)


class HeapFreezer:
    """Calls ``gc.freeze()`` when the count of registered workers reaches the next mark."""

    def __init__(self, floor: int = defaults.HEAP_FREEZE_WORKERS,
                 growth: float = defaults.HEAP_FREEZE_GROWTH) -> None:
        self.growth = growth
        self.next_mark = floor
        self.freezes = 0

    def check(self, workers: int) -> bool:
        """Freeze if ``workers`` reached the mark; returns whether it did."""
        if workers < self.next_mark:
            return False
        gc.collect(1)  # the young generations' garbage is not frozen along
        gc.freeze()
        self.freezes += 1
        self.next_mark = max(workers + 1, int(workers * (1 + self.growth)))
        log.debug("heap frozen at %d workers (%d objects); next at %d", workers, gc.get_freeze_count(),
                  self.next_mark)
        return True
