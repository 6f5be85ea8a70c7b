"""The production mosquitto.conf: it starts, and the traps it exists to close stay closed."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.support import Watcher, connect_client, port_accepts, require, wait_until
from tests.support.brokers import MOSQUITTO_CONF, BrokerProcess, MosquittoProcess, find_mosquitto
from tests.support.security import SecureBroker, accepts

# Enough to overflow Mosquitto's default queue of 1000 several times, small enough to
# run in about a second.
MESSAGES = 5_000
# Seconds without a new message after which the rest is taken as lost. Only a test that
# loses messages waits it out, so it can be generous: a loaded machine stalls the broker.
QUIET_PERIOD = 3.0


def setting(name: str, conf: str | None = None) -> str:
    """The value of a top-level setting in mosquitto.conf (last occurrence wins)."""
    text = conf if conf is not None else MOSQUITTO_CONF.read_text()
    values = re.findall(rf"^\s*{name}\s+(.+?)\s*$", text, flags=re.MULTILINE)
    assert values, f"{name} is not set in mosquitto.conf"
    return str(values[-1])


def test_the_settings_that_close_known_traps_are_there() -> None:
    assert setting("set_tcp_nodelay") == "true"
    assert setting("persistence") == "true"
    assert setting("persistence_location") == "/mosquitto/data/"
    assert setting("listener").split() == ["1883", "127.0.0.1"]  # plain MQTT: loopback unless opted in
    assert int(setting("max_queued_messages")) >= 100 * MESSAGES // 5  # far above 1000
    # In flight must be bounded: paho loses messages past 65,535 unacknowledged.
    assert 20 <= int(setting("max_inflight_messages")) < 65_535
    # 256 KiB payloads must fit; a runaway upload must not.
    assert 256 * 1024 < int(setting("max_packet_size")) <= 16 * 1024 * 1024
    assert setting("persistent_client_expiration")


def test_the_repository_config_starts_on_mosquitto(mosquitto: BrokerProcess) -> None:
    log = mosquitto.log()
    assert "running" in log
    assert "Error" not in log
    # The rewrite kept every setting but listener, paths, logging and user.
    generated = (mosquitto.workdir / "mosquitto.test.conf").read_text()
    assert setting("max_queued_messages", generated) == setting("max_queued_messages")
    assert setting("listener", generated) == f"{mosquitto.port} 127.0.0.1"


def test_an_open_mosquitto_listens_on_its_own_port_only(mosquitto: BrokerProcess) -> None:
    # The dropped TLS WebSockets listener's `protocol websockets` once stayed behind and opened
    # a default listener on 1883, so a second open broker (the bench's leaves) failed to start.
    ports = re.findall(r"Opening \S+ listen socket on port (\d+)", mosquitto.log())
    assert ports and set(ports) == {str(mosquitto.port)}, mosquitto.log()[-2000:]


def deliver_to_a_stalled_subscriber(url: str, count: int) -> int:
    """Publishes `count` QoS 1 messages while the subscriber reads nothing, then lets it read.

    A stalled subscriber sends no PUBACK, so after max_inflight_messages the broker queues
    the rest, up to max_queued_messages. Returns how many distinct messages arrived.
    """
    received: set[bytes] = set()
    subscriber = connect_client(url, "slow-reader", clean_session=False, start_loop=False)
    # No network thread: the subscriber reads (and acknowledges) only while we call loop().
    subscriber.on_message = lambda client, userdata, msg: received.add(bytes(msg.payload))
    subscribed = threading.Event()
    subscriber.on_subscribe = lambda *args: subscribed.set()
    subscriber.subscribe("dockercomp/test/flood", qos=1)
    pump_until(subscriber, subscribed.is_set)
    # From here on: stalled. Socket open, nothing read, nothing acknowledged.

    publisher = connect_client(url, "flooder")
    try:
        infos = [publisher.publish("dockercomp/test/flood", b"%d" % i, qos=1) for i in range(count)]
        for info in infos:
            info.wait_for_publish(30)  # the broker has them all

        # Catch up until everything arrived, or nothing new came for QUIET_PERIOD.
        last_count, last_change = -1, time.monotonic()

        def done() -> bool:
            nonlocal last_count, last_change
            if len(received) != last_count:
                last_count, last_change = len(received), time.monotonic()
            return len(received) >= count or time.monotonic() - last_change > QUIET_PERIOD

        pump_until(subscriber, done)
        return len(received)
    finally:
        publisher.disconnect()
        publisher.loop_stop()
        subscriber.disconnect()


def pump_until(client: mqtt.Client, condition: Callable[[], bool], timeout: float = 30) -> None:
    """Runs a loop-less paho client's network I/O in this thread until `condition()`."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out pumping the MQTT client"
        client.loop(timeout=0.05)


def test_a_slow_subscriber_loses_no_qos1_message(mosquitto: BrokerProcess) -> None:
    assert deliver_to_a_stalled_subscriber(mosquitto.url, MESSAGES) == MESSAGES


