"""Several broker URLs (issue 15): a connection tries the next node of its list when one fails,
over real brokers. Two independent brokers are not a cluster (nothing is shared between them),
so these tests show the failover of the transport, the agent and the coordinator; the cluster
end to end is in the RabbitMQ tests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dockercomp.broker.connection import MqttConnection
from dockercomp.broker.processes import AmqttProcess, BrokerProcess, MosquittoProcess
from dockercomp.broker.settings import BrokerSettings
from dockercomp.broker.topics import Topics
from dockercomp.coordinator.service import Coordinator, coordinator_client_id
from dockercomp.coordinator.store import JobProgress, Store
from tests.support import free_port, wait_until
from tests.support.agents import FakeAgent
from tests.support.processes import FAST, Processes, finished, online

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def second(broker: BrokerProcess, tmp_path: Path) -> Iterator[BrokerProcess]:
    """Another broker of the same kind as `broker`, on its own port and directory."""
    other = (MosquittoProcess if isinstance(broker, MosquittoProcess) else AmqttProcess)(tmp_path / "second")
    other.start()
    try:
        yield other
    finally:
        other.stop()


def connection(url: str, client_id: str) -> MqttConnection:
    transport = MqttConnection(BrokerSettings.from_url(url), client_id)
    transport.start()
    return transport


def answering_until_finished(agent: FakeAgent, store: Store, job: Any, timeout: float = 30) -> JobProgress:
    """Answers every task resent to ``agent`` until ``job`` is finished; returns its progress.
    How many come back is not fixed: the counts asserted after it say nothing was lost or doubled."""
    def answered_and_finished() -> JobProgress | None:
        agent.answer_held()
        progress = store.progress(job)
        return progress if progress.state != "active" else None
    return wait_until(answered_and_finished, timeout=timeout, interval=0.05)


def test_a_dead_first_url_is_skipped_for_the_live_second(broker: BrokerProcess) -> None:
    dead = free_port()
    received = threading.Event()
    transport = MqttConnection(BrokerSettings.from_url(f"mqtt://127.0.0.1:{dead},{broker.url}"), "listed")
    transport.on_message = lambda topic, payload, retained: received.set()
    transport.subscribe("failover/echo", 1)
    transport.start()
    try:
        transport.wait_connected(10)
        transport.publish("failover/echo", b"hello", qos=1)
        assert received.wait(10)
    finally:
        transport.close(1)


def test_a_closed_may_connect_gate_holds_every_connection_attempt_back(broker: BrokerProcess) -> None:
    # What keeps a deposed coordinator, woken from a freeze, from taking the shared MQTT session
    # back from the standby that replaced it (coordinator/service.py sets it to Leader.fresh).
    gate = threading.Event()
    transport = MqttConnection(BrokerSettings.from_url(broker.url), "gated")
    transport.may_connect = gate.is_set
    transport.start()
    try:
        time.sleep(1.0)  # ten looks at the gate
        assert not transport.connected
        gate.set()
        transport.wait_connected(10)
        gate.clear()
        transport.drop()  # the connection is lost: no reconnection while the gate is closed
        time.sleep(1.5)
        assert not transport.connected
        gate.set()
        transport.wait_connected(10)
    finally:
        transport.close(1)


def test_agent_and_coordinator_fail_over_to_the_second_broker_and_the_job_finishes(
        broker: BrokerProcess, second: BrokerProcess, procs: Processes, tmp_path: Path) -> None:
    both = f"{broker.url},{second.url}"
    procs.broker_url = both
    coordinator = Coordinator.connect(both, str(tmp_path / "coordinator.db"), FAST).start()
    try:
        store = coordinator.store
        procs.agent("w1")
        online(store, 1)
        job = store.create_job("sleep", [[0.2]] * 40, timeout=30)
        wait_until(lambda: store.progress(job).done >= 5, timeout=30)

        broker.kill()  # the first node dies: both reconnect to the second
        progress = finished(store, job, timeout=60)

        assert (progress.done, progress.failed) == (40, 0)
        assert "connected to mqtt://127.0.0.1:%d" % second.port in procs.log("w1")
        store.bind()
        per_task = store.db.execute_sql(
            "SELECT count(*) FROM result r JOIN task t ON t.id = r.task_id WHERE t.job_id = ?", (job.id,)).fetchone()
        assert per_task[0] == 40  # one accepted result each: nothing counted twice
    finally:
        coordinator.stop()


def test_agent_run_takes_a_repeated_broker_option_and_skips_the_dead_node(
        engine: Coordinator, broker: BrokerProcess, procs: Processes) -> None:
    dead = f"mqtt://127.0.0.1:{free_port()}"
    procs.start("w2", ["dockercomp.agent.cli", "run", "--broker", dead, "--broker", broker.url, "--worker-id", "w2",
                       "--concurrency", "1", "--keepalive", "2", "--health-file", str(procs.logs / "w2.health")])
    (worker,) = online(engine.store, 1)
    assert worker.name == "w2"
    job = engine.store.create_job("add", [[1, 2]], timeout=30)
    assert finished(engine.store, job, timeout=30).done == 1


def test_results_published_while_the_coordinator_is_disconnected_are_not_lost_nor_counted_twice(
        broker: BrokerProcess, tmp_path: Path) -> None:
    settings = BrokerSettings.from_url(broker.url)
    # Reconnects 3 s after a drop: the results below are published while it is away.
    slow = MqttConnection(settings, coordinator_client_id(settings.root), persistent=True,
                          backoff=lambda: iter([3.0] * 100))
    engine = Coordinator(Store.open(str(tmp_path / "c.db")), slow, Topics(settings.root), FAST).start()
    agent = FakeAgent(connection(broker.url, "holder"), "holder", auto=False, capacity=4)
    try:
        agent.transport.wait_connected(10)
        agent.announce()
        job = engine.store.create_job("add", [[i, 1] for i in range(4)], timeout=60)
        wait_until(lambda: len(agent.held) == 4, timeout=20)

        slow.drop()  # the coordinator's connection breaks (no DISCONNECT): the broker keeps its session
        wait_until(lambda: not slow.connected, timeout=5)
        time.sleep(0.5)  # the broker has seen the socket close before the results come
        assert agent.answer_held() == 4
        if isinstance(broker, AmqttProcess):
            # amqtt queues nothing for an anonymous client: the coordinator resends the open
            # attempts to the worker that answers its rebirth request, and it answers again.
            # Under load amqtt may still deliver some of the four, so how many come back varies.
            progress = answering_until_finished(agent, engine.store, job)
        else:
            progress = finished(engine.store, job, timeout=30)
    finally:
        engine.stop()
        agent.transport.close(1)

    assert (progress.done, progress.failed) == (4, 0)
    engine.store.bind()
    attempts = engine.store.db.execute_sql("SELECT count(*) FROM attempt").fetchone()[0]
    assert attempts == 4  # none reissued
    assert engine.rejections.counts["duplicate"] == 0 and engine.error is None
    if isinstance(broker, MosquittoProcess):
        assert len(agent.received) == 4  # nothing had to be sent again


def test_a_coordinator_started_after_one_was_killed_gets_the_results_published_in_between(
        broker: BrokerProcess, procs: Processes, tmp_path: Path) -> None:
    # As a standby taking over: another process, the same client id (one per topic root).
    db = str(tmp_path / "serve.db")
    store = Store.open(db)
    agent = FakeAgent(connection(broker.url, "holder"), "holder", auto=False, capacity=3)
    try:
        agent.transport.wait_connected(10)
        agent.announce()
        job = store.create_job("add", [[i, 2] for i in range(3)], timeout=60)
        procs.serve(db, "serve-1")
        wait_until(lambda: len(agent.held) == 3, timeout=30)
        procs.kill("serve-1")  # kill -9: no goodbye; its session stays with the broker
        time.sleep(0.5)  # the broker has seen the connection drop before the results come
        assert agent.answer_held() == 3
        procs.serve(db, "serve-2")  # with --clean-session here, the results are lost (checked: fails)
        if isinstance(broker, AmqttProcess):  # no queue: the open attempts are sent again, answered again
            progress = answering_until_finished(agent, store, job)
        else:
            progress = finished(store, job, timeout=30)
    finally:
        agent.transport.close(1)
    assert (progress.done, progress.failed) == (3, 0)
    store.bind()
    assert store.db.execute_sql("SELECT count(*) FROM attempt").fetchone()[0] == 3  # none reissued
    if isinstance(broker, MosquittoProcess):
        assert len(agent.received) == 3 and "dockercomp-coordinator-dockercomp" in broker.log()
    store.close()
