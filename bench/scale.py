"""Scale mode: one coordinator and 1,000, then 50,000 simulated workers (bench/swarm.py) on
one broker, or a hub and bridged leaves where one broker process cannot hold them all
(bench/fleetbrokers.py).

Measures what grows with the size of the fleet and of the job:
- time from "connect now" until the coordinator's store shows every worker online;
- coordinator memory (RSS now and peak, from /proc);
- round-robin fairness: most and fewest tasks any worker got, per job;
- dispatch cost: coordinator CPU time per task for a 10k and a 100k job, and inside the big
  job per 10k slice (flat means no per-task work grows with the backlog or the history).
"""

from __future__ import annotations

import multiprocessing
import queue
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.defaults import FUNCTION, PHASE_TIMEOUT, POLL_INTERVAL, START_TIMEOUT, VOLUNTEER
from bench.e2e import job_figures, job_finished, start_coordinator
from bench.errors import BenchError, PhaseTimeout
from bench.harness import Child, CpuMeter, proc_sample, wait_for
from bench.cluster import start_cluster_brokers
from bench.fleetbrokers import plan, start_fleet_brokers
from bench.swarm import swarm_main

# Seconds allowed per simulated worker to connect and register, on top of PHASE_TIMEOUT.
_REGISTER_ALLOWANCE = 0.01
# Seconds between progress samples (done count + coordinator CPU) during a scale job.
_SAMPLE_INTERVAL = 0.25


@dataclass(frozen=True)
class Slice:
    tasks: int
    seconds: float
    cpu_ms_per_task: float


@dataclass(frozen=True)
class ScaleJob:
    tasks: int
    submit_s: float
    seconds: float
    tasks_per_s: float
    cpu_s: float
    cpu_ms_per_task: float
    max_per_worker: int
    min_per_worker: int
    workers_used: int
    slices: list[Slice] = field(default_factory=list)
    cpu_ms_per_task_by_group: dict[str, float] = field(default_factory=dict)  # coordinator, swarm, broker
    cpu_busy: float = 0.0


@dataclass(frozen=True)
class ScaleRun:
    workers: int
    processes: int
    connected_s: float
    registered_s: float
    rss_registered_mb: float
    peak_rss_mb: float
    jobs: list[ScaleJob]
    answered_by_swarm: int
    malformed_tasks: int
    volunteers: int = 0
    brokers: dict[str, Any] = field(default_factory=dict)  # FleetBrokers.describe(): leaves, the limit

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _done_count(store: Any, job_id: int) -> int:
    from dockercomp.coordinator.sqlstore import Task
    from dockercomp.coordinator.store import TaskState

    store.bind()
    return Task.select().where((Task.job == job_id) & (Task.state == TaskState.DONE.value)).count()


def _online_count(store: Any) -> int:
    """Online workers in the scale run's own store (only simulated workers ever join it)."""
    from dockercomp.coordinator.sqlstore import Worker
    from dockercomp.coordinator.store import WorkerState

    store.bind()
    return Worker.select().where(Worker.state == WorkerState.ONLINE.value).count()


