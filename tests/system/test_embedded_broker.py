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

import pytest

from dockercomp.broker.embedded import AddressInUseError, EmbeddedBroker
from tests.support import REPO_ROOT, Watcher, abandon, connect_client, port_accepts
from tests.support.brokers import BrokerProcess

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
