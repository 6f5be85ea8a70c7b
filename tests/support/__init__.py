"""Helpers shared by the test suite: the missing-dependency policy, ports, MQTT watchers.

Broker processes and free ports ship in dockercomp.broker.processes (bench/ needs them too;
re-exported here and in tests/support/brokers.py), PostgreSQL is in tests/support/postgres.py,
child processes of dockercomp in tests/support/processes.py, protocol-speaking fake agents in
tests/support/agents.py; the pytest fixtures are in tests/conftest.py and tests/support/fixtures.py.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import NoReturn, TypeVar
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

# Re-exported: tests take every helper from tests.support.
from dockercomp.broker.processes import free_port, port_accepts  # noqa: F401

T = TypeVar("T")

# The source checkout the tests run from (scripts, Dockerfile, mosquitto.conf, examples).
REPO_ROOT = Path(__file__).resolve().parents[2]
# Seconds a helper waits by default before declaring that something never happened.
DEFAULT_TIMEOUT = 10.0


def in_ci() -> bool:
    """True under CI (.ci/run exports CI=true), where a skipped test must not count as a pass."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require(condition: object, what: str, how_to_fix: str) -> None:
    """Skips the test when `condition` is falsy on a laptop, but fails it under CI.

    `what` names the missing thing ("the mosquitto binary"), `how_to_fix` says how to get
    it ("apt-get install mosquitto"). Use it for every external dependency (binaries,
    Docker engine, services) so CI can never report a green run that tested nothing.
    """
    if condition:
        return
    missing(what, how_to_fix)


def missing(what: str, how_to_fix: str) -> NoReturn:
    """Unconditional form of require(), for when the check is a try/except."""
    reason = f"{what} is not available; {how_to_fix}"
    if in_ci():
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


def wait_until(
    predicate: Callable[[], T], timeout: float = DEFAULT_TIMEOUT, interval: float = 0.02
) -> T:
    """Polls `predicate` until it returns something truthy, and returns that; else TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"condition not met within {timeout} s: {predicate!r}")
        time.sleep(interval)


def split_url(url: str) -> tuple[str, int]:
    """("127.0.0.1", 1883) from "mqtt://127.0.0.1:1883"."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "tcp") or parts.hostname is None:
        raise ValueError(f"not an mqtt:// URL: {url!r}")
    return parts.hostname, parts.port or 1883


def connect_client(
    url: str,
    client_id: str = "",
    *,
    clean_session: bool = True,
    will: tuple[str, bytes, int, bool] | None = None,
    start_loop: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
) -> mqtt.Client:
    """A paho (MQTT 3.1.1, callback API v2) client that has received its CONNACK.

    `will` is (topic, payload, qos, retain). With start_loop=False the network loop is
    driven here only until connected: the caller owns the socket (see abandon()).
    """
    host, port = split_url(url)
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session
    )
    if will is not None:
        topic, payload, qos, retain = will
        client.will_set(topic, payload, qos=qos, retain=retain)
    connected = threading.Event()
    refused: list[str] = []

    def on_connect(
        c: mqtt.Client, userdata: object, flags: object, reason: object, props: object
    ) -> None:
        if getattr(reason, "is_failure", False):
            refused.append(str(reason))
        connected.set()

    client.on_connect = on_connect
    client.connect(host, port, keepalive=60)
    if start_loop:
        client.loop_start()
        ok = connected.wait(timeout)
    else:
        deadline = time.monotonic() + timeout
        while not connected.is_set() and time.monotonic() < deadline:
            client.loop(timeout=0.05)
        ok = connected.is_set()
    if not ok or refused:
        client.loop_stop()
        client.disconnect()
        raise ConnectionError(f"no CONNACK from {url} ({refused or 'timeout'})")
    return client


def abandon(client: mqtt.Client) -> None:
    """Closes the client's TCP socket without DISCONNECT, as a killed process would.

    Only for clients made with start_loop=False: with a loop thread running, paho would
    notice and clean up itself.
    """
    sock = client.socket()
    if sock is not None:
        sock.close()


@dataclass(frozen=True)
class Seen:
    """One message a Watcher received."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


class Watcher:
    """Subscribes to a topic filter and records every message, thread-safely.

    >>> with Watcher(broker.url, "dockercomp/#") as w:
    ...     w.wait_for(lambda m: m.topic.endswith("/status") and m.payload == b"online")
    """

    def __init__(
        self,
        url: str,
        topic_filter: str,
        *,
        qos: int = 1,
        client_id: str = "",
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.topic_filter = topic_filter
        self._lock = threading.Condition()
        self._seen: list[Seen] = []
        self._client = connect_client(url, client_id, timeout=timeout)
        self._client.on_message = self._on_message
        subscribed = threading.Event()
        self._client.on_subscribe = lambda *args: subscribed.set()
        self._client.subscribe(topic_filter, qos=qos)
        # Return only once the broker has the subscription: a message published right
        # after the constructor must not be missed.
        if not subscribed.wait(timeout):
            self.close()
            raise TimeoutError(f"no SUBACK for {topic_filter!r} within {timeout} s")

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        # amqtt sends a connecting client the retained messages of *other* clients'
        # subscriptions (see broker/embedded.py); keep only what this watcher asked for.
        if not mqtt.topic_matches_sub(self.topic_filter, msg.topic):
            return
        with self._lock:
            self._seen.append(Seen(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain)))
            self._lock.notify_all()

    @property
    def messages(self) -> list[Seen]:
        """A copy of everything received so far, in arrival order."""
        with self._lock:
            return list(self._seen)

    def on(self, topic: str) -> list[Seen]:
        """Messages received on exactly `topic`."""
        return [m for m in self.messages if m.topic == topic]

    def wait_for(self, predicate: Callable[[Seen], bool], timeout: float = DEFAULT_TIMEOUT) -> Seen:
        """The first message (already received or yet to come) matching `predicate`."""
        deadline = time.monotonic() + timeout
        with self._lock:
            checked = 0
            while True:
                for message in self._seen[checked:]:
                    if predicate(message):
                        return message
                checked = len(self._seen)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"no matching message on {self.topic_filter!r} within {timeout} s; "
                        f"saw {len(self._seen)}: {self._seen[-5:]!r}"
                    )
                self._lock.wait(remaining)

    def wait_count(self, count: int, timeout: float = DEFAULT_TIMEOUT) -> list[Seen]:
        """Waits until at least `count` messages arrived; returns them all."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self._seen) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{len(self._seen)} of {count} messages within {timeout} s")
                self._lock.wait(remaining)
            return list(self._seen)

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Watcher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class FakeClock:
    """A wall clock a test moves by hand (``clock.now += 0.5``), for engines given ``clock=``."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now