def _slices(samples: list[tuple[float, float, int]], size: int) -> list[Slice]:
    """Cost per slice of ``size`` completed tasks from (time, cpu seconds, done) samples."""
    out: list[Slice] = []
    start = samples[0]
    boundary = size
    for sample in samples[1:]:
        if sample[2] >= boundary:
            tasks = sample[2] - start[2]
            if tasks > 0:
                out.append(Slice(tasks, round(sample[0] - start[0], 3),
                                 round((sample[1] - start[1]) * 1000 / tasks, 4)))
            start = sample
            boundary = (sample[2] // size + 1) * size
    return out


def _run_job(client: Any, coordinator: Child, tasks: int, names: list[str], slice_size: int,
             groups: dict[str, list[int]]) -> ScaleJob:
    meter = CpuMeter({"coordinator": [coordinator.pid], **groups})
    meter.start()
    started = time.perf_counter()
    job = client.submit(FUNCTION, ([] for _ in range(tasks)), name=f"scale-{tasks}")
    submit_s = time.perf_counter() - started
    samples = [(time.monotonic(), proc_sample(coordinator.pid).cpu_seconds, 0)]
    deadline = time.monotonic() + PHASE_TIMEOUT
    while samples[-1][2] < tasks and not job_finished(client.store, job.id):
        coordinator.check_alive()
        if time.monotonic() > deadline:
            raise PhaseTimeout(f"scale job of {tasks} tasks: {samples[-1][2]} done after {PHASE_TIMEOUT:.0f} s")
        time.sleep(_SAMPLE_INTERVAL)
        samples.append((time.monotonic(), proc_sample(coordinator.pid).cpu_seconds, _done_count(client.store, job.id)))
    used = meter.stop()
    figures = job_figures(client.store, job.id)
    counts = [figures["per_worker"].get(name, 0) for name in names]
    seconds = figures["last_received"] - figures["first_sent"]
    cpu = used.seconds["coordinator"]
    return ScaleJob(tasks=tasks, submit_s=round(submit_s, 3), seconds=round(seconds, 3),
                    tasks_per_s=round(tasks / seconds, 1), cpu_s=round(cpu, 2),
                    cpu_ms_per_task=round(cpu * 1000 / tasks, 4), max_per_worker=max(counts),
                    min_per_worker=min(counts), workers_used=sum(1 for c in counts if c),
                    slices=_slices(samples, slice_size), cpu_ms_per_task_by_group=used.per_task_ms(tasks),
                    cpu_busy=used.busy)


def fleet(workers: int, per_volunteer: int) -> list[tuple[str, str]]:
    """(volunteer, name) of each simulated worker: ``per_volunteer`` workers per volunteer, as
    a real fleet is many volunteers (one volunteer's share is capped: coordinator Caps)."""
    return [(f"{VOLUNTEER}{i // per_volunteer:04d}", f"sim{i:05d}") for i in range(workers)]


def _split(sims: list[tuple[str, str]], processes: int, by_volunteer: bool) -> list[list[tuple[str, str]]]:
    """Each swarm process's workers: whole volunteers when leaves bridge only their tasks."""
    if not by_volunteer:
        return [sims[k::processes] for k in range(processes)]
    volunteers = sorted({v for v, _ in sims})
    bounds = [volunteers[k * len(volunteers) // processes] for k in range(processes)] + [None]
    return [[sim for sim in sims if sim[0] >= bounds[k] and (bounds[k + 1] is None or sim[0] < bounds[k + 1])]
            for k in range(processes)]


def measure(*, workdir: Path, workers: int, processes: int, job_sizes: list[int], slice_size: int,
            per_volunteer: int, leaves: int | None = None, broker: str = "mosquitto",
            say: Callable[[str], None] = lambda line: None) -> ScaleRun:
    """One coordinator and ``workers`` simulated workers on the brokers ``start_fleet_brokers``
    gives (``leaves``: None = as many as the machine's limits need)."""
    from dockercomp.coordinator.api import Client

    workdir.mkdir(parents=True, exist_ok=True)
    needed, processes = plan(workers, min(processes, workers))
    leaves = needed if leaves is None else max(leaves, needed)
    if broker == "rabbitmq-cluster":  # bench/cluster.py: every node takes swarms, no leaves
        leaves = 0
    if leaves:
        processes = leaves * -(-processes // leaves)
    sims = fleet(workers, per_volunteer)
    names = [name for _, name in sims]
    parts = _split(sims, processes, by_volunteer=bool(leaves))
    if leaves and any(not part for part in parts):
        raise BenchError(f"{workers} workers of {per_volunteer} per volunteer are too few volunteers for "
                         f"{processes} swarm processes over {leaves} leaf brokers")
    brokers = (start_cluster_brokers(workdir / "brokers", processes, say=say) if broker == "rabbitmq-cluster" else
               start_fleet_brokers(workdir / "brokers", "dockercomp", [sorted({v for v, _ in part}) for part in parts],
                                   leaves))
    db = workdir / "scale.db"
    ctx = multiprocessing.get_context("spawn")  # never fork next to paho's network thread
    go, stop, reports = ctx.Event(), ctx.Event(), ctx.Queue()
    # Each swarm process connects from its own loopback address: one address's ephemeral ports
    # (net.ipv4.ip_local_port_range, ~28,000) cannot carry 50,000 connections.
    procs = [ctx.Process(target=swarm_main, args=(*brokers.endpoints[k], parts[k], "dockercomp", go, stop, reports,
                                                  f"127.0.0.{2 + k % 250}"),
                         daemon=True, name=f"swarm-{k}") for k in range(processes)]
    coordinator: Child | None = None
    client: Any = None
    answered = malformed = 0
    try:
        coordinator = start_coordinator(brokers.url, db, workdir, "scale-coordinator")
        wait_for(lambda: db.exists(), START_TIMEOUT, "the coordinator creating its database",
                 check=coordinator.check_alive)
        client = Client(str(db))
        for proc in procs:
            proc.start()
        _expect(reports, "ready", processes, procs)
        started = time.monotonic()
        go.set()
        # Connecting is paced by the swarms, a few ms of CPU per worker on a small machine.
        wait_for(lambda: _online_count(client.store) >= workers, PHASE_TIMEOUT + workers * _REGISTER_ALLOWANCE,
                 f"{workers} simulated workers registering", interval=POLL_INTERVAL,
                 check=lambda: _check_alive(coordinator, procs))
        registered_s = time.monotonic() - started
        connected = _expect(reports, "connected", processes, procs)
        connected_s = max(message[2] for message in connected) - started
        rss_registered = proc_sample(coordinator.pid).rss_mb
        groups = {"simulated workers": [proc.pid for proc in procs if proc.pid], "broker": brokers.pids}
        jobs = [_run_job(client, coordinator, size, names, slice_size, groups) for size in job_sizes]
        peak = proc_sample(coordinator.pid).peak_rss_mb
        stop.set()
        for message in _expect(reports, "answered", processes, procs):
            answered += sum(message[2].values())
            malformed += message[3]
    finally:
        stop.set()
        go.set()  # a swarm still waiting for "go" must not hang its process
        if client is not None:
            client.close()
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        if coordinator is not None:
            coordinator.stop()
        brokers.stop()
    return ScaleRun(workers=workers, processes=processes, connected_s=round(connected_s, 3),
                    registered_s=round(registered_s, 3), rss_registered_mb=round(rss_registered, 1),
                    peak_rss_mb=round(peak, 1), jobs=jobs, answered_by_swarm=answered, malformed_tasks=malformed,
                    volunteers=len({v for v, _ in sims}), brokers=brokers.describe())


def _check_alive(coordinator: Child, procs: list[Any]) -> None:
    coordinator.check_alive()
    dead = [p.name for p in procs if not p.is_alive()]
    if dead:
        raise BenchError(f"simulated worker process(es) {', '.join(dead)} died; their traceback is above")


def _expect(reports: Any, kind: str, count: int, procs: list[Any]) -> list[tuple[Any, ...]]:
    """``count`` messages of ``kind`` from the swarm processes, or a BenchError saying which died."""
    got: list[tuple[Any, ...]] = []
    deadline = time.monotonic() + START_TIMEOUT * 2
    while len(got) < count:
        try:
            message = reports.get(timeout=0.5)
        except queue.Empty:
            dead = [p.name for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
            if dead:
                raise BenchError(f"simulated worker process(es) {', '.join(dead)} died; run with -v for details")
            if time.monotonic() > deadline:
                raise PhaseTimeout(f"{count - len(got)} swarm process(es) never reported {kind!r}")
            continue
        if message[0] == kind:
            got.append(message)
    return got
