"""bench/engine_cpu.py, the engine-alone measurement, at a tiny size: the real engine on a SQLite
file finishes every task it is fed, with and without the /metrics hooks (no broker, no sockets)."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from bench.engine_cpu import measure


@pytest.mark.parametrize("metrics", [False, True])
def test_the_engine_alone_finishes_every_task(tmp_path: Path, metrics: bool) -> None:
    figures = measure(300, workers=3, in_flight=4, chunk=7, metrics=metrics, profile=False, workdir=tmp_path,
                      vary=True)
    assert figures["done"] == 300 and figures["cpu_ms_per_task"] > 0


def test_a_fleet_of_volunteers_with_batches_and_replicas_finishes_every_result(tmp_path: Path) -> None:
    # 600 workers of 20 volunteers (registration stepped through first), TaskBatch messages,
    # two replicas per task: 300 results are 150 tasks, each decided by two volunteers.
    try:
        figures = measure(300, workers=600, in_flight=1, chunk=9, metrics=False, profile=False, workdir=tmp_path,
                          per_volunteer=30, replicas=2, batch=100)
    finally:
        gc.unfreeze()  # 600 workers froze the heap (coordinator/heap.py): not the test session's
    assert (figures["done"], figures["replicas"]) == (150, 2)
    assert 0 < figures["task_messages"] <= 300  # each worker's tasks of a round in one message
