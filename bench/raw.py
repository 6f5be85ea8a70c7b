"""The raw baseline: dockercomp's request -> reply round trip with nothing but paho and the broker.

A requester (in this process) publishes Task-sized messages, QoS 1, to the task topics of
``workers`` worker processes; each worker answers every task at once with a Result-sized
message, QoS 1, on its result topic; the requester keeps ``window`` tasks outstanding and
sends the next task to the worker whose answer just arrived (as the coordinator refills a
worker's free capacity). Same topics, same payloads (built with broker.messages), TCP_NODELAY
on every socket; no store, no decoding, no logic. Latency is publish -> answer received.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from dockercomp.broker.messages import Outcome, Result, Task
from dockercomp.broker.topics import Topics, WorkerRef
from dockercomp.coordinator.leases import new_nonces
from bench.defaults import FUNCTION, KEEPALIVE, PHASE_TIMEOUT, START_TIMEOUT, VOLUNTEER
from bench.errors import BenchError, PhaseTimeout
from bench.harness import CpuMeter, Latency, raw_client, set_nodelay

# Topic root of the baseline, apart from dockercomp's so nothing else ever hears it.
RAW_ROOT = "bench-raw"
_TASK_ID_KEY = b'"task_id":"'
_PLACEHOLDER = "TASKID"
# A fixed nonce as long as the coordinator's: the baseline's messages are the size of
# dockercomp's, though nothing here checks it.
_RAW_NONCE = "r" * len(new_nonces(1)[0])


@dataclass(frozen=True)
class RoundTrip:
    """One measured series of request -> reply round trips."""

    tasks: int
    workers: int
    window: int
    seconds: float
    tasks_per_s: float
    latency: Latency
    task_bytes: int
    result_bytes: int
    cpu_ms_per_task: dict[str, float] = field(default_factory=dict)  # per process group
    cpu_busy: float = 0.0  # share of all cores those groups used during the run

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RawFigures:
    throughput: RoundTrip  # ``window`` outstanding
    window1: RoundTrip | None  # one outstanding: the latency floor (None when not asked for)


def task_payload(task_id: str) -> bytes:
    """The bytes dockercomp sends for one no-op task with this id."""
    return Task(task_id=task_id, job_id="1", attempt=1, function=FUNCTION, args=[], timeout=60.0,
                nonce=_RAW_NONCE).encode()


def result_template(worker: str) -> tuple[bytes, bytes]:
    """(prefix, suffix) of the Result an agent sends for a no-op task; the id goes between."""
    encoded = Result(task_id=_PLACEHOLDER, attempt=1, worker=worker, volunteer=VOLUNTEER,
                     outcome=Outcome.OK, value=None, elapsed=0.000123, nonce=_RAW_NONCE).encode()
    prefix, suffix = encoded.split(_PLACEHOLDER.encode())
    return prefix, suffix


def task_id_of(payload: bytes) -> bytes:
    """The task id inside a Task or Result payload, by slicing: the baseline decodes nothing."""
    start = payload.index(_TASK_ID_KEY) + len(_TASK_ID_KEY)
    return payload[start:payload.index(b'"', start)]


# --------------------------------------------------------------------------- worker process
def worker_main(host: str, port: int, index: int, ready: Any, stop: Any) -> None:
    """One raw worker (spawned process): answer every task on its topic at once."""
    topics = Topics(RAW_ROOT)
    ref = WorkerRef(VOLUNTEER, f"w{index}")
    results_topic = topics.results(ref)
    prefix, suffix = result_template(ref.worker)
    client = raw_client(f"{RAW_ROOT}-{ref.worker}")

    def on_connect(c: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        set_nodelay(c)
        c.subscribe(topics.tasks(ref), 1)

    def on_subscribe(c: Any, userdata: Any, mid: Any, reasons: Any, props: Any) -> None:
        ready.set()

    def on_message(c: Any, userdata: Any, message: Any) -> None:
        c.publish(results_topic, prefix + task_id_of(message.payload) + suffix, qos=1)

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    client.connect(host, port, KEEPALIVE)
    client.loop_start()
    stop.wait()
    client.disconnect()
    client.loop_stop()


# --------------------------------------------------------------------------- requester
class _Round:
    """State of one series; touched only by the requester's network thread once started."""

    def __init__(self, count: int, first_id: int) -> None:
        self.count = count
        self.first_id = first_id
        self.payloads = [task_payload(str(first_id + i)) for i in range(count)]
        self.sent = [0.0] * count
        self.latency = [0.0] * count
        self.next = 0
        self.done = 0
        self.finished_at = 0.0
        self.finished = threading.Event()


