"""The peer in the benchmark (issue 14): Celery + Redis running the e2e phase's no-op tasks.

A Redis server on a free loopback port (no persistence, its own temp directory) and one Celery
worker with a prefork pool of as many task processes as the e2e phase's agents have in all
(agents x bench.e2e.AGENT_PROCESSES), whose prefetch fills the same window (agents x
concurrency tasks in flight). After a warm-up, the measured job is submitted, then gathered:

- throughput: tasks / (first ``apply_async`` -> last result received by the client), the span
  dockercomp's e2e figure measures (first dispatch -> last result stored);
- window 1: one task at a time, ``apply_async(...).get()``; p50 of the round trips;
- CPU per task of the worker (with its pool), Redis, and this client.

When Celery (the `bench` extra) or redis-server is missing the phase is skipped with a note
that the run prints and the results file keeps: never a silent pass.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.defaults import PHASE_TIMEOUT, START_TIMEOUT
from bench.e2e import AGENT_PROCESSES, WARMUP_PER_SLOT
from bench.errors import BenchError
from bench.harness import Child, CpuMeter, Latency, package_version, wait_for

# Where Debian and most distributions put redis-server when it is not on PATH.
_REDIS_PATHS = ("/usr/bin/redis-server", "/usr/sbin/redis-server", "/usr/local/bin/redis-server")


@dataclass(frozen=True)
class PeerRun:
    """One Celery + Redis measurement (or the note saying why it was skipped)."""

    skipped: str | None = None
    celery: str = ""
    redis_server: str = ""
    tasks: int = 0
    task_processes: int = 0
    prefetch_multiplier: int = 0
    window: int = 0
    submit_s: float = 0.0
    seconds: float = 0.0
    tasks_per_s: float = 0.0
    window1: Latency | None = None
    cpu_ms_per_task: dict[str, float] = field(default_factory=dict)
    cpu_busy: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def find_redis_server() -> str | None:
    return shutil.which("redis-server") or next((p for p in _REDIS_PATHS if os.access(p, os.X_OK)), None)


def missing() -> str | None:
    """Why the peer cannot run here (with the fix), or None when it can."""
    try:
        import celery  # noqa: F401
        import redis  # noqa: F401
    except ImportError as exc:
        return f"Celery/redis-py not installed ({exc.name}): pip install -e '.[bench]' (make venv does)"
    if find_redis_server() is None:
        return "redis-server is not installed: apt-get install redis-server (or `make system`)"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """redis-server on a free loopback port: no RDB, no AOF, its files in ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        binary = find_redis_server()
        if binary is None:
            raise BenchError("redis-server is not installed")
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.child = Child("redis-server", [binary, "--port", str(self.port), "--bind", "127.0.0.1",
                                            "--save", "", "--appendonly", "no", "--dir", str(workdir),
                                            "--daemonize", "no", "--protected-mode", "yes"],
                           workdir / "redis.log")

    @property
    def pid(self) -> int:
        return self.child.pid

    def wait_ready(self) -> None:
        import redis

        def answers() -> bool:
            try:
                return bool(redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1).ping())
            except redis.exceptions.ConnectionError:
                return False

        wait_for(answers, START_TIMEOUT, "redis-server answering PING", check=self.child.check_alive)

    def stop(self) -> None:
        self.child.stop()


def redis_version() -> str:
    binary = find_redis_server()
    if binary is None:
        return "not installed"
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
        return next((part[2:] for part in out.split() if part.startswith("v=")), out.strip())
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def shape(agents: int, concurrency: int) -> tuple[int, int]:
    """(task processes, prefetch multiplier) of the Celery worker matching the e2e phase: the
    agents' task processes in all, and a prefetch that fills the same window (Celery prefetches
    multiplier x processes messages)."""
    processes = agents * min(concurrency, AGENT_PROCESSES)
    return processes, max(1, math.ceil(agents * concurrency / processes))


