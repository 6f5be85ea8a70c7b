"""Streaming submit (issue 10 item 16): memory of `Client.submit` fed a generator of tasks.

Each mode runs in a fresh Python process (``python -m bench.stream DB TASKS MODE``), which
opens the client, notes its RSS, submits TASKS one-argument tasks into a new SQLite file and
prints its figures as one JSON line. Growth = peak RSS (VmHWM) - RSS before the submit.

- ``generator``: the arguments as a generator, as the API is meant to be fed;
- ``list``: the same arguments built as a list first, what every submit cost before the API
  streamed (it materialised its input): the contrast, in the same run.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.defaults import FUNCTION, PHASE_TIMEOUT
from bench.errors import BenchError
from bench.harness import REPO_ROOT

MODES = ("generator", "list")


@dataclass(frozen=True)
class StreamRun:
    mode: str
    tasks: int
    seconds: float
    rss_before_mb: float
    peak_rss_mb: float
    growth_mb: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def measure(*, workdir: Path, tasks: int, modes: tuple[str, ...] = MODES) -> list[StreamRun]:
    workdir.mkdir(parents=True, exist_ok=True)
    runs = []
    for mode in modes:
        argv = [sys.executable, "-m", "bench.stream", str(workdir / f"stream-{mode}.db"), str(tasks), mode]
        done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=PHASE_TIMEOUT)
        if done.returncode != 0:
            raise BenchError(f"streaming submit ({mode}) exited with {done.returncode}: {done.stderr[-800:]}")
        runs.append(StreamRun(**json.loads(done.stdout.strip().splitlines()[-1])))
    return runs


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM). Not ru_maxrss: Linux carries that over an exec from
    the process that spawned us, so a big bench process (after the peer phase's Celery) would
    show up as this child's growth."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # no /proc: the best there is


def _child(db: str, tasks: int, mode: str) -> dict[str, Any]:
    from dockercomp.coordinator.api import Client

    with Client(db, nudge=False) as client:
        before = _rss_mb()
        started = time.perf_counter()
        args = ([i] for i in range(tasks))
        job = client.submit(FUNCTION, args if mode == "generator" else list(args), name="stream")
        seconds = time.perf_counter() - started
        if job.total != tasks:
            raise SystemExit(f"stored {job.total} tasks, not {tasks}")
    peak = _peak_rss_mb()
    return {"mode": mode, "tasks": tasks, "seconds": round(seconds, 2), "rss_before_mb": round(before, 1),
            "peak_rss_mb": round(peak, 1), "growth_mb": round(peak - before, 1)}


if __name__ == "__main__":
    print(json.dumps(_child(sys.argv[1], int(sys.argv[2]), sys.argv[3])))
