"""Turning measurements into the three outputs: a JSON file, a table, and the summary line.

The JSON file (bench/results/<date>-<commit>.json) holds every figure plus what is needed to
judge it later: the machine, library versions, git commit, load average before and after,
and the options of the run. Its ``targets`` list says which of issue 6's targets were met.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench import peer as peer_mod
from bench.harness import REPO_ROOT, broker_version, package_version

# Version of the JSON layout, bumped when a field changes meaning.
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Target:
    """One of issue 6's targets and how this run fared."""

    name: str
    goal: str
    measured: str
    met: bool | None  # None: not measured in this run

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "goal": self.goal, "measured": self.measured, "met": self.met}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def machine() -> dict[str, Any]:
    """What a reader needs to compare two result files."""
    commit = _git("rev-parse", "HEAD") or "unknown"
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_mb": _memory_mb(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "paho_mqtt": package_version("paho-mqtt"),
        "amqtt": package_version("amqtt"),
        "peewee": package_version("peewee"),
        "sqlite": __import__("sqlite3").sqlite_version,
        "mosquitto": broker_version("mosquitto"),
        "git_commit": commit,
        "git_dirty": dirty,
    }


def _memory_mb() -> int:
    try:
        with open("/proc/meminfo") as f:
            return int(f.readline().split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        return 0


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def summary_line(e2e_per_s: float | None, raw_per_s: float | None) -> str:
    """The last line of every run: ``e2e/raw = R (E tasks/s vs B tasks/s)``."""
    if not e2e_per_s or not raw_per_s:
        e = f"{e2e_per_s:.0f}" if e2e_per_s else "n/a"
        b = f"{raw_per_s:.0f}" if raw_per_s else "n/a"
        return f"e2e/raw = n/a ({e} tasks/s vs {b} tasks/s)"
    return f"e2e/raw = {e2e_per_s / raw_per_s:.2f} ({e2e_per_s:.0f} tasks/s vs {raw_per_s:.0f} tasks/s)"


def results_path(out_dir: Path, started: dt.datetime, commit: str) -> Path:
    stamp = started.strftime("%Y%m%d-%H%M%S")
    return out_dir / f"{stamp}-{commit[:10] or 'unknown'}.json"


def write_json(results: dict[str, Any], out_dir: Path, started: dt.datetime) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = results_path(out_dir, started, results.get("machine", {}).get("git_commit", ""))
    path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    return path


# --------------------------------------------------------------------------- tables
def _fmt(value: Any, unit: str = "", digits: int = 0) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}{unit}"
    return f"{value}{unit}"


def render(results: dict[str, Any], console: Console) -> None:
    """Human-readable tables of a results dict (the same dict the JSON file holds)."""
    for table in (_round_trips(results), _cpu(results), _submit(results), _stream(results), _pickup(results),
                  _scale(results), *_scale_fleets(results), _targets(results)):
        if table is not None:
            console.print(table)
    for line in peer_mod.summary(results):  # issue 14: the peer's figures, or why it was skipped
        console.print(line)
    for run in results.get("e2e", []):
        for process, profile in (run.get("profile") or {}).items():
            console.print(_profile(run, process, profile))


def _table(title: str, *columns: str, left: int = 1) -> Table:
    table = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i < left else "right")
    return table


