"""The whole benchmark, phase by phase, as one library call: ``run(BenchOptions) -> dict``.

Phases (each can be skipped; a failing phase is recorded with its error and the run goes on,
so one broken part never hides the figures of the others):

1. raw       paho-only round trip on Mosquitto (windowed, then window 1); with e2e, the
             windowed run is repeated after each e2e round, and each round's baseline is
             the mean of the raw runs around it, so a change in the machine's background load
             hits both sides
2. e2e       coordinator + agents on the same Mosquitto, 20,000 no-op tasks, E2E_ROUNDS jobs
             (each followed by the raw run); the figures are the median round's
3. window1   coordinator + one agent of concurrency 1: one task in flight at a time, E2E_ROUNDS
             jobs each bracketed by a raw window-1 run; the figures are the median round's
3b. peer     Celery + Redis on the same no-op tasks and task processes (bench/peer.py; skipped
             with a note when Celery or redis-server is missing)
4. amqtt     the e2e run again on the embedded amqtt broker (`dockercomp broker serve`)
5. submit    100,000 tasks into a fresh store: Python API, then `dockercomp coordinator submit`
6. stream    1,000,000 tasks from a generator through the API: RSS growth (bench/stream.py)
7. pickup    submit returned -> first dispatch, with the nudge and by polling (bench/pickup.py)
8. scale     1,000 then 50,000 simulated workers on fresh brokers (bench/scale.py)
9. replicas  results/s of `--replicas 2 --quorum 2` jobs vs single-replica ones (bench/replicas.py)
10. metrics   the e2e run with `serve --metrics-port` vs without, scraped every second (bench/metrics.py)

Mosquitto runs the repository's mosquitto.conf, moved to a free port (bench/harness.py).
"""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import defaults
from bench import e2e as e2e_mod
from bench import metrics as metrics_mod
from bench import peer as peer_mod
from bench import pickup as pickup_mod
from bench import raw as raw_mod
from bench import replicas as replicas_mod
from bench import scale as scale_mod
from bench import stream as stream_mod
from bench.errors import BenchError
from bench.fleetbrokers import raise_fd_limit
from bench.harness import console_script, start_broker
from bench.report import SCHEMA_VERSION, load_average, machine, summary_line, targets

PHASES = ("raw", "e2e", "window1", "peer", "amqtt", "submit", "stream", "pickup", "scale", "replicas", "metrics")


@dataclass(frozen=True)
class BenchOptions:
    tasks: int = defaults.E2E_TASKS
    workers: int = defaults.WORKERS
    window: int = defaults.WINDOW
    concurrency: int = defaults.AGENT_CONCURRENCY
    latency_samples: int = defaults.LATENCY_SAMPLES
    submit_tasks: int = defaults.SUBMIT_TASKS
    stream_tasks: int = defaults.STREAM_TASKS
    pickup_samples: int = defaults.PICKUP_SAMPLES
    scale_workers: tuple[int, ...] = defaults.SCALE_WORKERS
    scale_per_volunteer: int = defaults.SCALE_PER_VOLUNTEER
    scale_leaves: int | None = None  # leaf brokers; None: as many as the machine's limits need
    broker: str = "mosquitto"  # the scale phase's: or "rabbitmq-cluster" (bench/cluster.py)
    scale_processes: int = defaults.SCALE_PROCESSES
    scale_tasks: tuple[int, ...] = defaults.SCALE_TASKS
    scale_slice: int = defaults.SCALE_SLICE
    phases: tuple[str, ...] = PHASES
    rounds: int = defaults.E2E_ROUNDS  # e2e and window-1 jobs, each bracketed by raw runs
    profile: bool = False
    keep: bool = False  # keep the work directory (logs, databases) after the run


Say = Callable[[str], None]