@pytest.fixture
def mosquitto_with_default_queue(tmp_path: Path) -> Iterator[MosquittoProcess]:
    binary = find_mosquitto()
    require(binary, "the mosquitto binary", "apt-get install mosquitto (or run `make system`)")
    conf = tmp_path / "default-queue.conf"
    default_queue = "max_queued_messages 1000"  # Mosquitto's own default
    conf.write_text(
        re.sub(r"(?m)^max_queued_messages .*$", default_queue, MOSQUITTO_CONF.read_text())
    )
    broker = MosquittoProcess(tmp_path / "broker", binary=binary, source_conf=conf)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def test_with_the_default_queue_limit_messages_vanish_silently(
    mosquitto_with_default_queue: MosquittoProcess,
) -> None:
    # Proves the test above can fail: Mosquitto's default drops what exceeds the queue.
    delivered = deliver_to_a_stalled_subscriber(mosquitto_with_default_queue.url, MESSAGES)
    assert delivered < MESSAGES
    assert delivered <= 1000 + int(setting("max_inflight_messages"))


def test_retained_messages_survive_a_clean_restart(mosquitto: BrokerProcess) -> None:
    publisher = connect_client(mosquitto.url)
    publisher.publish("dockercomp/test/status", b"online", qos=1, retain=True).wait_for_publish(5)
    publisher.disconnect()
    publisher.loop_stop()
    port = mosquitto.port

    mosquitto.stop()  # SIGTERM: Mosquitto writes its persistence file
    mosquitto.start()

    assert mosquitto.port == port
    with Watcher(mosquitto.url, "dockercomp/test/#") as late:
        seen = late.wait_for(lambda m: m.topic == "dockercomp/test/status")
    assert seen.payload == b"online"
    assert seen.retain


def test_queued_messages_for_an_offline_session_survive_a_restart(
    mosquitto: BrokerProcess,
) -> None:
    subscriber = connect_client(mosquitto.url, "agent-offline", clean_session=False)
    subscribed = threading.Event()
    subscriber.on_subscribe = lambda *args: subscribed.set()
    subscriber.subscribe("dockercomp/test/tasks", qos=1)
    assert subscribed.wait(10)
    subscriber.disconnect()
    subscriber.loop_stop()
    publisher = connect_client(mosquitto.url)
    publisher.publish("dockercomp/test/tasks", b"task-1", qos=1).wait_for_publish(5)
    publisher.disconnect()
    publisher.loop_stop()

    mosquitto.stop()
    mosquitto.start()

    received: list[bytes] = []
    back = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="agent-offline", clean_session=False)
    back.on_message = lambda c, u, msg: received.append(bytes(msg.payload))
    back.connect(mosquitto.host, mosquitto.port)
    back.loop_start()
    try:
        wait_until(lambda: received)
    finally:
        back.disconnect()
        back.loop_stop()
    assert received == [b"task-1"]


def test_an_oversized_packet_is_refused(mosquitto: BrokerProcess) -> None:
    limit = int(setting("max_packet_size"))
    with Watcher(mosquitto.url, "dockercomp/test/#") as watcher:
        publisher = connect_client(mosquitto.url)
        dropped = threading.Event()
        publisher.on_disconnect = lambda *args: dropped.set()
        publisher.publish("dockercomp/test/big", b"x" * (limit + 1), qos=1)
        assert dropped.wait(10), "the broker kept a client that sent an oversized packet"
        publisher.loop_stop()  # ~1 s: paho's thread sits out its reconnect delay

        ok = connect_client(mosquitto.url)
        ok.publish("dockercomp/test/payload", b"y" * 256 * 1024, qos=1).wait_for_publish(5)
        ok.disconnect()
        ok.loop_stop()
        watcher.wait_for(lambda m: m.topic == "dockercomp/test/payload")
        assert watcher.on("dockercomp/test/big") == []


def non_loopback_address() -> str | None:
    """An IPv4 address of this machine other than loopback (the one its default route uses)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent, only a route looked up
        except OSError:
            return None
        address: str = probe.getsockname()[0]
    return None if address.startswith("127.") else address


def test_the_plain_listener_is_reachable_on_loopback_only(tmp_path: Path) -> None:
    # Started on the address the shipped file names (the test rewrite moves only the port);
    # it used to bind every interface, so passwords in clear could cross any network.
    binary = find_mosquitto()
    require(binary, "the mosquitto binary", "apt-get install mosquitto (or run `make system`)")
    address = non_loopback_address()
    require(address, "a non-loopback IPv4 address to try", "run on a machine with a network interface")
    assert address is not None
    shipped = setting("listener").split()[1]
    broker = MosquittoProcess(tmp_path / "broker", host=shipped, binary=binary)
    broker.start()
    try:
        assert port_accepts("127.0.0.1", broker.port)
        assert not port_accepts(address, broker.port)
    finally:
        broker.stop()


def test_no_password_reaches_mosquittos_log(secure_mosquitto: SecureBroker) -> None:
    creds = secure_mosquitto.add("alice")
    assert accepts(secure_mosquitto.url(creds))
    assert not accepts(secure_mosquitto.url(creds, password="wrong-" + creds.password[:10]))
    log = secure_mosquitto.process.log()
    assert "alice" in log  # connection_messages: the account is logged, its password is not
    assert creds.password not in log and creds.password[:10] not in log
    assert secure_mosquitto.coordinator.password not in log
