"""Prometheus metrics of a running coordinator (`dockercomp coordinator serve --metrics-port P`).

Two kinds, chosen for what they cost the engine:

- **Counters and histograms** the engine feeds as it works, never per message where a step
  will do: attempts closed (by outcome: the results and everything else that closes one),
  tasks dispatched, messages handled, engine step time, result latency. They are plain
  numbers only the engine's thread writes (no lock on its path; the scrape reads them), and
  each step's figures are held back until its transaction commits (``committed``): a
  rolled-back step is not counted, nor are its messages counted twice when handled again.
- **Gauges** (tasks and jobs by state, workers by state, capacity, in flight, rejections, up,
  info) cost the engine nothing: ``EngineCollector`` computes them when Prometheus scrapes,
  from the engine's in-memory mirrors (JobBook, WorkerRegistry, Leases, Rejections). The
  scrape runs in the HTTP server's thread; it copies each container in one C-level call
  (``list(d.values())``, ``dict(counts)``), which the GIL makes atomic, and never touches the
  store: the store's connection belongs to the engine's thread.

Labels stay bounded: states, outcomes and kinds are fixed enums. Per-job series
(``dockercomp_job_tasks``) exist only for ACTIVE jobs, so a coordinator that has run ten
thousand jobs exports the few it is working on, not ten thousand series that never change;
totals over every job are in ``dockercomp_tasks``. The label is ``job_name``, not ``job``:
Prometheus sets ``job`` on every series to the scrape job's name. No per-worker series: a
public project may have thousands of volunteers' workers; `dockercomp coordinator workers`
and the retained status topics show them one by one.

Each Coordinator has its own CollectorRegistry (tests run several in one process).
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from dockercomp.broker.defaults import PROTOCOL_VERSION
from dockercomp.coordinator import defaults
from dockercomp.coordinator.errors import SettingsError
from dockercomp.coordinator.status import Rejection
from dockercomp.coordinator.store import AttemptOutcome, Changes, JobState, TaskState, WorkerState

if TYPE_CHECKING:
    from dockercomp.coordinator.service import Coordinator

log = logging.getLogger(__name__)

NAMESPACE = "dockercomp"


class Buckets:
    """A histogram only the engine's thread writes: a bisect and two additions per value, no
    lock (prometheus_client's Histogram takes one per observe, several times the cost). A
    scrape copies the counts in one call and derives the count from them, so ``_count`` always
    equals the ``+Inf`` bucket; ``_sum`` may lag by the value being added."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = [*sorted(bounds), float("inf")]
        self.counts = [0] * len(self.bounds)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # first bound >= value: Prometheus' `le`
        self.total += value

    def observe_many(self, values: list[float]) -> None:
        """``observe`` for each value, in one call (a step's latencies: one per result)."""
        bounds, counts = self.bounds, self.counts
        for value in values:
            counts[bisect_left(bounds, value)] += 1
        self.total += sum(values)

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        counts, running, buckets = list(self.counts), 0, []
        for bound, n in zip(self.bounds, counts):
            running += n
            buckets.append((floatToGoString(bound), running))
        return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=self.total)


class EngineMetrics(Collector):
    """What the engine feeds (counters, histograms), exported by ``collect``; one per Coordinator.

    Plain numbers written by the engine's thread alone, read by the scrape: no locks on the
    engine's path. Counters are added once per step (``committed``), not per message."""

    def __init__(self) -> None:
        # Every outcome from the start: a series that appears only on its first event breaks
        # rate() and alerts written as `... > 0`.
        # (Not OPEN, nor UNVALIDATED: a replica's value awaiting its quorum is not closed yet.)
        self.closed: dict[str, int] = {o.value: 0 for o in AttemptOutcome
                                       if o not in (AttemptOutcome.OPEN, AttemptOutcome.UNVALIDATED)}
        self.dispatches = 0
        self.messages = 0
        self.steps = Buckets(defaults.METRICS_STEP_BUCKETS)
        self.latency = Buckets(defaults.METRICS_LATENCY_BUCKETS)
        self._pending: Counter[str] = Counter()  # this step's closings, until it commits
        self._latencies: list[float] = []

    # -- fed by the engine's thread -------------------------------------------------------------
    def closing(self, changes: Changes) -> None:
        """Ledger.flush: the attempts this flush closes (per flush, not per attempt)."""
        pending = self._pending
        if changes.ok_attempts:
            pending[AttemptOutcome.OK.value] += len(changes.ok_attempts)
        if changes.superseded_attempts:
            pending[AttemptOutcome.SUPERSEDED.value] += len(changes.superseded_attempts)
        if changes.invalid_attempts:
            pending[AttemptOutcome.INVALID.value] += len(changes.invalid_attempts)
        for _, outcome, _ in changes.closed_attempts:
            pending[outcome] += 1

    def committed(self, dispatched: int) -> None:
        """The step's transaction committed: its figures count."""
        self.dispatches += dispatched
        if self._pending:
            closed = self.closed
            for outcome, n in self._pending.items():
                closed[outcome] = closed.get(outcome, 0) + n
            self._pending.clear()
        if self._latencies:
            self.latency.observe_many(self._latencies)
            self._latencies.clear()

    def rolled_back(self) -> None:
        """The step's transaction failed: what it decided did not happen."""
        self._pending.clear()
        self._latencies.clear()

    def stepped(self, messages: int, seconds: float) -> None:
        self.messages += messages
        self.steps.observe(seconds)

    # -- read by the scrape's thread ------------------------------------------------------------
    def collect(self) -> Iterator[Metric]:
        prefix = f"{NAMESPACE}_"
        closed = CounterMetricFamily(f"{prefix}attempts_closed", "Attempts closed, by final outcome: "
                                     "ok/error/timeout/crashed/rejected are workers' results; expired, lost, "
                                     "cancelled, superseded, invalid are closed by the coordinator.",
                                     labels=["outcome"])
        for outcome, n in list(self.closed.items()):
            closed.add_metric([outcome], n)
        yield closed
        yield CounterMetricFamily(f"{prefix}dispatches", "Task messages sent to workers (attempts opened).",
                                  value=self.dispatches)
        yield CounterMetricFamily(f"{prefix}messages", "Messages from the broker handled by the engine "
                                  "(presence, results, nudges).", value=self.messages)
        yield self.steps.family(f"{prefix}engine_step_seconds", "Wall time of one engine step (one transaction).")
        yield self.latency.family(f"{prefix}result_latency_seconds", "From a task message sent to its result "
                                  "handled by the engine, for results that close their open attempt.")