@dataclass
class _Run:
    options: BenchOptions
    workdir: Path
    say: Say
    results: dict[str, Any] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)

    def phase(self, name: str, action: Callable[[], None]) -> None:
        if name not in self.options.phases:
            return
        self.say(f"[bold]{name}[/]: running")
        started = time.perf_counter()
        try:
            action()
        except BenchError as exc:
            self.fail(name, str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug in one phase must not lose the others' figures
            self.fail(name, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}")
        else:
            self.say(f"[bold]{name}[/]: done in {time.perf_counter() - started:.1f} s")

    def fail(self, name: str, message: str) -> None:
        self.failed.append(name)
        self.results.setdefault("errors", {})[name] = message
        self.say(f"[red]{name} failed[/]: {message}")


def run(options: BenchOptions, say: Say = lambda text: None) -> dict[str, Any]:
    """Run the selected phases; returns the results dict (also what the JSON file holds)."""
    unknown = set(options.phases) - set(PHASES)
    if unknown:
        raise BenchError(f"unknown phase(s) {', '.join(sorted(unknown))}; known: {', '.join(PHASES)}")
    started = dt.datetime.now()
    t0 = time.perf_counter()
    raise_fd_limit()  # for this process and every broker and swarm it starts (scale: 50,000 sockets)
    workdir = Path(tempfile.mkdtemp(prefix="dockercomp-bench-"))
    run_ = _Run(options, workdir, say)
    results = run_.results
    results.update({
        "schema": SCHEMA_VERSION,
        "started": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "load_before": load_average(),
        "options": {**asdict(options), "scale_tasks": list(options.scale_tasks),
                    "scale_workers": list(options.scale_workers), "phases": list(options.phases)},
        "e2e": [],
    })
    try:
        shared = [name for name in ("raw", "e2e", "window1", "metrics") if name in options.phases]
        mosquitto = None
        try:
            mosquitto = start_broker("mosquitto", workdir) if shared else None
        except BenchError as exc:
            for name in shared:
                run_.fail(name, str(exc))
        if mosquitto is not None:
            try:
                run_.phase("raw", lambda: _raw(run_, mosquitto))
                run_.phase("e2e", lambda: _e2e_rounds(run_, mosquitto))
                run_.phase("window1", lambda: _window1(run_, mosquitto))
                run_.phase("metrics", lambda: _metrics(run_, mosquitto))
            finally:
                mosquitto.stop()
        run_.phase("peer", lambda: _peer(run_))
        run_.phase("amqtt", lambda: _amqtt(run_))
        run_.phase("submit", lambda: _submit(run_))
        run_.phase("stream", lambda: _stream(run_))
        run_.phase("pickup", lambda: _pickup(run_))
        run_.phase("scale", lambda: _scale(run_))
        run_.phase("replicas", lambda: replicas_mod.phase(run_))  # bench/replicas.py
    finally:
        if options.keep or run_.failed:
            say(f"logs and databases kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    results["load_after"] = load_average()
    results["duration_s"] = round(time.perf_counter() - t0, 1)
    results["targets"] = [t.to_json() for t in targets(results)]
    raw_rate = (results.get("raw") or {}).get("baseline_tasks_per_s")
    e2e_rate = next((r["tasks_per_s"] for r in results["e2e"] if r["key"] == "e2e-mosquitto"), None)
    results["ratio"] = round(e2e_rate / raw_rate, 3) if e2e_rate and raw_rate else None
    results["cpu_ratio"] = _cpu_ratio(results)
    results["summary"] = summary_line(e2e_rate, raw_rate)
    return results


def _cpu_ratio(results: dict[str, Any]) -> float | None:
    """Raw CPU per task / e2e CPU per task (all processes of each side): what the throughput
    ratio would be if both were CPU-bound, and steadier than it on a shared machine."""
    raw = ((results.get("raw") or {}).get("throughput") or {}).get("cpu_ms_per_task") or {}
    e2e = next((r.get("cpu_ms_per_task") for r in results["e2e"] if r["key"] == "e2e-mosquitto"), None) or {}
    if not raw or not e2e or not sum(e2e.values()):
        return None
    return round(sum(raw.values()) / sum(e2e.values()), 3)


# --------------------------------------------------------------------------- phases
def _raw(run_: _Run, broker: Any) -> None:
    o = run_.options
    figures = raw_mod.measure(broker.host, broker.port, tasks=o.tasks, workers=o.workers, window=o.window,
                              latency_samples=o.latency_samples, broker_pid=broker.pid)
    run_.results["raw"] = {"broker": "mosquitto", "throughput": figures.throughput.to_json(),
                           "window1": figures.window1.to_json() if figures.window1 else None,
                           "baseline_tasks_per_s": figures.throughput.tasks_per_s}
    single = f", p50 {figures.window1.latency.p50_ms:.2f} ms at window 1" if figures.window1 else ""
    run_.say(f"  raw: {figures.throughput.tasks_per_s:,.0f} tasks/s at window {o.window}{single}")


def _raw_again(run_: _Run, broker: Any) -> None:
    """The raw baseline again, after an e2e job: its rate joins ``raw["rounds_tasks_per_s"]``."""
    o = run_.options
    figures = raw_mod.measure(broker.host, broker.port, tasks=o.tasks, workers=o.workers, window=o.window,
                              latency_samples=0, broker_pid=broker.pid)
    raw = run_.results["raw"]
    raw["throughput_after"] = figures.throughput.to_json()
    raw.setdefault("rounds_tasks_per_s", [raw["throughput"]["tasks_per_s"]]).append(figures.throughput.tasks_per_s)
    run_.say(f"  raw again: {figures.throughput.tasks_per_s:,.0f} tasks/s")


def _e2e_rounds(run_: _Run, broker: Any) -> None:
    """The e2e job ``rounds`` times on one coordinator and fleet, each followed by the raw
    baseline (when the raw phase runs): round i's baseline is the mean of the raw runs just
    before and just after it. The e2e entry is the median round's (by e2e/raw), so the summary
    line's ratio is that round's job over its own baseline."""
    o = run_.options
    raw = run_.results.get("raw")
    key, label = "e2e-mosquitto", "dockercomp"
    if raw is None:
        _e2e(run_, broker, "mosquitto", key, label)
        return
    runs = e2e_mod.measure_rounds(key=key, label=label, broker_name="mosquitto", url=broker.url,
                                  workdir=run_.workdir / key, tasks=o.tasks, agents=o.workers,
                                  concurrency=o.concurrency, broker_pid=broker.pid, profile=o.profile,
                                  rounds=o.rounds, between=lambda: _raw_again(run_, broker))
    pairs, median = _bracketed([result.tasks_per_s for result in runs], raw["rounds_tasks_per_s"], digits=1)
    rounds = [{"tasks_per_s": result.tasks_per_s, "baseline_tasks_per_s": baseline, "ratio": ratio}
              for result, (baseline, ratio) in zip(runs, pairs)]
    chosen = runs[median]
    chosen.rounds.extend(rounds)
    raw["baseline_tasks_per_s"] = rounds[median]["baseline_tasks_per_s"]
    run_.results["e2e"].append(chosen.to_json())
    for i, one in enumerate(rounds):
        run_.say(f"  {label} on mosquitto, round {i + 1}: {one['tasks_per_s']:,.0f} tasks/s, "
                 f"baseline {one['baseline_tasks_per_s']:,.0f}: {one['ratio']:.2f}{' (median)' if i == median else ''}")


def _bracketed(measured: list[float], brackets: list[float], digits: int) -> tuple[list[tuple[float, float]], int]:
    """Rounds measured between bracket runs (``brackets[i]`` just before round i, ``brackets[i + 1]``
    just after it): each round's (baseline, ratio), its baseline the mean of its two brackets
    rounded to ``digits``; and the index of the median round by ratio."""
    out = []
    for i, value in enumerate(measured):
        baseline = round((brackets[i] + brackets[i + 1]) / 2, digits)
        out.append((baseline, round(value / baseline, 3) if baseline else 0.0))
    return out, sorted(range(len(out)), key=lambda i: out[i][1])[len(out) // 2]


def _e2e(run_: _Run, broker: Any, broker_name: str, key: str, label: str) -> None:
    o = run_.options
    result = e2e_mod.measure(key=key, label=label, broker_name=broker_name, url=broker.url,
                             workdir=run_.workdir / key, tasks=o.tasks, agents=o.workers,
                             concurrency=o.concurrency, broker_pid=broker.pid,
                             profile=o.profile and broker_name == "mosquitto")
    run_.results["e2e"].append(result.to_json())
    run_.say(f"  {label} on {broker_name}: {result.tasks_per_s:,.0f} tasks/s, p50 {result.latency.p50_ms:.2f} ms")


def _metrics(run_: _Run, broker: Any) -> None:
    o = run_.options
    result = metrics_mod.measure(url=broker.url, workdir=run_.workdir / "metrics", tasks=o.tasks, agents=o.workers,
                                 concurrency=o.concurrency, broker_pid=broker.pid)
    run_.results["metrics"] = result.to_json()
    run_.say(f"  metrics on/off: {result.ratio:.3f} (best {max(result.on_tasks_per_s):,.0f} vs "
             f"{max(result.off_tasks_per_s):,.0f} tasks/s; {result.scrapes} scrapes); coordinator CPU per task "
             f"off/on: {result.cpu_ratio:.3f}")


def _window1(run_: _Run, broker: Any) -> None:
    """One task in flight, ``rounds`` times on one coordinator and agent. With the raw phase,
    each round is bracketed by the raw window-1 run (the one before it and the one after): its
    baseline is their mean p50, and the entry is the median round's by p50 / baseline, as for
    e2e: on this project's VM the raw p50 went from 0.33 to 0.66 ms within one such phase."""
    o = run_.options
    raw = run_.results.get("raw")
    bracketed = raw is not None and raw.get("window1") is not None
    baselines: list[float] = []

    def raw_window1() -> None:
        series = raw_mod.measure_window1(broker.host, broker.port, samples=o.latency_samples)
        baselines.append(series.latency.p50_ms)

    runs = e2e_mod.measure_rounds(key="e2e-window1", label="dockercomp, window 1", broker_name="mosquitto",
                                  url=broker.url, workdir=run_.workdir / "e2e-window1", tasks=o.latency_samples,
                                  agents=1, concurrency=1, broker_pid=broker.pid, profile=o.profile,
                                  rounds=o.rounds, between=raw_window1 if bracketed else None,
                                  before=raw_window1 if bracketed else None)
    if not bracketed:  # no raw phase: the median round by p50
        result = sorted(runs, key=lambda r: r.latency.p50_ms)[len(runs) // 2]
        if len(runs) > 1:
            result.rounds.extend({"p50_ms": r.latency.p50_ms} for r in runs)
        run_.results["e2e"].append(result.to_json())
        run_.say(f"  window 1: p50 {result.latency.p50_ms:.2f} ms, {result.tasks_per_s:,.0f} tasks/s")
        return
    pairs, median = _bracketed([result.latency.p50_ms for result in runs], baselines, digits=4)
    rounds = [{"p50_ms": result.latency.p50_ms, "baseline_p50_ms": baseline, "ratio": ratio}
              for result, (baseline, ratio) in zip(runs, pairs)]
    chosen = runs[median]
    chosen.rounds.extend(rounds)
    raw["window1_rounds_p50_ms"] = baselines
    raw["window1_baseline_p50_ms"] = rounds[median]["baseline_p50_ms"]
    run_.results["e2e"].append(chosen.to_json())
    for i, one in enumerate(rounds):
        run_.say(f"  window 1, round {i + 1}: p50 {one['p50_ms']:.2f} ms, raw {one['baseline_p50_ms']:.2f} ms: "
                 f"{one['ratio']:.1f} x{' (median)' if i == median else ''}")


def _peer(run_: _Run) -> None:
    o = run_.options
    result = peer_mod.measure(workdir=run_.workdir / "peer", tasks=o.tasks, agents=o.workers,
                              concurrency=o.concurrency, latency_samples=o.latency_samples)
    run_.results["peer"] = result.to_json()
    if result.skipped:
        run_.say(f"  [yellow]peer skipped[/]: {result.skipped}")
    else:
        run_.say(f"  Celery + Redis: {result.tasks_per_s:,.0f} tasks/s with {result.task_processes} task processes, "
                 f"window 1 p50 {result.window1.p50_ms if result.window1 else 0:.2f} ms")


def _amqtt(run_: _Run) -> None:
    broker = start_broker("amqtt", run_.workdir)
    try:
        _e2e(run_, broker, "amqtt", "e2e-amqtt", "dockercomp")
    finally:
        broker.stop()


def _submit(run_: _Run) -> None:
    """Submit time into an idle, fresh store: through the API, and through the CLI."""
    from dockercomp.coordinator.api import Client

    n = run_.options.submit_tasks
    rows = []
    workdir = run_.workdir / "submit"
    workdir.mkdir(parents=True, exist_ok=True)
    with Client(str(workdir / "api.db")) as client:
        started = time.perf_counter()
        client.submit(defaults.FUNCTION, ([i] for i in range(n)), name="submit")
        seconds = time.perf_counter() - started
    rows.append({"key": "api", "how": "Python API (Client.submit)", "tasks": n, "seconds": round(seconds, 3),
                 "tasks_per_s": round(n / seconds, 1)})
    run_.results["submit"] = rows  # kept even if the CLI below fails
    run_.say(f"  API: {n:,} tasks in {seconds:.2f} s")
    lines = workdir / "tasks.jsonl"
    lines.write_text("".join(f"[{i}]\n" for i in range(n)))
    argv = [*console_script("coordinator"), "submit", defaults.FUNCTION, str(lines), "--job", "submit-cli",
            "--db", str(workdir / "cli.db")]
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=defaults.PHASE_TIMEOUT)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise BenchError(f"`dockercomp coordinator submit` exited with {done.returncode}: {(done.stderr or done.stdout)[-800:]}")
    rows.append({"key": "cli", "how": "dockercomp coordinator submit FILE (incl. start-up)", "tasks": n,
                 "seconds": round(seconds, 3), "tasks_per_s": round(n / seconds, 1)})
    run_.say(f"  CLI: {n:,} tasks in {seconds:.2f} s")


def _stream(run_: _Run) -> None:
    runs = stream_mod.measure(workdir=run_.workdir / "stream", tasks=run_.options.stream_tasks)
    run_.results["stream"] = [r.to_json() for r in runs]
    for r in runs:
        run_.say(f"  {r.mode}: {r.tasks:,} tasks in {r.seconds:.1f} s, RSS +{r.growth_mb:.1f} MB")


def _pickup(run_: _Run) -> None:
    broker = start_broker("mosquitto", run_.workdir / "pickup")
    try:
        result = pickup_mod.measure(url=broker.url, workdir=run_.workdir / "pickup",
                                    samples=run_.options.pickup_samples)
    finally:
        broker.stop()
    run_.results["pickup"] = result.to_json()
    run_.say(f"  pickup p50/p95: nudge {result.nudge.p50_ms:.1f}/{result.nudge.p95_ms:.1f} ms, "
             f"poll {result.poll.p50_ms:.1f}/{result.poll.p95_ms:.1f} ms")


def _scale(run_: _Run) -> None:
    """Each fleet in turn; ``scale`` is the first (the reference), ``scale_fleets`` all of them."""
    o = run_.options
    fleets: list[dict[str, Any]] = []
    for workers in o.scale_workers:
        started = time.perf_counter()
        result = scale_mod.measure(workdir=run_.workdir / f"scale-{workers}", workers=workers,
                                   processes=o.scale_processes, job_sizes=list(o.scale_tasks),
                                   slice_size=o.scale_slice, per_volunteer=o.scale_per_volunteer,
                                   leaves=o.scale_leaves, broker=o.broker, say=lambda line: run_.say(f"  {line}"))
        fleets.append({**result.to_json(), "phase_s": round(time.perf_counter() - started, 1)})
        run_.results["scale"], run_.results["scale_fleets"] = fleets[0], fleets  # kept if a bigger one fails
        leaves = result.brokers.get("leaves")
        run_.say(f"  scale: {workers:,} workers registered in {result.registered_s:.2f} s, "
                 f"peak RSS {result.peak_rss_mb:.0f} MB" + (f" (through {leaves} leaf brokers)" if leaves else ""))
