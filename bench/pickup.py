"""Pickup latency (issue 10 item 15): from `submit` returning to the job's first dispatch.

One `dockercomp coordinator serve` (its default poll interval) and one agent on Mosquitto.
One-task jobs are submitted through the Python API alternately two ways, so both share the
machine's load of the moment:

- ``nudge``: the client knows the broker, so `submit` publishes a nudge and serve polls at once;
- ``poll``: the client does not (``nudge=False``), so serve finds the job at its next poll.

Each submit starts at a random point of serve's poll cycle (a random pause before it), so the
poll figures spread over the whole interval as a user's submits would. Pickup is read back
from the store: Attempt.sent_at of the task minus the wall-clock time `submit` returned (it
can be slightly negative with a nudge: serve may dispatch before the submitter's call returns).
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.defaults import FUNCTION, PHASE_TIMEOUT, START_TIMEOUT
from bench.e2e import check_all, job_figures, job_finished, online_workers, start_agents, start_coordinator
from bench.errors import BenchError
from bench.harness import Child, percentile, wait_for

# The modes measured, in the order they alternate.
MODES = ("nudge", "poll")
# Seconds between looks at the job row while waiting for a sample to finish.
_DONE_POLL = 0.01


@dataclass(frozen=True)
class Pickup:
    """Pickup latencies of one mode, and how long its submits took, in milliseconds."""

    count: int
    p50_ms: float
    p95_ms: float
    max_ms: float
    submit_p50_ms: float  # the submit call itself (the nudge's connection is part of it)

    @classmethod
    def of_seconds(cls, values: list[float], submits: list[float]) -> "Pickup":
        ordered = sorted(values)
        return cls(len(ordered), round(percentile(ordered, 50) * 1000, 1), round(percentile(ordered, 95) * 1000, 1),
                   round((ordered[-1] if ordered else 0.0) * 1000, 1), round(percentile(sorted(submits), 50) * 1000, 1))


@dataclass(frozen=True)
class PickupRun:
    samples: int  # per mode
    poll_interval_s: float  # serve's poll of the jobs table (coordinator.defaults.POLL_INTERVAL)
    nudge: Pickup
    poll: Pickup

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def measure(*, url: str, workdir: Path, samples: int, rng: random.Random | None = None) -> PickupRun:
    """``samples`` one-task jobs per mode on the broker at ``url``; every process started
    here is stopped here."""
    from dockercomp.coordinator.api import Client
    from dockercomp.coordinator.defaults import POLL_INTERVAL

    rng = rng or random.Random(10)
    workdir.mkdir(parents=True, exist_ok=True)
    db = workdir / "pickup.db"
    coordinator = start_coordinator(url, db, workdir, "pickup-coordinator")
    children: list[Child] = [coordinator]
    clients: dict[str, Any] = {}
    try:
        wait_for(lambda: db.exists(), START_TIMEOUT, "the coordinator creating its database",
                 check=coordinator.check_alive)
        children += start_agents(url, workdir, 1, 1, prefix="pickup-a")
        clients = {"nudge": Client(str(db), broker=url, nudge=True), "poll": Client(str(db), broker=url, nudge=False)}
        names = {child.name for child in children[1:]}
        wait_for(lambda: online_workers(clients["poll"].store, names) == 1, START_TIMEOUT,
                 "the agent registering at the coordinator", check=lambda: check_all(children))
        # Warm-up: the agent's task process, imports and the nudge path's first connection.
        for mode in MODES:
            _sample(clients[mode], f"pickup-warmup-{mode}", children)
        pickups: dict[str, list[float]] = {mode: [] for mode in MODES}
        submits: dict[str, list[float]] = {mode: [] for mode in MODES}
        for i in range(samples):
            for mode in MODES:
                time.sleep(rng.uniform(0, POLL_INTERVAL))
                pickup, submit = _sample(clients[mode], f"pickup-{mode}-{i}", children)
                pickups[mode].append(pickup)
                submits[mode].append(submit)
    finally:
        for client in clients.values():
            client.close()
        for child in reversed(children):
            child.stop()
    return PickupRun(samples=samples, poll_interval_s=POLL_INTERVAL,
                     nudge=Pickup.of_seconds(pickups["nudge"], submits["nudge"]),
                     poll=Pickup.of_seconds(pickups["poll"], submits["poll"]))


def _sample(client: Any, name: str, children: list[Child]) -> tuple[float, float]:
    """Submit one no-op task; (seconds from submit returning to its dispatch, seconds submit took)."""
    started = time.perf_counter()
    job = client.submit(FUNCTION, [[]], name=name)
    returned = time.time()
    took = time.perf_counter() - started
    wait_for(lambda: job_finished(client.store, job.id), PHASE_TIMEOUT, f"job {name} finishing",
             interval=_DONE_POLL, check=lambda: check_all(children))
    first_sent = job_figures(client.store, job.id)["first_sent"]
    if first_sent is None:
        raise BenchError(f"job {name} finished without a dispatch in the store")
    return float(first_sent) - returned, took
