"""An in-memory broker and transport with MQTT's semantics that matter to dockercomp:
topic filters, retained messages, last wills on a crash, none on a clean close.

For fast unit tests of logic only; the contract tests run against real Mosquitto and amqtt.
Delivery is synchronous: ``publish`` calls the subscribers' handlers before it returns.
"""

from __future__ import annotations

import threading
from typing import Callable

from paho.mqtt.client import topic_matches_sub

from dockercomp.broker.connection import Transport, Will
from dockercomp.broker.errors import ConnectionFailed


class MemoryBroker:
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.retained: dict[str, bytes] = {}
        self._clients: list[MemoryTransport] = []
        self.published: list[tuple[str, bytes, bool]] = []

    def connect(self, client_id: str = "client") -> "MemoryTransport":
        return MemoryTransport(self, client_id)

    def _attach(self, client: "MemoryTransport") -> None:
        with self._lock:
            self._clients = [c for c in self._clients if c.client_id != client.client_id]
            self._clients.append(client)

    def _detach(self, client: "MemoryTransport", send_will: bool) -> None:
        with self._lock:
            if client in self._clients:
                self._clients.remove(client)
            will = client._will if send_will else None
        if will is not None:
            self.deliver(will.topic, will.payload, will.retain)

    def deliver(self, topic: str, payload: bytes, retain: bool) -> None:
        with self._lock:
            self.published.append((topic, payload, retain))
            if retain:
                if payload:
                    self.retained[topic] = payload
                else:
                    self.retained.pop(topic, None)
            targets = [c for c in self._clients if c._matches(topic)]
        for client in targets:
            client._receive(topic, payload, False)

    def retained_for(self, topic_filter: str) -> list[tuple[str, bytes]]:
        with self._lock:
            return [(t, p) for t, p in self.retained.items() if topic_matches_sub(topic_filter, t)]


class MemoryTransport(Transport):
    def __init__(self, broker: MemoryBroker, client_id: str) -> None:
        self.broker = broker
        self.client_id = client_id
        self._subscriptions: dict[str, int] = {}
        self._connected = False
        self._will: Will | None = None
        self.on_message: Callable[[str, bytes, bool], None] | None = None

    def start(self) -> None:
        self._will = self.will_factory() if self.will_factory else None
        self.broker._attach(self)
        self._connected = True
        for topic_filter in self._subscriptions:
            self._send_retained(topic_filter)
        if self.on_connect:
            self.on_connect()

    def wait_connected(self, timeout: float) -> None:
        if not self._connected:
            raise ConnectionFailed(f"memory://{self.client_id}", "not connected")

    @property
    def connected(self) -> bool:
        return self._connected

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self._subscriptions[topic_filter] = qos
        if self._connected:
            self._send_retained(topic_filter)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        if not self._connected:
            raise ConnectionFailed(f"memory://{self.client_id}", "not connected")
        self.broker.deliver(topic, payload, retain)

    def flush(self, timeout: float) -> bool:
        return True

    def close(self, timeout: float = 5.0) -> None:
        if self._connected:
            self._connected = False
            self.broker._detach(self, send_will=False)

    def kill(self) -> None:
        """Vanish as a crashed process would: the broker publishes the will."""
        if self._connected:
            self._connected = False
            self.broker._detach(self, send_will=True)
            if self.on_disconnect:
                self.on_disconnect("killed")

    def _matches(self, topic: str) -> bool:
        return any(topic_matches_sub(f, topic) for f in self._subscriptions)

    def _send_retained(self, topic_filter: str) -> None:
        for topic, payload in self.broker.retained_for(topic_filter):
            self._receive(topic, payload, True)

    def _receive(self, topic: str, payload: bytes, retained: bool) -> None:
        if self.on_message is not None:
            self.on_message(topic, payload, retained)
