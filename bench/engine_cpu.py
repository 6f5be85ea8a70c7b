"""The coordinator engine's CPU per task, alone: `python -m bench.engine_cpu [--tasks N] [--metrics]`.

A targeted measurement for tuning the engine thread (the ledger, the store's writes, status,
metrics hooks), without the noise of real agents and a broker sharing two cores: the real
Coordinator on a SQLite file (or the store at ``--db URL``, e.g. PostgreSQL), fed by a transport that only records what it publishes;
simulated workers answer every task message with a result (built outside the measured time)
that the next step takes from the inbox, as the network thread would have put it there.
Only ``Coordinator.step`` is timed, in CPU seconds of the engine's thread.

``--profile`` prints cProfile's top functions of the measured steps. ``--metrics`` hooks
the /metrics counters in (as `serve --metrics-port` does) without serving them.
``--workers 50000 --per-volunteer 50 --in-flight 1`` is the bench's big fleet (its
registration is stepped through before the job, not measured); ``--replicas 2`` runs a
replicated job of as many results; ``--batch 100`` has the workers take TaskBatch messages
as agents do.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dockercomp.broker.batches import Batch, read_tasks
from dockercomp.broker.connection import Transport
from dockercomp.broker.messages import Outcome, Presence, PresenceState, Result, Task
from dockercomp.broker.topics import Topics, WorkerRef
from dockercomp.coordinator.replication import Replication
from dockercomp.coordinator.service import Coordinator, CoordinatorSettings
from dockercomp.coordinator.store import Store

VOLUNTEER = "bench"


class RecordingTransport(Transport):
    """Always connected; publishing only records (the engine's side of the wire, minus paho)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def start(self) -> None:
        if self.on_connect is not None:
            self.on_connect()

    def wait_connected(self, timeout: float) -> None:
        return None

    @property
    def connected(self) -> bool:
        return True

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        return None

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.sent.append((topic, payload))

    def publish_many(self, messages: list[tuple[str, bytes]], qos: int = 1) -> list[tuple[str, str]]:
        self.sent += messages
        return []

    def flush(self, timeout: float) -> bool:
        return True

    def close(self, timeout: float = 5.0) -> None:
        return None


def measure(tasks: int, workers: int, in_flight: int, chunk: int, metrics: bool, profile: bool,
            workdir: Path, sort: str = "tottime", vary: bool = False, db: str | None = None,
            per_volunteer: int | None = None, replicas: int = 1, batch: int = 0) -> dict[str, Any]:
    topics = Topics()
    transport = RecordingTransport()
    store = Store.open(db or str(workdir / "engine.db"))
    coordinator = Coordinator(store, transport, topics, CoordinatorSettings(connect_timeout=1))
    if metrics:
        from dockercomp.coordinator.metrics import MetricsServer

        MetricsServer(coordinator)  # hooks the counters in; the HTTP server is not started
    coordinator.open()
    capacity = min(in_flight, 2)
    refs = {}
    for i in range(workers):
        # One volunteer for all by default; a big fleet needs many (a volunteer's share is capped).
        volunteer = VOLUNTEER if per_volunteer is None else f"{VOLUNTEER}{i // per_volunteer:05d}"
        ref = WorkerRef(volunteer, f"w{i}")
        refs[topics.tasks(ref)] = ref
        presence = Presence(ref.worker, volunteer, PresenceState.ONLINE, 1, None, host="bench", version="0",
                            cpus=2, capacity=capacity, functions=("noop",), started=time.time(),
                            prefetch=in_flight - capacity, batch=batch)
        coordinator._on_message(topics.presence(ref), presence.encode(), False)
    while not coordinator._inbox.empty():  # a step takes batch_max messages: register them all first
        coordinator.step()
    coordinator.step()
    replication = Replication.make(replicas)  # quorum = replicas
    job = store.create_job("noop", [[] for _ in range(tasks // replicas)], replication=replication)
    coordinator._nudged = True
    waiting: list[tuple[str, bytes]] = []
    rng = random.Random(14)
    cpu = wall = 0.0
    steps = messages = 0
    profiler = cProfile.Profile() if profile else None
    while True:
        transport.sent.clear()
        if profiler is not None:
            profiler.enable()
        c0, w0 = time.thread_time(), time.perf_counter()
        coordinator.step()
        cpu += time.thread_time() - c0
        wall += time.perf_counter() - w0
        if profiler is not None:
            profiler.disable()
        steps += 1
        for topic, payload in transport.sent:
            ref = refs.get(topic)
            if ref is None:
                continue
            messages += 1
            message = read_tasks(payload)
            for task in message.items if isinstance(message, Batch) else (message,):
                assert isinstance(task, Task)
                result = Result(task.task_id, task.attempt, ref.worker, ref.volunteer, Outcome.OK, None, None,
                                0.001, nonce=task.nonce)
                waiting.append((topics.results(ref), result.encode()))
        if not waiting and coordinator.jobs.by_id[job.id].state != "active":
            break
        if not waiting and steps > tasks * 4:
            raise RuntimeError("the engine stopped dispatching")
        # The network thread's share of the inbox: up to `chunk` results per step (from 1 to
        # 2 x chunk when varied: real steps differ in size, and so do their statements' texts).
        take = rng.randint(1, 2 * chunk) if vary else chunk
        for topic, payload in waiting[:take]:
            coordinator._on_message(topic, payload, False)
        del waiting[:take]
    done = store.progress(job).done
    coordinator.close()
    if profiler is not None:
        pstats.Stats(profiler, stream=sys.stderr).sort_stats(sort).print_stats(40)
    return {"tasks": tasks, "replicas": replicas, "batch": batch, "task_messages": messages, "done": done,
            "steps": steps, "metrics": metrics, "vary": vary,
            "store": "sqlite" if db is None else db.split(":", 1)[0],
            "cpu_ms_per_task": round(1000 * cpu / tasks, 4), "wall_ms_per_task": round(1000 * wall / tasks, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--per-volunteer", type=int, help="workers per volunteer [default: all on one]")
    parser.add_argument("--replicas", type=int, default=1, help="replicas (and quorum) per task: tasks / "
                        "replicas tasks, as many results [default: 1]")
    parser.add_argument("--batch", type=int, default=0, help="tasks per message the workers take "
                        "(as agents announce; 0: single Task messages) [default: 0]")
    parser.add_argument("--in-flight", type=int, default=25, help="tasks each worker holds (capacity + prefetch)")
    parser.add_argument("--chunk", type=int, default=50, help="results the engine takes per step")
    parser.add_argument("--vary", action="store_true", help="results per step drawn from 1 to 2 x chunk")
    parser.add_argument("--metrics", action="store_true")
    parser.add_argument("--db", help="store URL (e.g. an empty postgresql://... database; "
                                     "wall_ms_per_task then includes its round trips) [default: a SQLite file]")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions (stderr)")
    parser.add_argument("--sort", default="tottime", choices=("tottime", "cumulative"), help="profile order")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dockercomp-engine-cpu-") as workdir:
        figures = measure(args.tasks, args.workers, args.in_flight, args.chunk, args.metrics, args.profile,
                          Path(workdir), args.sort, args.vary, args.db,
                          args.per_volunteer, args.replicas, args.batch)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
