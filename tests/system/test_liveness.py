"""Liveness that does not rest on the broker's retained store or wills (issue 15), over real
brokers and real agent processes: names a broker would rewrite, the heartbeat, silent workers.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from dockercomp.broker.connection import MqttConnection
from dockercomp.broker.messages import Presence, PresenceState
from dockercomp.broker.processes import BrokerProcess
from dockercomp.broker.settings import BrokerSettings
from dockercomp.broker.topics import Topics, WorkerRef
from dockercomp.coordinator.service import Coordinator
from tests.support import Watcher, wait_until
from tests.support.processes import Processes, finished, online

TOPICS = Topics()
pytestmark = pytest.mark.timeout(120)


def test_a_presence_on_a_topic_with_a_dotted_name_is_counted_and_never_registered(
        engine: Coordinator, broker: BrokerProcess) -> None:
    # What an agent of an older version, named "lab.1", sends: on RabbitMQ it would be invisible,
    # here the coordinator says why it ignores it instead of registering a worker no agent may be.
    dotted = Presence("lab.1", "local", PresenceState.ONLINE, 1, capacity=1, functions=("add",))
    payload = json.dumps({**json.loads(Presence("lab-1", "local", PresenceState.ONLINE, 1).encode()),
                          "worker": dotted.worker}).encode()
    client = MqttConnection(BrokerSettings.from_url(broker.url), "old-agent")
    client.start()
    client.wait_connected(10)
    try:
        client.publish(f"{TOPICS.root}/workers/local/lab.1/presence", payload, qos=1)
        wait_until(lambda: engine.rejections.counts["malformed"] == 1, timeout=10)
    finally:
        client.close(1)
    engine.store.bind()
    assert [w.key for w in engine.store.workers()] == []


def agent_args(procs: Processes, name: str, *extra: str) -> list[str]:
    # A keepalive of 2 minutes: the broker publishes a frozen agent's will only after 3.
    return ["dockercomp.agent.cli", "run", "--broker", str(procs.broker_url), "--worker-id", name,
            "--concurrency", "2", "--keepalive", "120", "--grace", "1",
            "--health-file", str(procs.logs / f"{name}.health"), *extra]


def test_a_frozen_agent_is_lost_when_its_heartbeats_stop_and_its_tasks_finish_elsewhere(
        engine: Coordinator, procs: Processes) -> None:
    store = engine.store
    bound = engine.liveness.bound(1.0)  # 3 x 1 + 5 = 8 s
    frozen = procs.start("frozen", agent_args(procs, "frozen", "--heartbeat", "1"))
    procs.start("steady", agent_args(procs, "steady", "--heartbeat", "1"))
    online(store, 2)
    # Long tasks and a long timeout: a lease would run 70 s, a will come after 180 s.
    job = store.create_job("sleep", [[0.5]] * 24, timeout=60)
    wait_until(lambda: store.inflight().get("local/frozen", 0) >= 1, timeout=20)

    os.kill(frozen.pid, signal.SIGSTOP)  # its TCP connection stays open: no will
    stopped_at = time.monotonic()
    try:
        lost = wait_until(lambda: next((w for w in store.workers() if w.name == "frozen" and w.state == "lost"), None),
                          timeout=bound + 20)
        progress = finished(store, job, timeout=60)
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    assert lost is not None and time.monotonic() - stopped_at < 70  # long before its lease or will
    assert (progress.done, progress.failed) == (24, 0)
    reissued = [r for r in store.results(job) if r.errors]
    assert reissued and all(r.worker == "local/steady" and r.errors[-1]["worker"] == "local/frozen"
                            for r in reissued)


def test_an_agent_without_a_heartbeat_keeps_the_old_behaviour(engine: Coordinator, procs: Processes) -> None:
    procs.start("quiet", agent_args(procs, "quiet", "--heartbeat", "0"))
    (worker,) = online(engine.store, 1)
    assert len(engine.liveness) == 0  # not watched: its will and rebirth answers say it all
    job = engine.store.create_job("add", [[1, 2]], timeout=30)
    assert finished(engine.store, job, timeout=30).done == 1


def test_the_agents_heartbeat_is_its_presence_again_not_retained(broker: BrokerProcess, procs: Processes) -> None:
    topic = TOPICS.presence(WorkerRef("local", "beating"))
    with Watcher(broker.url, topic) as watcher:
        procs.start("beating", agent_args(procs, "beating", "--heartbeat", "0.5"))
        # The online presence (retained, seen live) and then at least three beats.
        seen = wait_until(lambda: len(watcher.messages) >= 4 and watcher.messages, timeout=20)
    first = Presence.decode(seen[0].payload)
    assert first.heartbeat == 0.5 and first.state is PresenceState.ONLINE
    assert all(m.payload == seen[0].payload and not m.retain for m in seen)  # the same bytes: one comparison
    with Watcher(broker.url, topic) as late:  # the retained presence is still the announcement
        assert late.wait_count(1)[0].payload == seen[0].payload
