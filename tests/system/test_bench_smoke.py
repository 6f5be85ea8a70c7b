"""The benchmark's code paths on a tiny run: not a timed test, a check that `make bench` works.

Every phase runs for real (Mosquitto from mosquitto.conf, `dockercomp coordinator serve`, `dockercomp agent run`,
the embedded amqtt broker, simulated workers), only with sizes small enough for seconds.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from bench import peer
from bench.replicas import ROUNDS
from tests.support import REPO_ROOT, in_ci, require
from tests.support.brokers import find_mosquitto

SUMMARY = re.compile(r"^e2e/raw = (\d+\.\d\d) \((\d+) tasks/s vs (\d+) tasks/s\)$")

TINY = [
    "--tasks", "200", "--workers", "2", "--window", "10", "--concurrency", "2",
    "--latency-samples", "20", "--rounds", "3", "--submit-tasks", "500", "--stream-tasks", "2000", "--pickup-samples", "2",
    "--scale-workers", "5,8", "--scale-per-volunteer", "2", "--scale-leaves", "2", "--scale-processes", "2", "--scale-tasks", "50,100", "--scale-slice", "50",
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_tiny_benchmark_run_writes_results_and_ends_with_the_summary_line(tmp_path: Path) -> None:
    require(find_mosquitto(), "the mosquitto binary", "apt-get install mosquitto (or run `make system`)")

    # When the whole benchmark runs with tiny sizes
    done = subprocess.run([sys.executable, "-m", "bench", *TINY, "--out", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=230)

    # Then it succeeds and its output ends with exactly one summary line
    assert done.returncode == 0, f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
    last = done.stdout.rstrip("\n").splitlines()[-1]
    match = SUMMARY.match(last)
    assert match, f"last line is not the summary: {last!r}"
    assert sum(1 for line in done.stdout.splitlines() if line.startswith("e2e/raw =")) == 1

    # And the results file holds every figure, consistent with that line
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1
    results = json.loads(files[0].read_text())
    assert results["summary"] == last
    assert not results.get("errors")
    assert results["machine"]["cores"] and results["machine"]["git_commit"]
    raw = results["raw"]["throughput"]
    assert raw["tasks"] == 200 and raw["tasks_per_s"] > 0 and raw["latency"]["count"] == 200
    assert results["raw"]["window1"]["latency"]["count"] == 20
    # the e2e job ran in 3 rounds, each bracketed by raw runs (before it, after it) whose mean
    # is its baseline; the e2e figures and the baseline are the median round's
    after = results["raw"]["throughput_after"]
    rates = results["raw"]["rounds_tasks_per_s"]
    assert len(rates) == 4 and rates[0] == raw["tasks_per_s"] and rates[-1] == after["tasks_per_s"]
    runs = {run["key"]: run for run in results["e2e"]}
    rounds = runs["e2e-mosquitto"]["rounds"]
    assert len(rounds) == 3
    for i, one in enumerate(rounds):
        assert one["baseline_tasks_per_s"] == pytest.approx((rates[i] + rates[i + 1]) / 2, abs=0.1)
        assert one["ratio"] == pytest.approx(one["tasks_per_s"] / one["baseline_tasks_per_s"], abs=0.001)
    median = sorted(rounds, key=lambda one: one["ratio"])[1]
    baseline = results["raw"]["baseline_tasks_per_s"]
    assert baseline == median["baseline_tasks_per_s"]
    assert runs["e2e-mosquitto"]["tasks_per_s"] == median["tasks_per_s"]
    assert results["ratio"] == pytest.approx(median["ratio"], abs=0.001)

    assert set(runs) == {"e2e-mosquitto", "e2e-window1", "e2e-amqtt"}
    # the window-1 job too, each round bracketed by raw window-1 runs; its p50 and the baseline
    # the target compares it with are the median round's
    single, p50s = runs["e2e-window1"], results["raw"]["window1_rounds_p50_ms"]
    assert len(single["rounds"]) == 3 and len(p50s) == 4 and all(p50 > 0 for p50 in p50s)
    for i, one in enumerate(single["rounds"]):
        assert one["baseline_p50_ms"] == pytest.approx((p50s[i] + p50s[i + 1]) / 2, abs=0.0001)
        assert one["ratio"] == pytest.approx(one["p50_ms"] / one["baseline_p50_ms"], abs=0.001)
    median = sorted(single["rounds"], key=lambda one: one["ratio"])[1]
    assert single["latency"]["p50_ms"] == median["p50_ms"]
    assert results["raw"]["window1_baseline_p50_ms"] == median["baseline_p50_ms"]
    versus = next(t for t in results["targets"] if t["name"] == "window-1 p50 vs raw window-1 p50")
    assert versus["measured"] == f"{median['p50_ms'] / median['baseline_p50_ms']:.1f} x ({median['baseline_p50_ms']:.2f} ms raw)"
    for run in runs.values():
        # every task done exactly once, each result attributed to one of the agents
        assert (run["done"], run["failed"]) == (run["tasks"], 0), run
        assert sum(run["per_worker"].values()) == run["tasks"]
        assert run["latency"]["count"] == run["tasks"] and run["latency"]["p50_ms"] > 0
    assert len(runs["e2e-mosquitto"]["per_worker"]) == 2
    assert 0 < results["cpu_ratio"] and set(runs["e2e-mosquitto"]["cpu_ms_per_task"]) >= {"coordinator", "agents"}
    assert float(match.group(2)) == pytest.approx(runs["e2e-mosquitto"]["tasks_per_s"], abs=1)
    assert float(match.group(3)) == pytest.approx(baseline, abs=1)

    assert [row["key"] for row in results["submit"]] == ["api", "cli"]
    assert all(row["tasks"] == 500 and row["seconds"] > 0 for row in results["submit"])

    _check_issue10_phases(results, stream_tasks=2000, samples=2)

    # issue 13: the e2e run with and without /metrics, the endpoint scraped during the runs with it
    overhead = results["metrics"]
    assert len(overhead["on_tasks_per_s"]) == len(overhead["off_tasks_per_s"]) == 3 and overhead["scrapes"] > 0
    assert overhead["ratio"] > 0 and overhead["cpu_ratio"] > 0

    _check_peer(results, done.stdout, tasks=200)

    scale = results["scale"]
    assert scale["workers"] == 5 and scale["registered_s"] > 0 and scale["peak_rss_mb"] > 0
    assert [job["tasks"] for job in scale["jobs"]] == [50, 100]
    assert all(job["workers_used"] == 5 and job["min_per_worker"] > 0 for job in scale["jobs"])
    assert scale["answered_by_swarm"] >= 150 and scale["malformed_tasks"] == 0
    _check_fleets(results)
    replicas = results["replicas"]  # issue 11: replicated results/s vs single-replica, same run
    # pairs in mirrored order (single first, then replicated first, ...): a drift hits both alike
    pair, mirrored = [("single", 200), ("replicas2", 200)], [("replicas2", 200), ("single", 200)]
    assert [(r["key"], r["results"]) for r in replicas["runs"]] == (pair + mirrored) * (ROUNDS // 2)
    assert len(replicas["pair_ratios"]) == ROUNDS and replicas["ratio"] == round(statistics.median(replicas["pair_ratios"]), 3)
    assert any(t["name"].startswith("replicas 2 / quorum 2") for t in results["targets"])
    assert {target["name"] for target in results["targets"]} >= {"e2e vs raw round trip", "coordinator RSS"}


def _check_fleets(results: dict) -> None:
    """Issue 14: the fleets one after the other, here through a hub and 2 bridged leaves (what
    a fleet too big for one broker process gets), over volunteers of 2 workers each."""
    fleets = results["scale_fleets"]
    assert [fleet["workers"] for fleet in fleets] == [5, 8] and fleets[0] == results["scale"]
    for fleet in fleets:
        assert fleet["brokers"]["leaves"] == 2 and fleet["brokers"]["connections_per_process"] > 0
        assert fleet["volunteers"] == -(-fleet["workers"] // 2) and fleet["phase_s"] > 0
        assert all(job["workers_used"] == fleet["workers"] for job in fleet["jobs"])
        assert fleet["answered_by_swarm"] >= 150 and fleet["malformed_tasks"] == 0
    measured = {t["name"]: t for t in results["targets"]}
    assert measured["8 workers registered"]["met"] is True
    assert measured["dispatch cost per task, 8 workers vs 5"]["met"] is not None


def _check_peer(results: dict, stdout: str, tasks: int) -> None:
    """Issue 14: Celery + Redis ran the same tasks with the e2e phase's task processes (2 agents
    x their processes), and the ratio is printed; without Celery or redis-server, a laptop's run
    says so, and CI fails (the `bench` extra and scripts/setup-system.sh provide them)."""
    reason = peer.missing()
    if reason:
        require(not in_ci(), "the benchmark's peer (Celery + redis-server)", reason)
        assert results["peer"]["skipped"] == reason and f"SKIPPED: {reason}" in stdout
        return
    run = results["peer"]
    assert run["skipped"] is None and run["tasks"] == tasks and run["tasks_per_s"] > 0
    assert run["task_processes"] == peer.shape(2, 2)[0] and run["window"] >= 2 * 2
    assert run["window1"]["count"] == 20 and run["window1"]["p50_ms"] > 0
    assert set(run["cpu_ms_per_task"]) == {"celery worker", "redis", "client"}
    assert "dockercomp e2e / Celery + Redis = " in stdout
    # against the median of the e2e rounds' rates (the e2e entry is the median round by e2e/raw)
    rates = sorted(one["tasks_per_s"] for one in next(r for r in results["e2e"] if r["key"] == "e2e-mosquitto")["rounds"])
    assert peer.ratio(results) == pytest.approx(rates[1] / run["tasks_per_s"], abs=0.01)
    assert any(t["name"] == "e2e vs Celery + Redis" and t["met"] is not None for t in results["targets"])


@pytest.mark.timeout(60)
def test_the_peer_phase_without_celery_is_skipped_with_a_printed_note(tmp_path: Path) -> None:
    # Given a Python where Celery cannot be imported (a None entry in sys.modules fails the import)
    hide = "import sys; sys.modules['celery'] = None; from bench.cli import main; main()"

    # When only the peer phase runs
    done = subprocess.run([sys.executable, "-c", hide, "--only", "peer", "--tasks", "10", "--out", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=50)

    # Then the run says it skipped the peer and why, in its output, its targets and its file
    assert done.returncode == 0, f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
    assert "peer skipped" in done.stdout and "SKIPPED: Celery/redis-py not installed (celery)" in done.stdout
    [path] = tmp_path.glob("*.json")
    results = json.loads(path.read_text())
    assert results["peer"]["skipped"].startswith("Celery/redis-py not installed")
    assert [t["measured"] for t in results["targets"] if t["name"] == "e2e vs Celery + Redis"] == ["skipped"]


def _check_issue10_phases(results: dict, stream_tasks: int, samples: int) -> None:
    assert [row["mode"] for row in results["stream"]] == ["generator", "list"]
    assert all(row["tasks"] == stream_tasks and row["peak_rss_mb"] > 0 for row in results["stream"])
    pickup = results["pickup"]
    assert pickup["samples"] == samples and pickup["poll_interval_s"] > 0
    assert pickup["nudge"]["count"] == pickup["poll"]["count"] == samples
    names = {target["name"] for target in results["targets"]}
    assert {"pickup after submit (nudge), p95", f"submit {stream_tasks:,} tasks from a generator: RSS growth"} <= names


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_pickup_and_streaming_submit_phases_run_alone(tmp_path: Path) -> None:
    require(find_mosquitto(), "the mosquitto binary", "apt-get install mosquitto (or run `make system`)")
    done = subprocess.run([sys.executable, "-m", "bench", "--only", "stream", "--only", "pickup",
                           "--stream-tasks", "2000", "--pickup-samples", "2", "--out", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
    assert "pickup: submit returned -> first dispatch" in done.stdout
    [path] = tmp_path.glob("*.json")
    results = json.loads(path.read_text())
    assert not results.get("errors")
    _check_issue10_phases(results, stream_tasks=2000, samples=2)
