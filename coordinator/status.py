"""Status for observers: retained topics with the overall picture, each job and each worker,
plus the counters of rejected messages and the recent throughput that feed them.

Payloads are compact JSON (``broker.messages.encode_status``); their fields are documented in
docs/protocol.md ("Status topics"). They are published at most every ``interval`` seconds and
only for what changed since the last publication, never once per message.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from itertools import islice
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable, Iterable

from dockercomp.broker.connection import Transport
from dockercomp.broker.errors import BrokerError
from dockercomp.broker.messages import encode_status
from dockercomp.broker.topics import Topics
from dockercomp.coordinator.defaults import (RATE_WINDOW, REJECT_LOG_BURST, REJECT_LOG_WINDOW, STATUS_INTERVAL,
                                             STATUS_REFRESH, WORKER_STATUS_BURST)
from dockercomp.coordinator.store import JobState, TaskState, WorkerState

if TYPE_CHECKING:
    from dockercomp.coordinator.dispatch import JobInfo
    from dockercomp.coordinator.registry import WorkerSlot

log = logging.getLogger(__name__)


class Rejection(str, Enum):
    MALFORMED = "malformed"  # not a valid message: bad JSON, missing field, wrong version, too big
    MISMATCH = "mismatch"  # the payload names another worker than the topic it came on
    UNKNOWN = "unknown"  # a result for a task that does not exist
    FOREIGN = "foreign"  # a result from a worker that never held that attempt
    FORGED = "forged"  # a result without its attempt's nonce: for an attempt never sent, or a guess
    DUPLICATE = "duplicate"  # another result for a task that already has its accepted result
    LATE = "late"  # an answer for a closed attempt that cannot count (a failure, or the task is over)
    STALE = "stale"  # a presence older than the worker's current connection (a stale will)


class Rejections:
    """Counts every rejected message by kind and logs them, at most ``burst`` lines per kind
    per ``window`` seconds; the rest are summarized in one line when the window ends."""

    def __init__(self, burst: int = REJECT_LOG_BURST, window: float = REJECT_LOG_WINDOW,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.counts: Counter[str] = Counter()
        self._burst = burst
        self._window = window
        self._clock = clock
        self._logged: dict[str, tuple[float, int, int]] = {}  # kind -> (window start, logged, suppressed)

    def reject(self, kind: Rejection, source: str, detail: str, level: int = logging.WARNING) -> None:
        self.counts[kind.value] += 1
        now = self._clock()
        start, logged, suppressed = self._logged.get(kind.value, (now, 0, 0))
        if now - start >= self._window:
            if suppressed:
                log.warning("%d more %s message(s) ignored in the last %.0f s (not logged)",
                            suppressed, kind.value, now - start)
            start, logged, suppressed = now, 0, 0
        if logged < self._burst:
            log.log(level, "ignored %s message from %s: %s", kind.value, source, detail)
            logged += 1
        else:
            suppressed += 1
        self._logged[kind.value] = (start, logged, suppressed)

    def snapshot(self) -> dict[str, int]:
        return {kind.value: self.counts.get(kind.value, 0) for kind in Rejection}


class RateMeter:
    """Tasks finished per second over the last ``window`` seconds."""

    def __init__(self, window: float = RATE_WINDOW) -> None:
        self._window = window
        self._events: deque[tuple[float, int]] = deque()
        self._total = 0
        self._started: float | None = None

    def record(self, n: int, now: float) -> None:
        if self._started is None:
            self._started = now
        if n:
            self._events.append((now, n))
            self._total += n

    def rate(self, now: float) -> float:
        while self._events and self._events[0][0] <= now - self._window:
            self._total -= self._events.popleft()[1]
        if self._started is None or not self._total:
            return 0.0
        span = min(self._window, max(now - self._started, 1.0))
        return round(self._total / span, 1)


def job_status(job: "JobInfo", now: float) -> dict[str, Any]:
    counts = job.counts
    return {
        "id": job.id, "name": job.name, "function": job.function, "state": job.state, "total": job.total,
        **{state.value: counts[state.value] for state in TaskState},
        "created_at": job.created_at, "finished_at": job.finished_at, "updated": round(now, 3),
    }


def worker_status(worker: "WorkerSlot", in_flight: int, now: float) -> dict[str, Any]:
    return {
        "worker": worker.ref.worker, "volunteer": worker.ref.volunteer, "state": worker.state,
        "capacity": worker.capacity, "prefetch": worker.prefetch, "in_flight": in_flight,
        "done": worker.done, "failed": worker.failed, "rejected": worker.rejected,
        "functions": sorted(worker.functions), "host": worker.host, "version": worker.version,
        "last_seen": worker.last_seen, "lost_at": worker.lost_at, "updated": round(now, 3),
    }


def summary_status(workers: Iterable["WorkerSlot"], jobs: Iterable["JobInfo"], in_flight: int,
                   rejected: dict[str, int], rate: float, started: float, now: float,
                   census: tuple[Counter[str], int] | None = None) -> dict[str, Any]:
    """``census``: (workers per state, online capacity) when the caller keeps it
    (WorkerRegistry.census); ``workers`` is then not read."""
    if census is None:
        census = worker_census(workers)
    worker_states, online_capacity = census
    tasks: Counter[str] = Counter()
    job_states: Counter[str] = Counter()
    for job in jobs:
        job_states[job.state] += 1
        tasks.update(job.counts)
    return {
        "workers": {state.value: worker_states.get(state.value, 0) for state in WorkerState},
        "capacity": online_capacity, "in_flight": in_flight,
        "tasks": {state.value: tasks.get(state.value, 0) for state in TaskState},
        "jobs": {state.value: job_states.get(state.value, 0) for state in JobState},
        "rate": rate, "rejected": rejected, "started": started, "updated": round(now, 3),
    }


def worker_census(workers: Iterable["WorkerSlot"]) -> tuple[Counter[str], int]:
    """Workers per state, and the capacity of the online ones."""
    states: Counter[str] = Counter()
    online_capacity = 0
    for worker in workers:
        states[worker.state] += 1
        if worker.state == WorkerState.ONLINE.value:
            online_capacity += worker.capacity
    return states, online_capacity


class StatusPublisher:
    """Remembers what changed and publishes it, retained, at most every ``interval`` seconds."""

    def __init__(self, topics: Topics, interval: float = STATUS_INTERVAL, burst: int = WORKER_STATUS_BURST,
                 refresh: float = STATUS_REFRESH) -> None:
        self.topics = topics
        self.interval = interval
        self.refresh = refresh  # the summary and active jobs again after this long, changed or not
        self._refreshed = float("-inf")
        self.burst = burst  # worker statuses per publication at most
        self._jobs: set[int] = set()
        # Changed workers in the order they first changed (a dict as an ordered set).
        self._workers: dict[int, None] = {}
        self._summary = True
        self._last = float("-inf")

    def job_changed(self, job_id: int) -> None:
        self._jobs.add(job_id)
        self._summary = True

    def worker_changed(self, worker_id: int) -> None:
        self._workers[worker_id] = None
        self._summary = True

    def summary_changed(self) -> None:
        self._summary = True

    def everything_changed(self, job_ids: Iterable[int], worker_ids: Iterable[int]) -> None:
        self._jobs.update(job_ids)
        self._workers.update(dict.fromkeys(worker_ids))
        self._summary = True

    @property
    def pending(self) -> bool:
        return self._summary or bool(self._jobs) or bool(self._workers)

    def due(self, now: float) -> bool:
        return (self.pending or now - self._refreshed >= self.refresh) and now - self._last >= self.interval

    def next_due(self) -> float:
        return max(self._last + self.interval, self._refreshed + self.refresh) if not self.pending \
            else self._last + self.interval

    def publish(self, transport: Transport, workers: dict[int, "WorkerSlot"], jobs: dict[int, "JobInfo"],
                in_flight: Callable[[int], int], summary: Callable[[], dict[str, Any]], now: float) -> None:
        self._last = now
        job_ids, self._jobs = self._jobs, set()
        if now - self._refreshed >= self.refresh:
            self._refreshed = now
            job_ids |= {job_id for job_id, job in jobs.items() if job.active}
        worker_ids = list(islice(self._workers, self.burst))
        for worker_id in worker_ids:
            del self._workers[worker_id]
        self._summary = False
        try:
            for job_id in sorted(job_ids):
                job = jobs.get(job_id)
                if job is not None:
                    transport.publish(self.topics.status_job(str(job.id)), encode_status(job_status(job, now)),
                                      qos=1, retain=True)
            for worker_id in worker_ids:
                worker = workers.get(worker_id)
                if worker is None:
                    continue
                topic = self.topics.status_worker(worker.ref)
                if worker.state == WorkerState.PURGED.value:
                    transport.publish(topic, b"", qos=1, retain=True)  # forget it, as its presence
                else:
                    transport.publish(topic, encode_status(worker_status(worker, in_flight(worker.id), now)),
                                      qos=1, retain=True)
            transport.publish(self.topics.status_summary, encode_status(summary()), qos=1, retain=True)
        except BrokerError as exc:
            # Not connected: everything is published again on the next connection.
            log.warning("status not published: %s", exc)
