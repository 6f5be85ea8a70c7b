"""What the benchmark measures with, checked without running it: the raw baseline's payloads
and the latency statistics. A tiny real run is tests/system/test_bench_smoke.py."""

from __future__ import annotations

from bench.harness import Latency, percentile
from bench.pickup import Pickup
from bench.raw import result_template, task_id_of, task_payload
from bench.replicas import ReplicaRun, summarize
from bench.report import targets
from dockercomp.broker.messages import Outcome, Result, Task
from dockercomp.coordinator.leases import new_nonces


def test_raw_baseline_sends_dockercomp_sized_payloads() -> None:
    # Given the payloads the raw baseline sends and answers
    task = task_payload("12345")
    prefix, suffix = result_template("w0")
    answer = prefix + task_id_of(task) + suffix

    # Then they are real dockercomp messages, the same bytes the coordinator and agent send,
    # with a nonce as long as the coordinator draws
    assert Task.decode(task) == Task(task_id="12345", job_id="1", attempt=1, function="noop", args=[],
                                     nonce="r" * len(new_nonces(1)[0]))
    decoded = Result.decode(answer)
    assert (decoded.task_id, decoded.outcome, decoded.worker) == ("12345", Outcome.OK, "w0")


def test_latency_percentiles_use_nearest_rank() -> None:
    values = [i / 1000 for i in range(1, 101)]  # 1 ms .. 100 ms
    assert percentile(values, 50) == 0.050
    assert percentile(values, 99) == 0.099
    assert Latency.of_seconds(values) == Latency(count=100, p50_ms=50.0, p99_ms=99.0, max_ms=100.0)
    assert percentile([], 50) == 0.0


def test_pickup_figures_keep_negative_values_and_the_submit_time() -> None:
    # serve may dispatch before the nudging submit has returned: a pickup can be below zero
    pickup = Pickup.of_seconds([-0.001, 0.002, 0.010, 0.400], submits=[0.004, 0.005, 0.006, 0.007])
    assert pickup == Pickup(count=4, p50_ms=2.0, p95_ms=400.0, max_ms=400.0, submit_p50_ms=5.0)


def _issue10(results: dict) -> dict[str, bool | None]:
    named = {t.name: t.met for t in targets({"e2e": [], **results})}
    return {name: met for name, met in named.items() if "pickup" in name or "generator" in name}


def test_issue10_targets_are_judged_from_the_pickup_and_stream_figures() -> None:
    assert _issue10({}) == {"pickup after submit (nudge), p95": None,
                            "submit 1,000,000 tasks from a generator: RSS growth": None}
    nudge = {"p95_ms": 12.0}
    streamed = [{"mode": "generator", "tasks": 1_000_000, "growth_mb": 4.0}, {"mode": "list", "growth_mb": 119.0}]
    assert _issue10({"pickup": {"nudge": nudge}, "stream": streamed}) == {
        "pickup after submit (nudge), p95": True, "submit 1,000,000 tasks from a generator: RSS growth": True}
    slow = {"nudge": {"p95_ms": 61.0}}
    fat = [{"mode": "generator", "tasks": 1_000_000, "growth_mb": 75.0}]
    assert _issue10({"pickup": slow, "stream": fat}) == {
        "pickup after submit (nudge), p95": False, "submit 1,000,000 tasks from a generator: RSS growth": False}


def test_issue14_targets_are_judged_against_the_raw_figures_of_the_same_run() -> None:
    def judged(results: dict) -> dict[str, bool | None]:
        return {t.name: t.met for t in targets({"e2e": [], **results})
                if "batches" in t.name or "raw window-1" in t.name}

    assert judged({}) == {"e2e / raw per-message round trip (batches)": None,
                          "p50 latency at window 1 (batches)": None}
    raw = {"baseline_tasks_per_s": 8000.0, "window1": {"latency": {"p50_ms": 0.3}}}
    fast = [{"key": "e2e-mosquitto", "tasks_per_s": 12_000.0}, {"key": "e2e-window1", "latency": {"p50_ms": 0.9}}]
    assert judged({"raw": raw, "e2e": fast}) == {"e2e / raw per-message round trip (batches)": True,
                                                 "p50 latency at window 1 (batches)": True,
                                                 "window-1 p50 vs raw window-1 p50": True}
    slow = [{"key": "e2e-mosquitto", "tasks_per_s": 11_000.0}, {"key": "e2e-window1", "latency": {"p50_ms": 1.3}}]
    assert judged({"raw": raw, "e2e": slow}) == {"e2e / raw per-message round trip (batches)": False,
                                                 "p50 latency at window 1 (batches)": False,
                                                 "window-1 p50 vs raw window-1 p50": False}
    # a miss by a hair is shown as one
    close = [{"key": "e2e-mosquitto", "tasks_per_s": 11_968.0}]
    [row] = [t for t in targets({"raw": raw, "e2e": close}) if t.name.startswith("e2e / raw")]
    assert (row.measured, row.met) == ("1.496", False)


def test_the_replicas_ratio_is_the_median_pair_and_a_drift_does_not_favour_a_side() -> None:
    # Given four pairs in mirrored order on a host that slows by 10 % per job, where a
    # replicated result costs exactly as much as a single one, and one hiccup in pair 3
    rates = [10_000 * 0.9 ** i for i in range(8)]
    keys = ["single", "replicas2", "replicas2", "single"] * 2
    rates[5] *= 0.5  # pair 3 (runs 4 and 5): the replicated job met a hiccup
    runs = [ReplicaRun(key, 100, 100, 1.0, rate) for key, rate in zip(keys, rates)]

    figures = summarize(runs)

    # Then each pair's ratio is read from its own two jobs, mirrored pairs err either way, and
    # the figure is their median: the drift cancels out and the hiccup moves one pair only
    assert figures["pair_ratios"] == [0.9, 1.111, 0.45, 1.111]
    assert figures["ratio"] == 1.006  # (0.9 + 1.111) / 2
    assert figures["met"] and figures["target"] == 0.9
    # the plain order (the replicated job always second) reads 0.9: every pair but the hiccup's
    plain = summarize([ReplicaRun(k, 100, 100, 1.0, r) for k, r in zip(["single", "replicas2"] * 4, rates)])
    assert plain["ratio"] == 0.9


def test_the_replicas_target_is_in_the_targets_table_with_one_decimal() -> None:
    def judged(replicated_rate: float) -> tuple[str, str, bool | None]:
        figures = summarize([ReplicaRun("single", 10, 10, 1.0, 100.0),
                             ReplicaRun("replicas2", 5, 10, 1.0, replicated_rate)])
        [row] = [t for t in targets({"replicas": figures}) if t.name.startswith("replicas")]
        return row.goal, row.measured, row.met

    assert judged(90.0) == (">= 90 %", "90.0 %", True)
    assert judged(89.5) == (">= 90 %", "89.5 %", False)  # what "90 %" and NO read as before