_T = TypeVar("_T")


def _copy(values: Callable[[], Iterable[_T]]) -> list[_T]:
    """A list of a container the engine may be resizing: retried on the rare race."""
    for _ in range(defaults.METRICS_COPY_TRIES):
        try:
            return list(values())
        except RuntimeError:  # "changed size during iteration"
            continue
    return []


class EngineCollector(Collector):
    """The gauges, computed at scrape time from the engine's memory (see the module's doc)."""

    def __init__(self, coordinator: "Coordinator") -> None:
        self.coordinator = coordinator

    def collect(self) -> Iterator[Metric]:
        engine = self.coordinator
        prefix = f"{NAMESPACE}_"
        info = InfoMetricFamily(f"{prefix}coordinator", "This coordinator (URLs are left out: they may "
                                "hold passwords).")
        info.add_metric([], {"version": str(engine._identity["version"]), "host": str(engine._identity["host"]),
                             "protocol": str(PROTOCOL_VERSION)})
        yield info
        yield GaugeMetricFamily(f"{prefix}coordinator_up", "1 while the engine runs with its state loaded.",
                                value=1.0 if engine.running and not engine._needs_reload else 0.0)
        yield GaugeMetricFamily(f"{prefix}broker_connected", "1 while the coordinator is connected to the broker.",
                                value=1.0 if engine.transport.connected else 0.0)
        yield GaugeMetricFamily(f"{prefix}coordinator_start_time_seconds", "When this coordinator started "
                                "(seconds since the epoch).", value=engine.started)

        jobs = _copy(engine.jobs.by_id.values)
        tasks: Counter[str] = Counter()
        job_states: Counter[str] = Counter()
        per_job = GaugeMetricFamily(f"{prefix}job_tasks", "Tasks of each ACTIVE job by state (finished jobs "
                                    "drop out: see dockercomp_tasks for totals).", labels=["job_name", "state"])
        for job in jobs:
            counts = dict(job.counts)
            tasks.update(counts)
            job_states[job.state] += 1
            if job.state == JobState.ACTIVE.value:
                for state in TaskState:
                    per_job.add_metric([job.name, state.value], counts.get(state.value, 0))
        yield _by_state(f"{prefix}tasks", "Tasks of every job by state.", tasks, TaskState)
        yield per_job
        yield _by_state(f"{prefix}jobs", "Jobs by state.", job_states, JobState)

        workers = _copy(engine.workers.by_id.values)
        yield _by_state(f"{prefix}workers", "Workers by state.", Counter(w.state for w in workers), WorkerState)
        online = WorkerState.ONLINE.value
        yield GaugeMetricFamily(f"{prefix}capacity", "Tasks the online workers may run at once (as granted).",
                                value=sum(w.capacity for w in workers if w.state == online))
        yield GaugeMetricFamily(f"{prefix}in_flight", "Open attempts (tasks sent, no answer yet).",
                                value=len(engine.leases))
        rejected = CounterMetricFamily(f"{prefix}rejections", "Messages rejected, by kind (status.Rejection).",
                                       labels=["kind"])
        counts = engine.rejections.counts
        for kind in Rejection:
            rejected.add_metric([kind.value], counts.get(kind.value, 0))
        yield rejected


def _by_state(name: str, documentation: str, counts: Counter[str], states: Iterable[Any]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=["state"])
    for state in states:
        family.add_metric([state.value], counts.get(state.value, 0))
    return family


class MetricsServer:
    """`/metrics` over HTTP for one coordinator, in a thread of prometheus_client's. Made
    before the coordinator starts: it hooks itself into the engine (``Coordinator.metrics``,
    ``Ledger.on_flush``), which the engine's thread then feeds."""

    def __init__(self, coordinator: "Coordinator", host: str = defaults.METRICS_HOST, port: int = 0) -> None:
        self.registry = CollectorRegistry()
        self.metrics = EngineMetrics()
        self.registry.register(self.metrics)
        self.registry.register(EngineCollector(coordinator))
        # The process's own figures (CPU, memory, open files, GC): Prometheus users expect them.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.host = host
        self.requested_port = port
        self.port = port
        self._server: WSGIServer | None = None
        coordinator.metrics = self.metrics
        coordinator.ledger.on_flush = self.metrics.closing
        coordinator.ledger.latencies = self.metrics._latencies  # the ledger feeds the step's list

    def start(self) -> "MetricsServer":
        try:
            self._server, _ = start_http_server(self.requested_port, self.host, self.registry)
        except OSError as exc:
            error = SettingsError(f"cannot serve metrics on {self.host}:{self.requested_port}: "
                                  f"{exc.strerror or exc}")
            error.hint = "choose another --metrics-port (0 picks a free one) or --metrics-host"
            raise error from exc
        self.port = self._server.server_port
        log.info("metrics at %s", self.url)
        return self

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

