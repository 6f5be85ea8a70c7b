"""MqttConnection lent to an owner thread (``adopt``, ``waitables``, ``pump``, ``write_pending``),
as the agent's main loop uses it, over real Mosquitto and amqtt.

The owner here is a small loop of the agent's shape: wait on the connection's waitables and a
wake-up pipe, pump, run what the test asks of it on its own thread, write what is pending
before waiting again.
"""

from __future__ import annotations

import os
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dockercomp.broker.connection import MqttConnection, Will
from dockercomp.broker.defaults import PUBLISH_PART
from dockercomp.broker.settings import BrokerSettings
from tests.support import Watcher, wait_until
from tests.support.brokers import BrokerProcess

pytestmark = [pytest.mark.timeout(60), pytest.mark.real]

TOPIC = "dockercomp/test/owner"


class Owner:
    """A thread that adopts ``conn`` and pumps it, recording what reached it and on which thread."""

    def __init__(self, conn: MqttConnection) -> None:
        self.conn = conn
        self.received: list[bytes] = []
        self.receiving_threads: set[int] = set()
        self.connects = 0
        self.disconnects = 0
        self.pumping = threading.Event()  # cleared: the loop stops pumping (an owner stuck elsewhere)
        self.pumping.set()
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], queue.SimpleQueue[Any]]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="owner", daemon=True)
        conn.on_message = self._on_message
        conn.on_connect = self._on_connect
        conn.on_disconnect = self._on_disconnect
        conn.on_lend = self.wake

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        if topic.startswith(TOPIC):
            self.receiving_threads.add(threading.get_ident())
            self.received.append(bytes(payload))

    def _on_connect(self) -> None:
        self.connects += 1

    def _on_disconnect(self, reason: str) -> None:
        self.disconnects += 1

    def wake(self) -> None:
        os.write(self._wake_w, b"\0")

    def start(self) -> Owner:
        self.thread.start()
        wait_until(lambda: self.conn.connected and self.conn.waitables(), timeout=10)
        return self

    def call(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run ``fn`` on the owner's thread; its result (or its exception, raised here)."""
        answer: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._calls.put((fn, answer))
        self.wake()
        ok, value = answer.get(timeout=timeout)
        if not ok:
            raise value
        return value

    def stop(self) -> None:
        self._stop.set()
        self.wake()
        self.thread.join(10)
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    def _run(self) -> None:
        self.conn.adopt()
        self.conn.start()
        with selectors.DefaultSelector() as selector:
            selector.register(self._wake_r, selectors.EVENT_READ)
            watched: tuple[object, ...] = ()
            while not self._stop.is_set():
                if not self.pumping.is_set():
                    self.pumping.wait(0.1)
                    continue
                waitables = self.conn.waitables()
                if waitables != watched:
                    for obj in watched:
                        try:
                            selector.unregister(obj)
                        except (KeyError, ValueError):
                            pass
                    for obj in waitables:
                        selector.register(obj, selectors.EVENT_READ)
                    watched = waitables
                self.conn.write_pending()
                events = selector.select(0.2)
                try:
                    while os.read(self._wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
                self.conn.pump([key.fileobj for key, _ in events])
                while not self._calls.empty():
                    fn, answer = self._calls.get()
                    try:
                        answer.put((True, fn()))
                    except Exception as exc:  # noqa: BLE001 - handed to the test
                        answer.put((False, exc))


@pytest.fixture(params=["mosquitto", "amqtt"])
def broker(request: pytest.FixtureRequest) -> BrokerProcess:
    return request.getfixturevalue(request.param)


@pytest.fixture
def made(broker: BrokerProcess) -> Iterator[list[MqttConnection]]:
    conns: list[MqttConnection] = []
    yield conns
    for conn in conns:
        conn.close(timeout=1.0)


def connection(broker: BrokerProcess, made: list[MqttConnection], client_id: str, **options: Any) -> MqttConnection:
    conn = MqttConnection(BrokerSettings.from_url(broker.url), client_id, **options)
    made.append(conn)
    return conn


def sender(broker: BrokerProcess, made: list[MqttConnection]) -> MqttConnection:
    conn = connection(broker, made, "sender")
    conn.start()
    conn.wait_connected(10)
    return conn


def send_until_received(send: MqttConnection, owner: Owner, payload: bytes) -> None:
    """The owner's SUBACK is not observable: publish until one gets through."""
    wait_until(lambda: send.publish(TOPIC + "/in", payload) or payload in owner.received, interval=0.1)


@pytest.fixture
def probed(broker: BrokerProcess, made: list[MqttConnection]) -> Iterator[tuple[MqttConnection, Owner, MqttConnection]]:
    """A connection subscribed to TOPIC/in and lent to an owner, and a sender whose probe reached it."""
    conn = connection(broker, made, "owned")
    conn.subscribe(TOPIC + "/in", qos=1)
    owner = Owner(conn).start()
    try:
        send = sender(broker, made)
        send_until_received(send, owner, b"probe")
        yield conn, owner, send
    finally:
        owner.stop()


def test_the_owner_reads_its_messages_on_its_own_thread_and_what_it_publishes_arrives(
        broker: BrokerProcess, probed: tuple[MqttConnection, Owner, MqttConnection]) -> None:
    conn, owner, send = probed
    for i in range(50):
        send.publish(TOPIC + "/in", str(i).encode(), qos=1)
    wait_until(lambda: owner.received.count(b"49") == 1)
    assert [p for p in owner.received if p != b"probe"] == [str(i).encode() for i in range(50)]  # in order
    assert owner.receiving_threads == {owner.thread.ident}  # no hand-over from the network thread

    with Watcher(broker.url, TOPIC + "/out") as watcher:
        owner.call(lambda: [conn.publish(TOPIC + "/out", str(i).encode(), qos=1) for i in range(50)])
        watcher.wait_count(50)
        assert [int(m.payload) for m in watcher.messages] == list(range(50))
    wait_until(lambda: conn.unacked == 0)  # the broker's PUBACKs, read by the owner
    assert conn.waitables()  # still lent


def arrived(sock: Any, payload: bytes) -> bool:
    """The socket holds ``payload`` (and what came before it), not yet read."""
    try:
        return payload in sock._sock.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False


def test_a_pump_reads_only_what_its_wait_found_readable(probed: tuple[MqttConnection, Owner, MqttConnection]) -> None:
    """A message that arrived after the wait stays in the socket for the next wait to see: a
    read of a socket not found readable is a system call that mostly finds nothing."""
    conn, owner, send = probed

    def pump_with_and_without_the_socket() -> tuple[int, int]:
        sock = conn._client.socket()
        assert sock in conn.waitables()
        send.publish(TOPIC + "/in", b"late", qos=1)
        wait_until(lambda: arrived(sock, b"late"))
        conn.pump([owner._wake_r])  # the wait ended on another descriptor
        unread = owner.received.count(b"late")
        conn.pump([sock])
        return unread, owner.received.count(b"late")

    assert owner.call(pump_with_and_without_the_socket) == (0, 1)  # (more probes may come in too)

    def pump_what_waits_in_the_buffer() -> int:
        sock = conn._client.socket()
        send.publish(TOPIC + "/in", b"buffered", qos=1)
        wait_until(lambda: arrived(sock, b"buffered"))
        sock._buffer, sock._pos = sock._sock.recv(65536), 0  # as the network thread's last read may leave it
        conn.pump([owner._wake_r])  # woken by the lending: the socket itself has nothing new
        return owner.received.count(b"buffered")

    assert owner.call(pump_what_waits_in_the_buffer) == 1


def test_a_lost_connection_goes_back_to_the_network_thread_and_comes_back_lent(
        broker: BrokerProcess, made: list[MqttConnection]) -> None:
    conn = connection(broker, made, "owned-lost")
    conn.subscribe(TOPIC + "/in", qos=1)
    conn.will_factory = lambda: Will(TOPIC + "/presence", b"lost", qos=1, retain=False)
    owner = Owner(conn).start()
    try:
        with Watcher(broker.url, TOPIC + "/presence") as watcher:
            conn.drop()  # no DISCONNECT, as a crash: the owner sees it on its next pump
            watcher.wait_for(lambda m: m.payload == b"lost")
        wait_until(lambda: owner.disconnects == 1 and owner.connects == 2 and conn.waitables(), timeout=20)
        send_until_received(sender(broker, made), owner, b"after")
        assert owner.receiving_threads == {owner.thread.ident}
    finally:
        owner.stop()


def test_a_close_from_the_owner_sends_no_will_and_delivers_what_it_published(
        broker: BrokerProcess, made: list[MqttConnection]) -> None:
    conn = connection(broker, made, "owned-close")
    conn.will_factory = lambda: Will(TOPIC + "/presence", b"lost", qos=1, retain=False)
    owner = Owner(conn).start()
    try:
        with Watcher(broker.url, TOPIC + "/#") as watcher:
            owner.call(lambda: conn.publish(TOPIC + "/out", b"last words", qos=1))
            # flush and close on the owner's thread: the acks come in on the network thread
            assert owner.call(lambda: conn.flush(5))
            owner.call(lambda: conn.close(timeout=5))
            watcher.wait_for(lambda m: m.payload == b"last words")
            sentinel = sender(broker, made)
            sentinel.publish(TOPIC + "/sentinel", b"x")
            watcher.wait_for(lambda m: m.topic == TOPIC + "/sentinel")
            assert watcher.on(TOPIC + "/presence") == []
    finally:
        owner.stop()


@pytest.mark.parametrize("still_pumping", [True, False], ids=["pumping", "stuck"])
def test_a_close_from_another_thread_ends_a_lent_connection(
        broker: BrokerProcess, made: list[MqttConnection], still_pumping: bool) -> None:
    conn = connection(broker, made, "owned-elsewhere")
    conn.will_factory = lambda: Will(TOPIC + "/presence", b"lost", qos=1, retain=False)
    owner = Owner(conn).start()
    try:
        if not still_pumping:
            owner.pumping.clear()  # the owner is busy elsewhere: the network thread takes it back
        with Watcher(broker.url, TOPIC + "/#") as watcher:
            started = time.monotonic()
            conn.close(timeout=5)
            assert time.monotonic() - started < 5
            assert not conn.connected
            sentinel = sender(broker, made)
            sentinel.publish(TOPIC + "/sentinel", b"x")
            watcher.wait_for(lambda m: m.topic == TOPIC + "/sentinel")
            assert watcher.on(TOPIC + "/presence") == []  # a DISCONNECT, not a lost connection
    finally:
        owner.pumping.set()
        owner.stop()


def test_the_owner_at_max_unacked_hands_the_reading_back_and_waits_like_any_thread(
        broker: BrokerProcess, made: list[MqttConnection]) -> None:
    # Other threads wait while max_unacked messages are unacknowledged. The owner reads the
    # acknowledgements itself, so it must not wait for them as the reader (it would wait for
    # itself), nor run past the bound (paho loses messages past 65,535 unacknowledged): it gives
    # the connection back, the network thread reads the acks, and lends it again.
    conn = connection(broker, made, "owned-bounded", max_unacked=4)
    owner = Owner(conn).start()
    try:
        with Watcher(broker.url, TOPIC + "/bulk") as watcher:
            seen = owner.call(lambda: [conn.publish(TOPIC + "/bulk", str(i).encode(), qos=1) or conn.unacked
                                       for i in range(100)])
            assert max(seen) <= 4
            watcher.wait_count(100, timeout=20)
            assert [int(m.payload) for m in watcher.messages] == list(range(100))
        wait_until(lambda: conn.unacked == 0 and conn.waitables(), timeout=20)  # lent again
        owner.call(lambda: conn.publish(TOPIC + "/bulk", b"after", qos=1))
        wait_until(lambda: conn.unacked == 0)
    finally:
        owner.stop()


def test_a_big_batch_of_the_owner_goes_out_through_the_network_thread_and_the_connection_comes_back(
        broker: BrokerProcess, made: list[MqttConnection]) -> None:
    # More than PUBLISH_PART messages: queued while the network thread holds the connection,
    # which writes each part and reads the acks meanwhile (the owner alone would hold them all
    # until it waits again); a small batch is written by the owner itself.
    conn = connection(broker, made, "owned-big-batch")
    owner = Owner(conn).start()
    lent_while_queued: list[bool] = []
    publish = conn._client.publish

    def spy(*args: Any, **kwargs: Any) -> Any:
        lent_while_queued.append(conn._lent)
        return publish(*args, **kwargs)

    conn._client.publish = spy  # type: ignore[method-assign]
    count = PUBLISH_PART * 3 + 7
    try:
        with Watcher(broker.url, TOPIC + "/big") as watcher:
            failed = owner.call(lambda: conn.publish_many([(TOPIC + "/big", str(i).encode()) for i in range(count)]))
            assert failed == []
            watcher.wait_count(count, timeout=30)
            assert [int(m.payload) for m in watcher.messages] == list(range(count))
        assert not any(lent_while_queued)
        wait_until(lambda: conn.unacked == 0 and conn.waitables(), timeout=20)  # lent again
        lent_while_queued.clear()
        owner.call(lambda: conn.publish_many([(TOPIC + "/big", b"small")] * 3))
        assert lent_while_queued == [True] * 3
        wait_until(lambda: conn.unacked == 0)
    finally:
        owner.stop()


def test_a_message_larger_than_the_socket_takes_at_once_is_written_whole(
        broker: BrokerProcess, made: list[MqttConnection]) -> None:
    # The owner waits for reading only: what the socket did not take goes back to the network
    # thread, which waits until it can write the rest, then lends the connection again.
    conn = connection(broker, made, "owned-large")
    owner = Owner(conn).start()
    big = os.urandom(900_000)  # under mosquitto.conf's max_packet_size, far over the send buffer

    def publish_big() -> tuple[object, ...]:
        conn._client.socket().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        conn.publish(TOPIC + "/large", big, qos=1)
        return conn.waitables()

    try:
        with Watcher(broker.url, TOPIC + "/large") as watcher:
            assert owner.call(publish_big) == ()  # given back: the socket took only part of it
            assert watcher.wait_for(lambda m: True, timeout=30).payload == big
        wait_until(lambda: conn.unacked == 0 and conn.waitables(), timeout=20)  # lent again
        owner.call(lambda: conn.publish(TOPIC + "/large", b"small", qos=1))
        wait_until(lambda: conn.unacked == 0)
    finally:
        owner.stop()
