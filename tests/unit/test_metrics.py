"""The Prometheus collector and counters over the in-memory store and broker (no sockets: the
registry is rendered without its HTTP server), on a fake clock. The real `serve --metrics-port`
over HTTP with real agents is tests/system/test_metrics.py."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dockercomp.broker.memory import MemoryBroker
from dockercomp.broker.messages import Outcome, Result, TaskError
from dockercomp.broker.topics import Topics
from dockercomp.coordinator.metrics import Buckets, MetricsServer
from dockercomp.coordinator.service import Coordinator, CoordinatorSettings
from dockercomp.coordinator.store import Changes, Store
from tests.support import FakeClock
from tests.support.agents import FakeAgent

TOPICS = Topics()
SETTINGS = CoordinatorSettings(lease_margin=5, connect_timeout=1)


def samples(server: MetricsServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(server.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def run(coordinator: Coordinator, clock: FakeClock, times: int = 6) -> None:
    for _ in range(times):
        clock.now += 0.5
        coordinator.step()


def test_counters_and_gauges_follow_the_engine() -> None:
    broker, clock = MemoryBroker(), FakeClock()
    store = Store.open("memory://")
    coordinator = Coordinator(store, broker.connect("coordinator"), TOPICS, SETTINGS, clock)
    server = MetricsServer(coordinator)  # not started: no socket in a unit test
    coordinator.open()
    fails = lambda task: TaskError("ValueError", "no") if task.args == [0, 0] else None  # noqa: E731
    FakeAgent(broker.connect("agent"), "w1", fail_with=fails).start()
    job = store.create_job("add", [[1, 2], [3, 4], [0, 0]], name="sums", max_attempts=2)
    run(coordinator, clock)

    # When: a forged result and one for an unknown task arrive
    bad = FakeAgent(broker.connect("bad"), "w2", auto=False).start()
    run(coordinator, clock, 2)
    bad.send(Result("999999", 1, "w2", "local", Outcome.OK, 1, None, 0.01, nonce="x" * 22).encode())
    first_task = str(min(store.task_ids(job.id, ["done"])))
    bad.send(Result(first_task, 7, "w2", "local", Outcome.OK, 1, None, 0.01, nonce="x" * 22).encode())
    run(coordinator, clock, 2)

    got = samples(server)
    progress = store.progress(job)
    assert (progress.done, progress.failed) == (2, 1)
    assert got[("dockercomp_tasks", (("state", "done"),))] == 2
    assert got[("dockercomp_tasks", (("state", "failed"),))] == 1
    assert got[("dockercomp_jobs", (("state", "failed"),))] == 1
    assert got[("dockercomp_attempts_closed_total", (("outcome", "ok"),))] == 2
    assert got[("dockercomp_attempts_closed_total", (("outcome", "error"),))] == 2  # max_attempts=2
    assert got[("dockercomp_dispatches_total", ())] == 4
    assert got[("dockercomp_result_latency_seconds_count", ())] == 4
    assert got[("dockercomp_rejections_total", (("kind", "unknown"),))] == 1
    assert got[("dockercomp_rejections_total", (("kind", "forged"),))] == 1
    assert got[("dockercomp_workers", (("state", "online"),))] == 2
    assert got[("dockercomp_in_flight", ())] == 0
    assert got[("dockercomp_engine_step_seconds_count", ())] >= 10
    assert got[("dockercomp_broker_connected", ())] == 1
    # The job finished: it has no per-job series any more
    assert not [key for key in got if key[0] == "dockercomp_job_tasks"]
    coordinator.close()


def test_per_job_series_exist_only_while_a_job_is_active() -> None:
    broker, clock = MemoryBroker(), FakeClock()
    store = Store.open("memory://")
    coordinator = Coordinator(store, broker.connect("coordinator"), TOPICS, SETTINGS, clock)
    server = MetricsServer(coordinator)
    coordinator.open()
    agent = FakeAgent(broker.connect("agent"), "w1", capacity=1, auto=False).start()
    store.create_job("add", [[1, 2], [3, 4]], name="slow")
    run(coordinator, clock)

    got = samples(server)
    assert got[("dockercomp_job_tasks", (("job_name", "slow"), ("state", "assigned")))] == 1
    assert got[("dockercomp_job_tasks", (("job_name", "slow"), ("state", "pending")))] == 1
    assert got[("dockercomp_in_flight", ())] == 1

    while agent.answer_held():
        run(coordinator, clock, 2)
    got = samples(server)
    assert not [key for key in got if key[0] == "dockercomp_job_tasks"]
    assert got[("dockercomp_tasks", (("state", "done"),))] == 2
    coordinator.close()


def test_a_rolled_back_step_counts_nothing() -> None:
    store = Store.open("memory://")
    coordinator = Coordinator(store, MemoryBroker().connect("coordinator"), TOPICS, SETTINGS, FakeClock())
    server = MetricsServer(coordinator)
    changes = Changes()
    changes.ok_attempts.append(1)
    server.metrics.closing(changes)
    server.metrics.rolled_back()
    server.metrics.committed(0)
    assert samples(server)[("dockercomp_attempts_closed_total", (("outcome", "ok"),))] == 0


def test_buckets_count_a_value_in_the_first_bucket_whose_bound_it_does_not_exceed() -> None:
    buckets = Buckets((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 7.0):
        buckets.observe(value)
    family = buckets.family("x_seconds", "x")
    got = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    assert got[("x_seconds_bucket", "0.1")] == 2  # Prometheus' `le`: 0.1 itself is in it
    assert got[("x_seconds_bucket", "1.0")] == 4
    assert got[("x_seconds_bucket", "+Inf")] == got[("x_seconds_count", None)] == 5
    assert got[("x_seconds_sum", None)] == 8.65


def test_a_steps_latencies_observed_at_once_count_as_one_by_one() -> None:
    values = [0.05, 0.1, 0.5, 1.0, 7.0, 0.0]
    one, many = Buckets((0.1, 1.0)), Buckets((0.1, 1.0))
    for value in values:
        one.observe(value)
    many.observe_many(values)
    assert (many.counts, many.total) == (one.counts, one.total)


def test_a_tasks_latency_starts_when_its_dispatch_round_does_not_when_its_step_began() -> None:
    # The bench's window-1 figure and the latency histogram span dispatch -> result, as the
    # raw baseline's does: the step's handling of the results that freed the slot (made slow
    # here: the ledger's flush takes 0.25 s of the fake clock) is not part of the next task's.
    broker, clock = MemoryBroker(), FakeClock()
    store = Store.open("memory://")
    coordinator = Coordinator(store, broker.connect("coordinator"), TOPICS, SETTINGS, clock)
    coordinator.open()
    flush = coordinator.ledger.flush

    def slow_flush(now: float) -> None:
        flush(now)
        clock.now += 0.25

    coordinator.ledger.flush = slow_flush  # type: ignore[method-assign]
    agent = FakeAgent(broker.connect("agent"), "w1", capacity=1, auto=False).start()
    job = store.create_job("add", [[1, 2], [3, 4]])
    run(coordinator, clock, 2)
    [first] = agent.received
    agent.answer(first)
    clock.now += 0.5
    handled_at = clock.now
    coordinator.step()  # handles the result, then sends the second task to the freed slot

    [_, second] = agent.received
    [(_, [answered]), (_, [sent])] = [store.attempts(job, index) for index in (0, 1)]
    assert (answered.finished_at, sent.sent_at) == (handled_at, handled_at + 0.25)
    assert second.task_id != first.task_id
