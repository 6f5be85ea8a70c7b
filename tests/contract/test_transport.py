"""MqttConnection against real brokers (Mosquitto and amqtt): the transport contract."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest

from dockercomp.broker.connection import MqttConnection, Will
from dockercomp.broker.errors import ConnectionFailed
from dockercomp.broker.settings import BrokerSettings
from tests.support import Watcher, connect_client, free_port, wait_until
from tests.support.brokers import BrokerProcess

pytestmark = pytest.mark.timeout(60)

TOPIC = "dockercomp/test/conn"


class Inbox:
    """What a connection received, thread-safe, filtered to what the test cares about."""

    def __init__(self, prefix: str = "dockercomp/test/") -> None:
        self.prefix = prefix
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()

    def __call__(self, topic: str, payload: bytes, retained: bool) -> None:
        if topic.startswith(self.prefix):  # amqtt also sends other filters' retained messages
            with self._lock:
                self.messages.append((topic, bytes(payload), retained))

    def payloads(self, topic: str) -> list[bytes]:
        with self._lock:
            return [p for t, p, _ in self.messages if t == topic]


@pytest.fixture
def open_connection() -> Iterator[Callable[..., MqttConnection]]:
    """Factory of started MqttConnections; all closed at the end of the test."""
    made: list[MqttConnection] = []

    def make(url: str, client_id: str, *, wait: bool = True, **kwargs: object) -> MqttConnection:
        conn = MqttConnection(BrokerSettings.from_url(url), client_id, **kwargs)  # type: ignore[arg-type]
        conn.on_message = Inbox()
        made.append(conn)
        return conn

    yield make
    for conn in made:
        conn.close(timeout=1.0)


def publish_once(url: str, topic: str, payload: bytes) -> None:
    client = connect_client(url)
    try:
        client.publish(topic, payload, qos=1).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()


def test_publish_and_subscribe_round_trip(broker: BrokerProcess, open_connection: Callable[..., MqttConnection]) -> None:
    receiver = open_connection(broker.url, "receiver")
    receiver.subscribe(TOPIC + "/#", qos=1)
    receiver.start()
    receiver.wait_connected(10)
    sender = open_connection(broker.url, "sender")
    sender.start()
    sender.wait_connected(10)
    with Watcher(broker.url, TOPIC + "/#"):  # a SUBACK'ed subscriber proves the broker is ready
        pass
    wait_until(lambda: receiver.connected)

    # The receiver's SUBACK is not observable; publish until the first message gets through.
    inbox: Inbox = receiver.on_message  # type: ignore[assignment]
    wait_until(lambda: sender.publish(TOPIC + "/ping", b"probe") or inbox.payloads(TOPIC + "/ping"), interval=0.1)
    for i in range(50):
        sender.publish(TOPIC + "/data", str(i).encode(), qos=1)
    assert sender.flush(10)
    wait_until(lambda: len(inbox.payloads(TOPIC + "/data")) == 50)
    assert inbox.payloads(TOPIC + "/data") == [str(i).encode() for i in range(50)]  # in order


def test_a_dropped_connection_fires_the_will_and_the_broker_retains_it(
    broker: BrokerProcess, open_connection: Callable[..., MqttConnection]
) -> None:
    conn = open_connection(broker.url, "doomed")
    conn.will_factory = lambda: Will(TOPIC + "/presence", b"offline", qos=1, retain=True)
    conn.start()
    conn.wait_connected(10)
    with Watcher(broker.url, TOPIC + "/presence") as watcher:
        conn.drop()  # socket closed without DISCONNECT, as when the process is killed
        will = watcher.wait_for(lambda m: m.payload == b"offline")
    assert will.qos == 1
    with Watcher(broker.url, TOPIC + "/presence") as late:
        assert late.wait_for(lambda m: m.payload == b"offline").retain


def test_a_clean_close_sends_no_will(broker: BrokerProcess, open_connection: Callable[..., MqttConnection]) -> None:
    conn = open_connection(broker.url, "polite")
    conn.will_factory = lambda: Will(TOPIC + "/presence", b"offline", qos=1, retain=True)
    conn.start()
    conn.wait_connected(10)
    with Watcher(broker.url, TOPIC + "/#") as watcher:
        conn.close()
        publish_once(broker.url, TOPIC + "/sentinel", b"x")
        watcher.wait_for(lambda m: m.topic == TOPIC + "/sentinel")
        assert watcher.on(TOPIC + "/presence") == []


def test_subscriptions_and_a_fresh_will_come_back_after_a_broker_restart(
    broker: BrokerProcess, open_connection: Callable[..., MqttConnection]
) -> None:
    wills: list[int] = []

    def will() -> Will:
        wills.append(len(wills) + 1)
        return Will(TOPIC + "/presence", f"offline {len(wills)}".encode())

    conn = open_connection(broker.url, "survivor")
    conn.will_factory = will
    conn.subscribe(TOPIC + "/in", qos=1)
    reconnections = threading.Semaphore(0)
    conn.on_connect = reconnections.release
    conn.start()
    assert reconnections.acquire(timeout=10)

    broker.kill()  # a crash; amqtt's SIGTERM can take 10 s with clients connected
    broker.start()

    # Reconnection backoff keeps growing while the broker restarts (slowly, on a busy machine):
    # the attempt after it is back may come up to 1.5 x the last delay later.
    assert reconnections.acquire(timeout=30), "no reconnection after the broker restart"
    assert len(wills) >= 2  # the will is rebuilt before every connection attempt
    inbox: Inbox = conn.on_message  # type: ignore[assignment]
    wait_until(lambda: publish_once(broker.url, TOPIC + "/in", b"after") or inbox.payloads(TOPIC + "/in"),
               interval=0.2)


def test_qos1_published_while_the_broker_is_down_arrives_after_it_restarts(
    broker: BrokerProcess, open_connection: Callable[..., MqttConnection]
) -> None:
    gate = threading.Event()  # holds the reconnection until the test's subscriber is ready

    def gated_backoff() -> Iterator[float]:
        while True:
            gate.wait(20)
            yield 0.05

    conn = open_connection(broker.url, "patient", backoff=gated_backoff)
    conn.start()
    conn.wait_connected(10)
    broker.kill()
    wait_until(lambda: not conn.connected)

    for i in range(3):
        conn.publish(TOPIC + "/results", f"result {i}".encode(), qos=1)  # kept, not lost
    assert conn.unacked == 3

    broker.start()
    with Watcher(broker.url, TOPIC + "/results") as watcher:
        gate.set()
        watcher.wait_count(3, timeout=15)
        assert [m.payload for m in watcher.messages] == [b"result 0", b"result 1", b"result 2"]
    assert conn.flush(5)


def test_publishers_block_instead_of_losing_messages_when_too_many_are_unacked(
    broker: BrokerProcess, open_connection: Callable[..., MqttConnection]
) -> None:
    conn = open_connection(broker.url, "bounded", max_unacked=4)
    conn.start()
    conn.wait_connected(10)
    with Watcher(broker.url, TOPIC + "/bulk") as watcher:
        for i in range(300):
            conn.publish(TOPIC + "/bulk", str(i).encode(), qos=1)
            assert conn.unacked <= 4 + 1
        watcher.wait_count(300, timeout=20)
        assert [int(m.payload) for m in watcher.messages] == list(range(300))


def test_a_closed_port_gives_a_readable_connection_failed() -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"
    conn = MqttConnection(BrokerSettings.from_url(url), "nobody-home")
    conn.start()
    try:
        with pytest.raises(ConnectionFailed) as caught:
            conn.wait_connected(1.0)
    finally:
        conn.close(timeout=1.0)
    message = str(caught.value)
    assert url in message and "connection refused" in message and "dockercomp broker serve" in message
