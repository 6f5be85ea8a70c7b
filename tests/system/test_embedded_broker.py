"""The embedded amqtt broker: retained messages, last wills, the `dockercomp broker serve` command."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from dockercomp.broker.embedded import AddressInUseError, EmbeddedBroker
from tests.support import REPO_ROOT, Watcher, abandon, connect_client, port_accepts, wait_until
from dockercomp.broker.processes import AmqttProcess
from dockercomp.broker.settings import BrokerSettings
from tests.support.brokers import BrokerProcess
from tests.support.security import accepts, make_config

pytestmark = pytest.mark.timeout(90)

URL_LINE = re.compile(r"listening on (mqtt://127\.0\.0\.1:(\d+))")
# Long enough for a message that is coming to arrive on loopback.
QUIET_PERIOD = 0.3
# Seconds `dockercomp broker serve` may take to exit after a signal: it gives amqtt up to 10 s to shut
# down (broker/embedded.py STOP_TIMEOUT), which amqtt 0.12 on Python 3.11 sometimes needs.
EXIT_TIMEOUT = 30


@pytest.fixture
def embedded() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker("127.0.0.1", 0) as running:
        yield running


def publish(url: str, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1) -> None:
    client = connect_client(url)
    try:
        client.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()


# --- the library ------------------------------------------------------------------------


def test_port_zero_picks_a_free_port_and_reports_it(embedded: EmbeddedBroker) -> None:
    assert embedded.port > 0
    assert embedded.url == f"mqtt://127.0.0.1:{embedded.port}"
    publish(embedded.url, "dockercomp/test/ping", b"pong")  # it serves MQTT there


def test_stop_closes_the_listener() -> None:
    broker = EmbeddedBroker().start()
    port = broker.port
    broker.stop()
    broker.stop()  # twice is harmless
    assert not port_accepts("127.0.0.1", port)


def test_a_busy_port_raises_address_in_use(embedded: EmbeddedBroker) -> None:
    with pytest.raises(AddressInUseError) as caught:
        EmbeddedBroker("127.0.0.1", embedded.port).start()
    assert caught.value.port == embedded.port


def test_retained_message_reaches_a_later_subscriber(embedded: EmbeddedBroker) -> None:
    publish(embedded.url, "dockercomp/test/status", b"online", retain=True)

    with Watcher(embedded.url, "dockercomp/test/#") as late:
        seen = late.wait_for(lambda m: m.topic == "dockercomp/test/status")

    assert seen.payload == b"online"
    assert seen.retain


def test_empty_retained_payload_clears_the_retained_message(embedded: EmbeddedBroker) -> None:
    publish(embedded.url, "dockercomp/test/a", b"old", retain=True)
    publish(embedded.url, "dockercomp/test/a", b"", retain=True)
    publish(embedded.url, "dockercomp/test/b", b"sentinel", retain=True)

    with Watcher(embedded.url, "dockercomp/test/#") as late:
        late.wait_for(lambda m: m.topic == "dockercomp/test/b")
        time.sleep(QUIET_PERIOD)
        assert late.on("dockercomp/test/a") == []


def test_will_is_published_and_retained_when_a_client_dies(embedded: EmbeddedBroker) -> None:
    with Watcher(embedded.url, "dockercomp/agents/+/presence") as watcher:
        doomed = connect_client(
            embedded.url,
            "agent-1",
            will=("dockercomp/agents/agent-1/presence", b"offline", 1, True),
            start_loop=False,
        )
        abandon(doomed)  # socket closed, no DISCONNECT: as if the process was killed

        will = watcher.wait_for(lambda m: m.payload == b"offline")
    assert will.topic == "dockercomp/agents/agent-1/presence"

    with Watcher(embedded.url, "dockercomp/agents/+/presence") as late:
        retained = late.wait_for(lambda m: m.payload == b"offline")
    assert retained.retain


def test_no_will_on_a_clean_disconnect(embedded: EmbeddedBroker) -> None:
    with Watcher(embedded.url, "dockercomp/agents/#") as watcher:
        polite = connect_client(
            embedded.url,
            "agent-2",
            will=("dockercomp/agents/agent-2/presence", b"offline", 1, True),
        )
        polite.disconnect()
        polite.loop_stop()
        publish(embedded.url, "dockercomp/agents/sentinel", b"x")
        watcher.wait_for(lambda m: m.topic == "dockercomp/agents/sentinel")
        assert watcher.on("dockercomp/agents/agent-2/presence") == []


# --- the process fixture ----------------------------------------------------------------


def test_amqtt_restarts_on_the_same_port_but_forgets_retained_messages(
    amqtt: BrokerProcess,
) -> None:
    publish(amqtt.url, "dockercomp/test/status", b"online", retain=True)
    port = amqtt.port

    amqtt.kill()
    amqtt.start()

    assert amqtt.port == port
    publish(amqtt.url, "dockercomp/test/sentinel", b"x", retain=True)
    with Watcher(amqtt.url, "dockercomp/test/#") as late:
        late.wait_for(lambda m: m.topic == "dockercomp/test/sentinel")
        time.sleep(QUIET_PERIOD)
        # Documented amqtt limitation (broker/embedded.py): no persistence.
        assert late.on("dockercomp/test/status") == []


# --- the command line -------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "dockercomp.broker.cli", *args],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_serve_prints_its_url_and_stops_cleanly_on_ctrl_c() -> None:
    process = run_cli("serve", "--host", "127.0.0.1", "--port", "0")
    try:
        assert process.stdout is not None
        first_line = process.stdout.readline()
        match = URL_LINE.search(first_line)
        assert match, first_line
        assert "Ctrl-C to stop" in first_line
        publish(match.group(1), "dockercomp/test/ping", b"pong")  # it really serves

        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=EXIT_TIMEOUT)
    finally:
        process.kill()
        process.wait()

    assert process.returncode == 0, err
    assert "Traceback" not in err
    assert "stopped" in out


def test_serve_stops_cleanly_on_sigterm() -> None:
    process = run_cli("serve", "--port", "0")
    try:
        assert process.stdout is not None
        assert URL_LINE.search(process.stdout.readline())
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=EXIT_TIMEOUT)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 0, err
    assert "Traceback" not in err


def test_serve_on_a_busy_port_says_what_to_do() -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]

        process = run_cli("serve", "--port", str(port))
        out, err = process.communicate(timeout=15)

    assert process.returncode == 2
    assert out == ""
    # One readable line and its hint, no traceback.
    error, hint = err.splitlines()
    assert error.startswith("error: ") and f"127.0.0.1:{port} is already in use" in error
    assert hint.startswith("hint: ") and "--port" in hint


def test_serve_rejects_an_invalid_port() -> None:
    process = run_cli("serve", "--port", "70000")
    _, err = process.communicate(timeout=15)
    assert process.returncode == 2
    assert "Traceback" not in err


# --- many clients at once, and frozen ones ---------------------------------------------------

# Clients that connect at the same moment (303 made amqtt 0.12 crash 63 connections).
CROWD = 300
# Retained messages a connecting client is sent while the others subscribe.
RETAINED = 50
# A child process holding CROWD paho clients: each connects with a will and subscribes to its
# own topic (a new entry in the broker's subscription table), all at once. It prints how many
# got their SUBACK, then waits to be killed.
CROWD_SCRIPT = """
import sys, threading, time
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
lock, subscribed = threading.Lock(), set()
def on_connect(client, userdata, flags, reason, props):
    client.subscribe(f"dockercomp/test/crowd/{userdata}/tasks", qos=1)