def _round_trips(results: dict[str, Any]) -> Table | None:
    raw = results.get("raw") or {}
    runs = results.get("e2e") or []
    if not raw and not runs:
        return None
    table = _table("round trips (latency: dispatch -> result stored)", "run", "broker", "tasks", "window",
                   "tasks/s", "p50 ms", "p99 ms", "vs raw", left=2)
    raw_rate = raw.get("baseline_tasks_per_s")
    after = raw.get("throughput_after")
    for label, series in (("raw paho" + (", before e2e" if after else ""), raw.get("throughput")),
                          ("raw paho, after e2e", after), ("raw paho", raw.get("window1"))):
        if series:
            ratio = f"{series['tasks_per_s'] / raw_rate:.2f}" if raw_rate and series["window"] > 1 else ""
            table.add_row(label, "mosquitto", _fmt(series["tasks"]), _fmt(series["window"]),
                          _fmt(series["tasks_per_s"]), _fmt(series["latency"]["p50_ms"], digits=2),
                          _fmt(series["latency"]["p99_ms"], digits=2), ratio)
        if series is raw.get("throughput"):
            # The raw runs between the e2e rounds (bench/run.py), rate only.
            for i, rate in enumerate((raw.get("rounds_tasks_per_s") or [])[1:-1]):
                table.add_row(f"raw paho, after e2e round {i + 1}", "mosquitto", "", "", _fmt(rate), "", "", "")
    raw_single = raw_window1_p50(raw)
    for run in runs:
        same_window = raw_rate and run.get("tasks_per_s") and run["window"] > 1
        # At window 1 the comparison is latency: p50 as a multiple of the raw window-1 p50.
        versus = (f"{run['tasks_per_s'] / raw_rate:.2f}" if same_window else
                  f"p50 {run['latency']['p50_ms'] / raw_single:.1f}x" if raw_single and run["window"] == 1 else "")
        table.add_row(run["label"], run["broker"], _fmt(run["tasks"]), _fmt(run["window"]),
                      _fmt(run.get("tasks_per_s")), _fmt(run["latency"]["p50_ms"], digits=2),
                      _fmt(run["latency"]["p99_ms"], digits=2), versus)
        if len(run.get("rounds") or []) > 1:
            # Each round against its own baseline (the raw runs just before and after it); the
            # row above is the median round's.
            for i, one in enumerate(run["rounds"]):
                if "tasks_per_s" in one:
                    table.add_row(f"  round {i + 1} (raw {_fmt(one['baseline_tasks_per_s'])})", "", "", "",
                                  _fmt(one["tasks_per_s"]), "", "", f"{one['ratio']:.2f}")
                else:  # window 1: latency
                    baseline = one.get("baseline_p50_ms")
                    table.add_row(f"  round {i + 1}" + (f" (raw p50 {baseline:.2f} ms)" if baseline else ""),
                                  "", "", "", "", _fmt(one["p50_ms"], digits=2), "",
                                  f"p50 {one['ratio']:.1f}x" if baseline else "")
    return table


def raw_window1_p50(raw: dict[str, Any]) -> float | None:
    """The raw window-1 p50 that dockercomp's window-1 p50 is compared with: the mean of the raw
    runs around its median round when the window-1 runs came in rounds (bench/run.py), else
    the raw phase's own window-1 run."""
    return raw.get("window1_baseline_p50_ms") or (raw.get("window1") or {}).get("latency", {}).get("p50_ms")


def _cpu(results: dict[str, Any]) -> Table | None:
    rows = []
    raw = (results.get("raw") or {}).get("throughput")
    if raw and raw.get("cpu_ms_per_task"):
        rows.append(("raw paho", raw["cpu_ms_per_task"], raw.get("cpu_busy")))
    for run in results.get("e2e", []):
        if run.get("cpu_ms_per_task") and run["window"] > 1:
            rows.append((f"{run['label']} ({run['broker']})", run["cpu_ms_per_task"], run.get("cpu_busy")))
    if not rows:
        return None
    groups: list[str] = []
    for _, per_task, _ in rows:
        groups += [g for g in per_task if g not in groups]
    table = _table("CPU ms per task, by process group", "run", *groups, "total", "cores busy")
    for label, per_task, busy in rows:
        table.add_row(label, *(_fmt(per_task.get(g), digits=3) for g in groups),
                      _fmt(float(sum(per_task.values())), digits=3), _fmt(busy * 100 if busy else None, " %"))
    return table


def _submit(results: dict[str, Any]) -> Table | None:
    rows = results.get("submit")
    if not rows:
        return None
    table = _table("submitting one job", "how", "tasks", "seconds", "tasks/s")
    for row in rows:
        table.add_row(row["how"], _fmt(row["tasks"]), _fmt(row["seconds"], digits=2), _fmt(row["tasks_per_s"]))
    return table


def _stream(results: dict[str, Any]) -> Table | None:
    rows = results.get("stream")
    if not rows:
        return None
    table = _table("submitting from a generator vs a list (Python API, fresh process)", "input", "tasks",
                   "seconds", "RSS before", "RSS growth")
    for row in rows:
        table.add_row(row["mode"], f"{row['tasks']:,}", _fmt(row["seconds"], digits=1),
                      _fmt(row["rss_before_mb"], " MB", 1), _fmt(row["growth_mb"], " MB", 1))
    return table


