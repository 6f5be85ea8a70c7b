"""The transport contract (broker/connection.py's `Transport`), one suite over every backend:
the in-memory twin (broker/memory.py) and MqttConnection over real Mosquitto and amqtt.

Each test gets a `Backend`: connections of its kind, an observer (a plain paho client for the
real brokers, a memory client for the memory broker), a way to crash a connection, and a
broker that can crash and come back.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest

from dockercomp.broker.connection import MqttConnection, Transport, Will
from dockercomp.broker.errors import ConnectionFailed
from dockercomp.broker.memory import MemoryBroker, MemoryTransport
from dockercomp.broker.settings import BrokerSettings
from tests.support import DEFAULT_TIMEOUT, Seen, Watcher, free_port, wait_until
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


class MemoryWatcher:
    """tests.support.Watcher's interface over a memory client (no QoS is reported: -1)."""

    def __init__(self, broker: MemoryBroker, topic_filter: str) -> None:
        self.topic_filter = topic_filter
        self._seen: list[Seen] = []
        self._client = broker.connect(f"watcher-{id(self)}")
        self._client.on_message = lambda t, p, r: self._seen.append(Seen(t, bytes(p), -1, r))
        self._client.subscribe(topic_filter)
        self._client.start()  # delivery is synchronous: the wait_* below need no waiting

    @property
    def messages(self) -> list[Seen]:
        return list(self._seen)

    def on(self, topic: str) -> list[Seen]:
        return [m for m in self._seen if m.topic == topic]

    def wait_for(self, predicate: Callable[[Seen], bool], timeout: float = DEFAULT_TIMEOUT) -> Seen:
        return wait_until(lambda: next((m for m in self._seen if predicate(m)), None), timeout)

    def wait_count(self, count: int, timeout: float = DEFAULT_TIMEOUT) -> list[Seen]:
        return wait_until(lambda: len(self._seen) >= count and self.messages, timeout)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> MemoryWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Backend:
    """One kind of transport and its broker, as the tests below use them."""

    name = ""
    made: list[Transport]

    def connection(self, client_id: str, *, gated: threading.Event | None = None,
                   max_unacked: int | None = None) -> Transport:
        """A new, not yet started connection. `gated`: once lost, it reconnects only after the
        event is set."""
        raise NotImplementedError

    def watch(self, topic_filter: str) -> Watcher | MemoryWatcher:
        raise NotImplementedError

    def publish_once(self, topic: str, payload: bytes) -> None:
        conn = self.connection("once")
        conn.start()
        conn.wait_connected(10)
        conn.publish(topic, payload, qos=1)
        assert conn.flush(5)
        conn.close()

    def crash(self, conn: Transport) -> None:
        """The connection vanishes without DISCONNECT, as when its process is killed."""
        raise NotImplementedError

    def crash_broker(self) -> None:
        raise NotImplementedError

    def restart_broker(self) -> None:
        raise NotImplementedError


class Memory(Backend):
    name = "memory"

    def __init__(self) -> None:
        self.broker = MemoryBroker()
        self.made = []

    def connection(self, client_id: str, *, gated: threading.Event | None = None,
                   max_unacked: int | None = None) -> Transport:
        # Memory clients reconnect when the broker starts; the test restarts it after the gate.
        conn = self.broker.connect(client_id)
        conn.on_message = Inbox()
        self.made.append(conn)
        return conn

    def watch(self, topic_filter: str) -> MemoryWatcher:
        return MemoryWatcher(self.broker, topic_filter)

    def crash(self, conn: Transport) -> None:
        assert isinstance(conn, MemoryTransport)
        conn.kill()

    def crash_broker(self) -> None:
        self.broker.stop()

    def restart_broker(self) -> None:
        self.broker.start()


class Real(Backend):
    def __init__(self, broker: BrokerProcess) -> None:
        self.broker = broker
        self.name = broker.name
        self.made = []

    def connection(self, client_id: str, *, gated: threading.Event | None = None,
                   max_unacked: int | None = None) -> Transport:
        def gated_backoff() -> Iterator[float]:
            while True:
                assert gated is not None
                gated.wait(20)
                yield 0.05

        options: dict[str, object] = {}
        if gated is not None:
            options["backoff"] = gated_backoff
        if max_unacked is not None:
            options["max_unacked"] = max_unacked
        conn = MqttConnection(BrokerSettings.from_url(self.broker.url), client_id, **options)  # type: ignore[arg-type]
        conn.on_message = Inbox()
        self.made.append(conn)
        return conn

    def watch(self, topic_filter: str) -> Watcher:
        return Watcher(self.broker.url, topic_filter)

    def crash(self, conn: Transport) -> None:
        assert isinstance(conn, MqttConnection)
        conn.drop()

    def crash_broker(self) -> None:
        self.broker.kill()  # a crash; amqtt's SIGTERM can take 10 s with clients connected

    def restart_broker(self) -> None:
        self.broker.start()


@pytest.fixture(params=["memory", pytest.param("mosquitto", marks=pytest.mark.real),
                        pytest.param("amqtt", marks=pytest.mark.real)])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    made: Backend = Memory() if request.param == "memory" else Real(request.getfixturevalue(request.param))
    yield made
    for conn in made.made:
        conn.close(timeout=1.0)


def started(conn: Transport) -> Transport:
    conn.start()
    conn.wait_connected(10)
    return conn


def inbox(conn: Transport) -> Inbox:
    assert isinstance(conn.on_message, Inbox)
    return conn.on_message


