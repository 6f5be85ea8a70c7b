"""Liveness that does not rest on the broker's retained store or wills (issue 15), over real
brokers and real agent processes: names a broker would rewrite, the heartbeat, silent workers.
"""

from __future__ import annotations

import json

import pytest

from dockercomp.broker.connection import MqttConnection
from dockercomp.broker.messages import Presence, PresenceState
from dockercomp.broker.processes import BrokerProcess
from dockercomp.broker.settings import BrokerSettings
from dockercomp.broker.topics import Topics
from dockercomp.coordinator.service import Coordinator
from tests.support import wait_until

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