def _pickup(results: dict[str, Any]) -> Table | None:
    pickup = results.get("pickup")
    if not pickup:
        return None
    table = _table(f"pickup: submit returned -> first dispatch ({pickup['samples']} one-task jobs each)",
                   "how serve learns of the job", "p50", "p95", "max", "submit took (p50)")
    for mode, how in (("nudge", "nudge over the broker"), ("poll", f"its poll, every {pickup['poll_interval_s']:g} s")):
        row = pickup[mode]
        table.add_row(how, _fmt(row["p50_ms"], " ms", 1), _fmt(row["p95_ms"], " ms", 1), _fmt(row["max_ms"], " ms", 1),
                      _fmt(row.get("submit_p50_ms"), " ms", 1))
    return table


def _scale(results: dict[str, Any]) -> Table | None:
    scale = results.get("scale")
    if not scale:
        return None
    table = _table(f"scale mode: {scale['workers']:,} simulated workers", "measure", "value")
    table.add_row("all connected to the broker", _fmt(scale.get("connected_s"), " s", 2))
    table.add_row("all registered at the coordinator", _fmt(scale.get("registered_s"), " s", 2))
    table.add_row("coordinator RSS after registration", _fmt(scale.get("rss_registered_mb"), " MB", 1))
    table.add_row("coordinator peak RSS", _fmt(scale.get("peak_rss_mb"), " MB", 1))
    _scale_brokers(table, scale)
    for job in scale.get("jobs", []):
        n = job["tasks"]
        table.add_row(f"{n:,} tasks: submit", _fmt(job.get("submit_s"), " s", 2))
        table.add_row(f"{n:,} tasks: tasks/s", _fmt(job.get("tasks_per_s")))
        table.add_row(f"{n:,} tasks: coordinator CPU per task", _fmt(job.get("cpu_ms_per_task"), " ms", 3))
        others = {k: v for k, v in (job.get("cpu_ms_per_task_by_group") or {}).items() if k != "coordinator"}
        if others:
            table.add_row(f"{n:,} tasks: CPU per task elsewhere",
                          ", ".join(f"{name} {ms:.3f} ms" for name, ms in others.items()))
        table.add_row(f"{n:,} tasks: max/min tasks per worker", f"{job.get('max_per_worker')}/{job.get('min_per_worker')}")
        slices = job.get("slices") or []
        if len(slices) > 1:
            table.add_row(f"{n:,} tasks: CPU per task, first/last slice",
                          f"{slices[0]['cpu_ms_per_task']:.3f}/{slices[-1]['cpu_ms_per_task']:.3f} ms")
    return table


def _targets(results: dict[str, Any]) -> Table | None:
    rows = results.get("targets") or []
    if not rows:
        return None
    table = _table("targets (issues 6, 10 and 14)", "target", "goal", "measured", "met", left=4)
    for target in rows:
        met = {True: "[green]yes[/]", False: "[red]NO[/]", None: "not run"}[target["met"]]
        table.add_row(target["name"], target["goal"], target["measured"], met)
    return table


def _profile(run: dict[str, Any], process: str, profile: dict[str, Any]) -> Table:
    table = _table(f"{process} profile, {run['label']} on {run['broker']} ({profile['samples']} busy samples)",
                   "self %", "function", "on stack %", "function ", left=0)
    table.columns[1].justify = table.columns[3].justify = "left"
    own, inclusive = profile["self_time"], profile["inclusive"]
    for i in range(max(len(own), len(inclusive))):
        a = own[i] if i < len(own) else None
        b = inclusive[i] if i < len(inclusive) else None
        table.add_row(_fmt(a and a["percent"], digits=1), a["name"] if a else "",
                      _fmt(b and b["percent"], digits=1), b["name"] if b else "")
    return table


