"""An in-memory broker and transport with MQTT's semantics that matter to dockercomp:
topic filters, retained messages, last wills on a crash, none on a clean close, and QoS 1
messages kept while disconnected and sent on reconnection (as ``Transport`` promises).

For fast unit tests of logic only; tests/contract/test_transport.py holds it to the same
contract as MqttConnection over real Mosquitto and amqtt. Delivery is synchronous: ``publish``
calls the subscribers' handlers before it returns, so nothing is ever unacknowledged while
connected. A broker ``stop()`` drops every client (as a crash: no wills, retained messages
forgotten, like amqtt); ``start()`` brings it back and every client not closed reconnects at once.
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
        self.running = True
        self.retained: dict[str, bytes] = {}
        self._clients: list[MemoryTransport] = []  # connected, in connection order
        self._waiting: list[MemoryTransport] = []  # started, not closed, not connected
        self.published: list[tuple[str, bytes, bool]] = []

    def connect(self, client_id: str = "client") -> MemoryTransport:
        return MemoryTransport(self, client_id)

    def stop(self) -> None:
        """A broker crash: every client loses its connection; no will is sent, nothing is kept."""
        with self._lock:
            self.running = False
            dropped, self._clients = self._clients, []
            self._waiting += dropped
            self.retained.clear()
        for client in dropped:
            client._lost("connection lost (broker stopped)")

    def start(self) -> None:
        """The broker is back: every client that was connecting or lost reconnects. All are
        connected and subscribed before any sends what it queued, so none misses another's."""
        with self._lock:
            self.running = True
            waiting, self._waiting = self._waiting, []
        back = [client for client in waiting if client._attach()]
        for client in back:
            client._resume()

    def _attach(self, client: MemoryTransport) -> bool:
        """Connects `client` if the broker runs (a client id already connected is taken over)."""
        with self._lock:
            if not self.running:
                if client not in self._waiting:
                    self._waiting.append(client)
                return False
            self._clients = [c for c in self._clients if c.client_id != client.client_id]
            self._clients.append(client)
            return True

    def _detach(self, client: MemoryTransport, send_will: bool) -> None:
        with self._lock:
            if client in self._waiting:
                self._waiting.remove(client)
            if client not in self._clients:
                return
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
        self._connected = threading.Event()
        self._started = self._closed = False
        self._will: Will | None = None
        # QoS 1 messages published while disconnected, sent in order on reconnection.
        self._queue: list[tuple[str, bytes, bool]] = []
        self._lock = threading.RLock()
        self.on_message: Callable[[str, bytes, bool], None] | None = None

    @property
    def url(self) -> str:
        return f"memory://{self.client_id}"

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._connect()

    def _connect(self) -> None:
        if self._attach():
            self._resume()

    def _attach(self) -> bool:
        """Connects with a fresh will; False while the broker is down (its start() calls back)."""
        if self._closed:
            return False
        self._will = self.will_factory() if self.will_factory else None
        return self.broker._attach(self)

    def _resume(self) -> None:
        """Once connected: retained messages, then what was queued, then on_connect."""
        for topic_filter in self._subscriptions:
            self._send_retained(topic_filter)
        with self._lock:  # held so no publish overtakes what was queued before it
            for topic, payload, retain in self._queue:
                self.broker.deliver(topic, payload, retain)
            self._queue.clear()
            self._connected.set()
        if self.on_connect:
            self.on_connect()

    def _lost(self, reason: str) -> None:
        self._connected.clear()
        if self.on_disconnect:
            self.on_disconnect(reason)

    def wait_connected(self, timeout: float) -> None:
        if not self._connected.wait(timeout):
            raise ConnectionFailed(self.url, "not connected (the memory broker is stopped)")

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def unacked(self) -> int:
        with self._lock:
            return len(self._queue)

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self._subscriptions[topic_filter] = qos
        if self.connected:
            self._send_retained(topic_filter)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        with self._lock:
            if not self.connected:
                # As MqttConnection: QoS 1 waits for the reconnection, QoS 0 is dropped.
                if qos > 0 and not self._closed:
                    self._queue.append((topic, payload, retain))
                return
        self.broker.deliver(topic, payload, retain)

    def flush(self, timeout: float) -> bool:
        # Connected, everything was delivered synchronously; disconnected, nothing can be.
        if self.unacked and not self._connected.wait(timeout):
            return False
        return not self.unacked

    def close(self, timeout: float = 5.0) -> None:
        self._closed = True
        self._connected.clear()
        self.broker._detach(self, send_will=False)

    def kill(self) -> None:
        """Vanish as a crashed process would: the broker publishes the will; no reconnection."""
        if self.connected:
            self._closed = True
            self._connected.clear()
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