def measure(*, workdir: Path, tasks: int, agents: int, concurrency: int, latency_samples: int) -> PeerRun:
    """The peer's run, or a PeerRun with ``skipped`` set when Celery or redis-server is missing."""
    reason = missing()
    if reason:
        return PeerRun(skipped=reason)
    processes, multiplier = shape(agents, concurrency)
    redis_server = RedisServer(workdir / "redis")
    worker: Child | None = None
    try:
        redis_server.wait_ready()
        env = {**os.environ, "DOCKERCOMP_BENCH_REDIS": redis_server.url}
        worker = Child("celery-worker", [sys.executable, "-m", "celery", "-A", "bench.peer_app", "worker",
                                         "--pool", "prefork", "--concurrency", str(processes),
                                         "--prefetch-multiplier", str(multiplier), "--without-gossip",
                                         "--without-mingle", "--without-heartbeat", "--loglevel", "WARNING"],
                       workdir / "celery-worker.log", env=env)
        os.environ["DOCKERCOMP_BENCH_REDIS"] = redis_server.url  # read by bench.peer_app on import
        from bench.peer_app import app, noop

        app.conf.broker_url = app.conf.result_backend = redis_server.url
        _round_trip(noop, worker, START_TIMEOUT)  # the worker is up and its pool answers
        _job(noop, worker, processes * multiplier * WARMUP_PER_SLOT)
        meter = CpuMeter({"celery worker": [worker.pid], "redis": [redis_server.pid], "client": [os.getpid()]})
        meter.start()
        submit_s, seconds = _job(noop, worker, tasks)
        cpu = meter.stop()
        window1 = Latency.of_seconds([_round_trip(noop, worker, PHASE_TIMEOUT) for _ in range(latency_samples)])
    finally:
        if worker is not None:
            worker.stop()
        redis_server.stop()
    return PeerRun(celery=package_version("celery"), redis_server=redis_version(), tasks=tasks,
                   task_processes=processes, prefetch_multiplier=multiplier, window=processes * multiplier,
                   submit_s=round(submit_s, 3), seconds=round(seconds, 3),
                   tasks_per_s=round(tasks / seconds, 1) if seconds > 0 else 0.0, window1=window1,
                   cpu_ms_per_task=cpu.per_task_ms(tasks), cpu_busy=cpu.busy)


def _round_trip(task: Any, worker: Child, timeout: float) -> float:
    started = time.perf_counter()
    try:
        task.apply_async().get(timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - celery raises its own TimeoutError, or the task's error
        worker.check_alive()
        raise BenchError(f"a Celery no-op task did not come back within {timeout:.0f} s: {exc!r}; "
                         f"the worker's log: {worker.log_path}") from None
    return time.perf_counter() - started


def _job(task: Any, worker: Child, tasks: int) -> tuple[float, float]:
    """Submit ``tasks`` no-ops, then gather every result; (submit seconds, first send -> last result)."""
    from celery.result import ResultSet

    started = time.perf_counter()
    results = ResultSet([task.apply_async() for _ in range(tasks)])
    submit_s = time.perf_counter() - started
    try:
        results.join_native(timeout=PHASE_TIMEOUT, propagate=True)
    except Exception as exc:  # noqa: BLE001 - see _round_trip
        worker.check_alive()
        raise BenchError(f"Celery did not finish {tasks} no-op tasks within {PHASE_TIMEOUT:.0f} s: {exc!r}; "
                         f"the worker's log: {worker.log_path}") from None
    return submit_s, time.perf_counter() - started


# --------------------------------------------------------------------------- report
def ratio(results: dict[str, Any]) -> float | None:
    """dockercomp e2e tasks/s over Celery's, both from this run. With several e2e rounds
    (bench/run.py), dockercomp's is their median tasks/s: the e2e entry is the round whose
    e2e/raw was the median, chosen against the raw runs around it, which Celery's run is not."""
    peer = results.get("peer") or {}
    e2e = next((r for r in results.get("e2e", []) if r.get("key") == "e2e-mosquitto"), None)
    if not e2e or not peer.get("tasks_per_s"):
        return None
    rates = sorted(one["tasks_per_s"] for one in e2e.get("rounds") or []) or [e2e["tasks_per_s"]]
    return round(rates[len(rates) // 2] / peer["tasks_per_s"], 2)


def summary(results: dict[str, Any]) -> list[str]:
    """The lines report.py prints about the peer (a skip note included)."""
    peer = results.get("peer")
    if not peer:
        return []
    if peer.get("skipped"):
        return [f"peer (Celery + Redis): SKIPPED: {peer['skipped']}"]
    w1 = peer.get("window1") or {}
    line = (f"peer: Celery {peer['celery']} + Redis {peer['redis_server']}, {peer['task_processes']} task "
            f"processes, window {peer['window']}: {peer['tasks_per_s']:,.0f} tasks/s; window 1 p50 "
            f"{w1.get('p50_ms', 0):.2f} ms")
    out = [line]
    r = ratio(results)
    if r is not None:
        out.append(f"dockercomp e2e / Celery + Redis = {r:.2f} (same run; target >= 20)")
    return out