def targets(results: dict[str, Any]) -> list[Target]:
    """Issue 6's and issue 10's targets against this run's figures."""
    raw = results.get("raw") or {}
    e2e = next((r for r in results.get("e2e", []) if r.get("key") == "e2e-mosquitto"), None)
    single = next((r for r in results.get("e2e", []) if r.get("key") == "e2e-window1"), None)
    submit = next((r for r in results.get("submit") or [] if r.get("key") == "api"), None)
    scale = results.get("scale") or {}
    out: list[Target] = []
    if e2e and raw.get("baseline_tasks_per_s"):
        ratio = e2e["tasks_per_s"] / raw["baseline_tasks_per_s"]
        out.append(Target("e2e vs raw round trip", ">= 50 %", f"{ratio * 100:.0f} %", ratio >= 0.5))
    else:
        out.append(Target("e2e vs raw round trip", ">= 50 %", "not measured", None))
    if single:
        p50 = single["latency"]["p50_ms"]
        out.append(Target("p50 latency at window 1 (e2e)", "< 2 ms", f"{p50:.2f} ms", p50 < 2.0))
    else:
        out.append(Target("p50 latency at window 1 (e2e)", "< 2 ms", "not measured", None))
    if submit:
        out.append(Target(f"submit {submit['tasks']:,} tasks", "< 10 s", f"{submit['seconds']:.2f} s",
                          submit["seconds"] < 10.0))
    else:
        out.append(Target("submit 100,000 tasks", "< 10 s", "not measured", None))
    if scale.get("registered_s") is not None:
        out.append(Target(f"{scale['workers']:,} workers registered", "< 10 s", f"{scale['registered_s']:.2f} s",
                          scale["registered_s"] < 10.0))
        out.append(Target("coordinator RSS", "< 300 MB", f"{scale['peak_rss_mb']:.0f} MB", scale["peak_rss_mb"] < 300))
    else:
        out.append(Target("1,000 workers registered", "< 10 s", "not measured", None))
        out.append(Target("coordinator RSS", "< 300 MB", "not measured", None))
    out += _issue10_targets(results)
    out += _issue14_targets(results)
    out += _peer_targets(results)
    out += _scale_targets(results)
    replicated = results.get("replicas") or {}
    if replicated.get("ratio"):  # issue 11: replication costs the extra work, not overhead
        # one decimal: 0.895 is not met, and "90 %" would not say why
        out.append(Target("replicas 2 / quorum 2 results/s vs single", f">= {replicated['target'] * 100:.0f} %",
                          f"{replicated['ratio'] * 100:.1f} %", bool(replicated["met"])))
    overhead = results.get("metrics") or {}
    if overhead.get("ratio"):
        out.append(Target("e2e with /metrics vs without", ">= 97 %", f"{overhead['ratio'] * 100:.1f} %",
                          overhead["ratio"] >= 0.97))
    if overhead.get("cpu_ratio"):
        # The same, as coordinator CPU per task: what a loaded shared machine disturbs least.
        out.append(Target("coordinator CPU/task without /metrics vs with", ">= 97 %",
                          f"{overhead['cpu_ratio'] * 100:.1f} %", overhead["cpu_ratio"] >= 0.97))
    jobs = scale.get("jobs") or []
    if len(jobs) >= 2 and all(j.get("cpu_ms_per_task") for j in jobs):
        small, big = jobs[0], jobs[-1]
        growth = big["cpu_ms_per_task"] / small["cpu_ms_per_task"]
        # "Flat" allows 25 % for noise on a shared 2-core machine.
        out.append(Target(f"dispatch cost {small['tasks'] // 1000}k -> {big['tasks'] // 1000}k tasks",
                          "flat (x1.25 at most)", f"x{growth:.2f}", growth <= 1.25))
    else:
        out.append(Target("dispatch cost 10k -> 100k tasks", "flat", "not measured", None))
    return out


def _issue10_targets(results: dict[str, Any]) -> list[Target]:
    """Issue 10's pickup (item 15) and streaming-submit (item 16) targets."""
    out = []
    pickup = results.get("pickup")
    if pickup:
        p95 = pickup["nudge"]["p95_ms"]
        out.append(Target("pickup after submit (nudge), p95", "< 50 ms", f"{p95:.1f} ms", p95 < 50.0))
    else:
        out.append(Target("pickup after submit (nudge), p95", "< 50 ms", "not measured", None))
    streamed = next((r for r in results.get("stream") or [] if r.get("mode") == "generator"), None)
    if streamed:
        growth = streamed["growth_mb"]
        out.append(Target(f"submit {streamed['tasks']:,} tasks from a generator: RSS growth", "< 60 MB",
                          f"{growth:.1f} MB", growth < 60.0))
    else:
        out.append(Target("submit 1,000,000 tasks from a generator: RSS growth", "< 60 MB", "not measured", None))
    return out


