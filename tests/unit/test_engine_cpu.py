"""bench/engine_cpu.py, the engine-alone measurement, at a tiny size: the real engine on a SQLite
file finishes every task it is fed, with and without the /metrics hooks (no broker, no sockets)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.engine_cpu import measure


@pytest.mark.parametrize("metrics", [False, True])
def test_the_engine_alone_finishes_every_task(tmp_path: Path, metrics: bool) -> None:
    figures = measure(300, workers=3, in_flight=4, chunk=7, metrics=metrics, profile=False, workdir=tmp_path,
                      vary=True)
    assert figures["done"] == 300 and figures["cpu_ms_per_task"] > 0