def test_publish_and_subscribe_round_trip(backend: Backend) -> None:
    receiver = backend.connection("receiver")
    receiver.subscribe(TOPIC + "/#", qos=1)
    started(receiver)
    sender = started(backend.connection("sender"))

    # The receiver's SUBACK is not observable; publish until the first message gets through.
    wait_until(lambda: sender.publish(TOPIC + "/ping", b"probe") or inbox(receiver).payloads(TOPIC + "/ping"),
               interval=0.1)
    for i in range(50):
        sender.publish(TOPIC + "/data", str(i).encode(), qos=1)
    assert sender.flush(10)
    wait_until(lambda: len(inbox(receiver).payloads(TOPIC + "/data")) == 50)
    assert inbox(receiver).payloads(TOPIC + "/data") == [str(i).encode() for i in range(50)]  # in order


def test_a_dropped_connection_fires_the_will_and_the_broker_retains_it(backend: Backend) -> None:
    conn = backend.connection("doomed")
    conn.will_factory = lambda: Will(TOPIC + "/presence", b"offline", qos=1, retain=True)
    started(conn)
    with backend.watch(TOPIC + "/presence") as watcher:
        backend.crash(conn)
        will = watcher.wait_for(lambda m: m.payload == b"offline")
    assert will.qos in (1, -1)  # -1: the memory watcher does not see QoS
    with backend.watch(TOPIC + "/presence") as late:
        assert late.wait_for(lambda m: m.payload == b"offline").retain


def test_a_clean_close_sends_no_will(backend: Backend) -> None:
    conn = backend.connection("polite")
    conn.will_factory = lambda: Will(TOPIC + "/presence", b"offline", qos=1, retain=True)
    started(conn)
    with backend.watch(TOPIC + "/#") as watcher:
        conn.close()
        backend.publish_once(TOPIC + "/sentinel", b"x")
        watcher.wait_for(lambda m: m.topic == TOPIC + "/sentinel")
        assert watcher.on(TOPIC + "/presence") == []


def test_subscriptions_and_a_fresh_will_come_back_after_a_broker_restart(backend: Backend) -> None:
    wills: list[int] = []

    def will() -> Will:
        wills.append(len(wills) + 1)
        return Will(TOPIC + "/presence", f"offline {len(wills)}".encode())

    conn = backend.connection("survivor")
    conn.will_factory = will
    conn.subscribe(TOPIC + "/in", qos=1)
    reconnections = threading.Semaphore(0)
    conn.on_connect = reconnections.release
    conn.start()
    assert reconnections.acquire(timeout=10)

    backend.crash_broker()
    backend.restart_broker()

    # Reconnection backoff keeps growing while the broker restarts (slowly, on a busy machine):
    # the attempt after it is back may come up to 1.5 x the last delay later.
    assert reconnections.acquire(timeout=30), "no reconnection after the broker restart"
    assert len(wills) >= 2  # the will is rebuilt before every connection attempt
    wait_until(lambda: backend.publish_once(TOPIC + "/in", b"after") or inbox(conn).payloads(TOPIC + "/in"),
               interval=0.2)


def test_qos1_published_while_the_broker_is_down_arrives_after_it_restarts(backend: Backend) -> None:
    gate = threading.Event()  # holds the reconnection until the test's subscriber is ready
    conn = started(backend.connection("patient", gated=gate))
    backend.crash_broker()
    wait_until(lambda: not conn.connected)

    for i in range(3):
        conn.publish(TOPIC + "/results", f"result {i}".encode(), qos=1)  # kept, not lost
    assert conn.unacked == 3
    assert not conn.flush(0.1)  # nobody acknowledged them yet

    if isinstance(backend, Memory):
        # Memory clients reconnect the moment the broker is back: watch before (the memory
        # watcher connects with them, ahead of the delivery of what was queued).
        watcher: Watcher | MemoryWatcher = backend.watch(TOPIC + "/results")
        backend.restart_broker()
    else:
        backend.restart_broker()
        watcher = backend.watch(TOPIC + "/results")
    with watcher:
        gate.set()
        watcher.wait_count(3, timeout=15)
        assert [m.payload for m in watcher.messages] == [b"result 0", b"result 1", b"result 2"]
    assert conn.flush(5)
    assert conn.unacked == 0


def test_qos0_published_while_disconnected_is_dropped_not_raised(backend: Backend) -> None:
    conn = started(backend.connection("casual"))
    backend.crash_broker()
    wait_until(lambda: not conn.connected)
    conn.publish(TOPIC + "/chatter", b"lost", qos=0)  # at most once: no error, nothing kept
    assert conn.unacked == 0


def test_publishers_block_instead_of_losing_messages_when_too_many_are_unacked(backend: Backend) -> None:
    conn = started(backend.connection("bounded", max_unacked=4))
    with backend.watch(TOPIC + "/bulk") as watcher:
        for i in range(300):
            conn.publish(TOPIC + "/bulk", str(i).encode(), qos=1)
            assert conn.unacked <= 4 + 1
        watcher.wait_count(300, timeout=20)
        assert [int(m.payload) for m in watcher.messages] == list(range(300))


def test_a_connection_that_cannot_connect_says_so(backend: Backend) -> None:
    backend.crash_broker()
    conn = backend.connection("nobody-home")
    conn.start()  # returns at once: connecting goes on in the background
    with pytest.raises(ConnectionFailed):
        conn.wait_connected(1.0)


@pytest.mark.real
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