def _issue14_targets(results: dict[str, Any]) -> list[Target]:
    """Issue 14's batching targets: throughput past the raw per-message round trip, and a
    window-1 latency that batching must not cost."""
    raw = results.get("raw") or {}
    e2e = next((r for r in results.get("e2e", []) if r.get("key") == "e2e-mosquitto"), None)
    single = next((r for r in results.get("e2e", []) if r.get("key") == "e2e-window1"), None)
    out = []
    if e2e and raw.get("baseline_tasks_per_s"):
        ratio = e2e["tasks_per_s"] / raw["baseline_tasks_per_s"]
        # three decimals: a run read 1.496, shown as "1.50" beside a NO
        out.append(Target("e2e / raw per-message round trip (batches)", ">= 1.5", f"{ratio:.3f}", ratio >= 1.5))
    else:
        out.append(Target("e2e / raw per-message round trip (batches)", ">= 1.5", "not measured", None))
    raw_single = raw_window1_p50(raw)
    if single:
        p50 = single["latency"]["p50_ms"]
        out.append(Target("p50 latency at window 1 (batches)", "<= 1.0 ms", f"{p50:.2f} ms", p50 <= 1.0))
        if raw_single:
            times = p50 / raw_single
            out.append(Target("window-1 p50 vs raw window-1 p50", "<= 4 x", f"{times:.1f} x ({raw_single:.2f} ms raw)",
                              times <= 4.0))
    else:
        out.append(Target("p50 latency at window 1 (batches)", "<= 1.0 ms", "not measured", None))
    return out
def _peer_targets(results: dict[str, Any]) -> list[Target]:
    """Issue 14: dockercomp e2e against Celery + Redis in the same run."""
    peer = results.get("peer")
    if not peer:
        return []
    ratio = peer_mod.ratio(results)
    if ratio is None:
        return [Target("e2e vs Celery + Redis", ">= 20 x", peer.get("skipped") and "skipped" or "not measured", None)]
    return [Target("e2e vs Celery + Redis", ">= 20 x", f"{ratio:.1f} x", ratio >= 20.0)]


# --------------------------------------------------------------------------- issue 14: scale
def _scale_brokers(table: Table, scale: dict[str, Any]) -> None:
    brokers = scale.get("brokers") or {}
    if scale.get("volunteers"):
        table.add_row("volunteers (simulated)", _fmt(scale["volunteers"]))
    if brokers.get("leaves"):
        table.add_row("brokers", f"a hub + {brokers['leaves']} bridged leaves (one process holds "
                      f"{brokers['connections_per_process']:,} connections: {brokers['limited_by']})")
    if scale.get("phase_s") is not None:
        table.add_row("this fleet's run took", _fmt(scale["phase_s"], " s", 0))


def _scale_fleets(results: dict[str, Any]) -> list[Table]:
    """The fleets after the first (the first is ``scale``, printed by _scale)."""
    return [t for fleet in (results.get("scale_fleets") or [])[1:] if (t := _scale({"scale": fleet})) is not None]


def dispatch_cost_ratio(reference: dict[str, Any], fleet: dict[str, Any]) -> float | None:
    """Coordinator CPU per task over all of a fleet's jobs, against the reference fleet's."""
    def per_task(run: dict[str, Any]) -> float | None:
        jobs = run.get("jobs") or []
        tasks = sum(j["tasks"] for j in jobs)
        return sum(j["cpu_s"] for j in jobs) / tasks if tasks and sum(j["cpu_s"] for j in jobs) else None

    ours, base = per_task(fleet), per_task(reference)
    return round(ours / base, 3) if ours and base else None


def _scale_targets(results: dict[str, Any]) -> list[Target]:
    """Issue 14: the biggest fleet registered, its coordinator RSS, and its dispatch cost per
    task against the first fleet's (same jobs, same run)."""
    fleets = results.get("scale_fleets") or []
    if len(fleets) < 2:
        return []
    reference, big = fleets[0], fleets[-1]
    n = f"{big['workers']:,} workers"
    ratio = dispatch_cost_ratio(reference, big)
    return [
        Target(f"{n} registered", "all", f"all, in {big['registered_s']:.1f} s", True),
        Target(f"coordinator RSS with {n}", "< 500 MB", f"{big['peak_rss_mb']:.0f} MB", big["peak_rss_mb"] < 500),
        Target(f"dispatch cost per task, {n} vs {reference['workers']:,}", "x1.2 at most",
               f"x{ratio:.2f}" if ratio else "not measured", ratio <= 1.2 if ratio else None),
    ]
