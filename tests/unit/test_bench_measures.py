"""What the benchmark measures with, checked without running it: the raw baseline's payloads
and the latency statistics. A tiny real run is tests/system/test_bench_smoke.py."""

from __future__ import annotations

from bench.harness import Latency, percentile
from bench.raw import result_template, task_id_of, task_payload
from dockercomp.broker.messages import Outcome, Result, Task


def test_raw_baseline_sends_dockercomp_sized_payloads() -> None:
    # Given the payloads the raw baseline sends and answers
    task = task_payload("12345")
    prefix, suffix = result_template("w0")
    answer = prefix + task_id_of(task) + suffix

    # Then they are real dockercomp messages, the same bytes the coordinator and agent send
    assert Task.decode(task) == Task(task_id="12345", job_id="1", attempt=1, function="noop", args=[], nonce="r" * 22)
    decoded = Result.decode(answer)
    assert (decoded.task_id, decoded.outcome, decoded.worker) == ("12345", Outcome.OK, "w0")


def test_latency_percentiles_use_nearest_rank() -> None:
    values = [i / 1000 for i in range(1, 101)]  # 1 ms .. 100 ms
    assert percentile(values, 50) == 0.050
    assert percentile(values, 99) == 0.099
    assert Latency.of_seconds(values) == Latency(count=100, p50_ms=50.0, p99_ms=99.0, max_ms=100.0)
    assert percentile([], 50) == 0.0