class Requester:
    """The coordinator's stand-in: keeps a window of tasks outstanding over the workers."""

    def __init__(self, host: str, port: int, workers: int) -> None:
        topics = Topics(RAW_ROOT)
        refs = [WorkerRef(VOLUNTEER, f"w{i}") for i in range(workers)]
        self.task_topics = [topics.tasks(ref) for ref in refs]
        self.reply_to = {topics.results(ref): topics.tasks(ref) for ref in refs}
        self.round: _Round | None = None
        self.worker_pids: list[int] = []  # the worker processes it sends to (CPU accounting)
        self.client = raw_client(f"{RAW_ROOT}-requester")
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.connect(host, port, KEEPALIVE)
        set_nodelay(self.client)
        self.client.subscribe(topics.all_results, 1)
        self.client.loop_start()
        if not subscribed.wait(START_TIMEOUT):
            raise BenchError(f"the raw requester could not subscribe at {host}:{port}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def run(self, count: int, window: int, first_id: int) -> tuple[float, list[float]]:
        """Send ``count`` tasks keeping ``window`` outstanding; (seconds, latencies)."""
        rnd = _Round(count, first_id)
        self.round = rnd
        initial = min(window, count)
        rnd.next = initial  # set before the first answer can arrive; later only the callback moves it
        started = time.perf_counter()
        for i in range(initial):
            rnd.sent[i] = time.perf_counter()
            self.client.publish(self.task_topics[i % len(self.task_topics)], rnd.payloads[i], qos=1)
        if not rnd.finished.wait(PHASE_TIMEOUT):
            raise PhaseTimeout(f"raw baseline: {rnd.done} of {count} answers after {PHASE_TIMEOUT:.0f} s")
        return rnd.finished_at - started, rnd.latency

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        now = time.perf_counter()
        rnd = self.round
        if rnd is None:
            return
        i = int(task_id_of(message.payload)) - rnd.first_id
        if not 0 <= i < rnd.count:
            return  # a late answer of an earlier round
        rnd.latency[i] = now - rnd.sent[i]
        rnd.done += 1
        if rnd.next < rnd.count:
            j = rnd.next
            rnd.next += 1
            rnd.sent[j] = time.perf_counter()
            client.publish(self.reply_to[message.topic], rnd.payloads[j], qos=1)
        elif rnd.done == rnd.count:
            rnd.finished_at = now
            rnd.finished.set()


def _series(tasks: int, workers: int, window: int, seconds: float, latencies: list[float]) -> RoundTrip:
    typical_id = str(tasks)
    prefix, suffix = result_template("w0")
    return RoundTrip(tasks=tasks, workers=workers, window=window, seconds=round(seconds, 4),
                     tasks_per_s=round(tasks / seconds, 1), latency=Latency.of_seconds(latencies),
                     task_bytes=len(task_payload(typical_id)),
                     result_bytes=len(prefix + typical_id.encode() + suffix))


def measure(host: str, port: int, *, tasks: int, workers: int, window: int, latency_samples: int,
            broker_pid: int | None = None) -> RawFigures:
    """Start ``workers`` worker processes, then measure a windowed run and a window-1 run."""
    with _fleet(host, port, workers) as requester:
        groups = {"requester": [os.getpid()], "workers": requester.worker_pids}
        if broker_pid:
            groups["broker"] = [broker_pid]
        meter = CpuMeter(groups)
        meter.start()
        seconds, latencies = requester.run(tasks, window, first_id=1)
        cpu = meter.stop()
        throughput = replace(_series(tasks, workers, window, seconds, latencies),
                             cpu_ms_per_task=cpu.per_task_ms(tasks), cpu_busy=cpu.busy)
        single = None
        if latency_samples:
            seconds, latencies = requester.run(latency_samples, 1, first_id=tasks + 1)
            single = _series(latency_samples, workers, 1, seconds, latencies)
        return RawFigures(throughput, single)


def measure_window1(host: str, port: int, *, samples: int) -> RoundTrip:
    """The window-1 run alone (one round trip at a time goes to one worker: one is started),
    to bracket dockercomp's window-1 rounds (bench/run.py)."""
    with _fleet(host, port, 1) as requester:
        seconds, latencies = requester.run(samples, 1, first_id=1)
        return _series(samples, 1, 1, seconds, latencies)


@contextmanager
def _fleet(host: str, port: int, workers: int) -> Iterator[Requester]:
    """``workers`` worker processes, subscribed, and a requester for them; all stopped after."""
    ctx = multiprocessing.get_context("spawn")  # never fork next to paho's network thread
    stop = ctx.Event()
    readies = [ctx.Event() for _ in range(workers)]
    procs = [ctx.Process(target=worker_main, args=(host, port, i, readies[i], stop), daemon=True,
                         name=f"raw-worker-{i}") for i in range(workers)]
    for proc in procs:
        proc.start()
    requester: Requester | None = None
    try:
        deadline = time.monotonic() + START_TIMEOUT
        for i, ready in enumerate(readies):
            if not ready.wait(max(0.0, deadline - time.monotonic())):
                raise BenchError(f"raw worker {i} did not subscribe within {START_TIMEOUT:.0f} s "
                                 f"(alive: {procs[i].is_alive()})")
        requester = Requester(host, port, workers)
        requester.worker_pids = [p.pid for p in procs if p.pid]
        yield requester
    finally:
        if requester is not None:
            requester.close()
        stop.set()
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