def on_subscribe(client, userdata, mid, reasons, props):
    with lock:
        subscribed.add(userdata)
clients = []
for i in range(count):
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"crowd-{i}", userdata=i)
    client.will_set(f"dockercomp/test/crowd/{i}/presence", b"lost", qos=1)
    client.on_connect, client.on_subscribe = on_connect, on_subscribe
    client.connect_async(host, port, keepalive=60)
    clients.append(client)
for client in clients:
    client.loop_start()
deadline = time.monotonic() + 60
while len(subscribed) < count and time.monotonic() < deadline:
    time.sleep(0.1)
print(len(subscribed), flush=True)
time.sleep(3600)
"""


@pytest.mark.timeout(180)  # two bounded waits of 60 s on a loaded machine
def test_simultaneous_connects_all_work_and_all_their_wills_fire(amqtt: BrokerProcess) -> None:
    for index in range(RETAINED):
        publish(amqtt.url, f"dockercomp/test/retained/{index}", b"online", retain=True)
    # Its subscription matches the retained messages: amqtt sends them to every new client
    # (embedded.py), so each connect awaits inside its loop over the subscription table.
    with Watcher(amqtt.url, "dockercomp/test/#") as watcher:
        crowd = subprocess.Popen([sys.executable, "-c", CROWD_SCRIPT, amqtt.host, str(amqtt.port), str(CROWD)],
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert crowd.stdout is not None
            subscribed = int(crowd.stdout.readline() or 0)
        finally:
            crowd.kill()
            crowd.wait()
        assert subscribed == CROWD, f"only {subscribed} of {CROWD} clients got their SUBACK"

        def wills() -> set[str]:
            return {m.topic for m in watcher.messages if m.topic.startswith("dockercomp/test/crowd/")}

        wait_until(lambda: len(wills()) == CROWD, timeout=60)
    assert "changed size during iteration" not in amqtt.log()


def test_a_frozen_clients_will_fires_while_messages_pile_up_for_it(amqtt: BrokerProcess) -> None:
    # amqtt 0.12 ignored keepalive: a SIGSTOPped client stayed connected, its will never came.
    # Tasks keep coming to a frozen agent: its socket buffers fill, which must not hold the will.
    frozen_script = (
        "import sys, paho.mqtt.client as mqtt; from paho.mqtt.enums import CallbackAPIVersion\n"
        "client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id='frozen')\n"
        "client.will_set('dockercomp/test/frozen/presence', b'lost', qos=1)\n"
        "client.on_connect = lambda c, *args: c.subscribe('dockercomp/test/tasks/frozen', qos=1)\n"
        "client.on_subscribe = lambda *args: print('subscribed', flush=True)\n"
        "client.connect(sys.argv[1], int(sys.argv[2]), keepalive=1)\n"
        "client.loop_forever()\n"
    )
    with Watcher(amqtt.url, "dockercomp/test/frozen/#") as watcher:
        client = subprocess.Popen([sys.executable, "-c", frozen_script, amqtt.host, str(amqtt.port)],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert client.stdout is not None
            assert client.stdout.readline().strip() == "subscribed"
            client.send_signal(signal.SIGSTOP)
            sender = connect_client(amqtt.url)
            try:
                sent = [sender.publish("dockercomp/test/tasks/frozen", b"x" * 64 * 1024, qos=1)
                        for _ in range(200)]  # ~12 MB: far more than the socket buffers hold
                sent[-1].wait_for_publish(30)  # the broker has them all
            finally:
                sender.disconnect()
                sender.loop_stop()
            # 1.5 x keepalive after its last packet; generous here, test_will_timing.py holds the promise.
            watcher.wait_for(lambda m: m.payload == b"lost", timeout=20)
        finally:
            client.kill()
            client.wait()


# --- secrets -----------------------------------------------------------------------------------


def test_no_password_reaches_the_log_even_at_vv(tmp_path: Path) -> None:
    # `serve -vv` logged every CONNECT packet with its clear-text password.
    accounts, coordinator = make_config(tmp_path / "broker-config")
    broker = AmqttProcess(tmp_path / "amqtt", security_dir=accounts.directory, verbosity=2)
    broker.start()
    try:
        right = BrokerSettings(host=broker.host, port=broker.port, username=coordinator.name,
                               password=coordinator.password)
        assert accepts(right.full_url)
        wrong_password = "not-" + coordinator.password[:12]
        assert not accepts(replace(right, password=wrong_password).full_url)  # a refusal is logged too
    finally:
        broker.stop()
    log = broker.log()
    assert "<-in-- ConnectPacket" in log and f"username={coordinator.name}" in log  # -vv did log the CONNECT
    assert coordinator.password not in log
    assert wrong_password not in log
