"""The transport boundary: what agent and coordinator need from MQTT, and its paho implementation.

Components see only ``Transport``: start, publish, subscribe, flush, close, and callbacks for
incoming messages and (re)connections. ``MqttConnection`` runs paho's network loop in its own
thread and owns reconnection (capped, jittered exponential backoff), so it can hand the broker a
fresh last will before every connection (the will carries that connection's sequence number).
A component with a wait loop of its own (the agent, the coordinator's engine) may ``adopt`` the
connection: while it is up, the network thread lends it to that thread, which reads and writes
it in its own wait, so a message reaches it without a hand-over between threads; a lost
connection, a write the socket did not take whole, a wait for acks, a big batch of publishes, a
flush or a close give it back (broker/lending.py).
``broker.memory.MemoryTransport`` is the in-memory twin for fast unit tests of logic.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Collection

import paho.mqtt.client as mqtt

from dockercomp.broker.defaults import (
    DISCONNECT_GRACE_SECONDS,
    MAX_UNACKED_PUBLISHES,
    PUBLISH_PART,
    RECONNECT_INITIAL_SECONDS,
    RECONNECT_JITTER,
    RECONNECT_MAX_SECONDS,
)
from dockercomp.broker.diagnosis import ca_file_problem, describe_connect_error, speaks
from dockercomp.broker.errors import BrokerError, ConnectionFailed, ConnectionRejected
from dockercomp.broker.lending import Lending
from dockercomp.broker.paho_client import _Client
from dockercomp.broker.settings import BrokerSettings

log = logging.getLogger(__name__)

# Seconds between looks at a closed may_connect gate (the engine decides within one step).
_GATE_RECHECK = 0.1

MessageHandler = Callable[[str, bytes, bool], None]
"""Called with (topic, payload, retained) on the thread that reads the connection (the network
thread, or the owner it is lent to): only hand the work on."""


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class Transport(ABC):
    """A connection to the broker. Implementations reconnect on their own until closed."""

    on_message: MessageHandler | None = None
    #: Called on the network thread after every successful (re)connection and re-subscription.
    on_connect: Callable[[], None] | None = None
    #: Called when a connection is lost, with a readable reason, on the thread that read it.
    on_disconnect: Callable[[str], None] | None = None
    #: Called before every connection attempt; its Will (or None) is registered with the broker.
    will_factory: Callable[[], Will | None] | None = None
    #: Asked before every connection attempt; while it says False, no attempt is made. A
    #: coordinator whose lead may have passed to a standby (frozen, then woken) must not take
    #: the shared MQTT session back, and with it results the new active one is owed.
    may_connect: Callable[[], bool] | None = None
    #: Set when the transport gave up for good (ConnectionRejected), before on_disconnect is called.
    failure: ConnectionFailed | None = None

    @abstractmethod
    def start(self) -> None:
        """Begin connecting in the background; returns at once."""

    @abstractmethod
    def wait_connected(self, timeout: float) -> None:
        """Block until connected, or raise ConnectionFailed saying why not."""

    @property
    @abstractmethod
    def connected(self) -> bool: ...

    @abstractmethod
    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe now if connected, and again after every reconnection."""

    @abstractmethod
    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Send a message. QoS 1 messages sent while disconnected are kept and sent on reconnect.
        Blocks (off the network thread) while too many QoS 1 messages are unacknowledged."""

    def publish_many(self, messages: list[tuple[str, bytes]], qos: int = 1) -> list[tuple[str, str]]:
        """Send several messages (not retained) in order, e.g. one engine step's tasks;
        returns (topic, reason) for each that could not be sent, and sends the others."""
        failed = []
        for topic, payload in messages:
            try:
                self.publish(topic, payload, qos=qos)
            except BrokerError as exc:
                failed.append((topic, str(exc)))
        return failed

    @abstractmethod
    def flush(self, timeout: float) -> bool:
        """Wait until every QoS 1 message was acknowledged; False if the timeout passed first."""

    @abstractmethod
    def close(self, timeout: float = 5.0) -> None:
        """Flush, then disconnect cleanly (the broker does not publish the will) and stop."""

    @property
    def unacked(self) -> int:
        return 0

    # -- an owner thread that reads the connection itself (optional) ---------------------------
    #: Called on the network thread when it lent the connection to the owner (see ``adopt``):
    #: the owner's wait must end so that it starts watching ``waitables()``.
    on_lend: Callable[[], None] | None = None

    def adopt(self) -> None:
        """Make the calling thread the connection's owner: while connected, it reads and writes
        the connection itself (``waitables`` and ``pump`` in its own wait loop) instead of the
        network thread handing every message over. Call before ``start``."""

    def waitables(self) -> tuple[object, ...]:
        """What the owner's wait must also watch for reading (empty when nothing is lent)."""
        return ()

    def pump(self, ready: Collection[object]) -> None:
        """Owner thread, after each wait: read what came (``ready``: what the wait found
        readable, of ``waitables()`` and anything else) and keep the connection alive. What
        that queues (acknowledgements) is written by ``write_pending``, which the owner calls
        right before it waits again."""

    def write_pending(self) -> None:
        """Owner thread, right before it waits: write what ``pump`` queued."""


def backoff_delays(
    initial: float = RECONNECT_INITIAL_SECONDS,
    cap: float = RECONNECT_MAX_SECONDS,
    jitter: float = RECONNECT_JITTER,
    rand: Callable[[], float] = random.random,
):
    """Yield reconnect delays: doubling from ``initial`` up to ``cap``, each with added jitter
    so a broker restart is not met by every client at the same instant."""
    delay = initial
    while True:
        yield delay * (1.0 + jitter * rand())
        delay = min(cap, delay * 2)


class MqttConnection(Lending, Transport):
    """paho-mqtt client (MQTT 3.1.1, clean session unless ``persistent``) with our own reconnect loop."""

    def __init__(
        self,
        settings: BrokerSettings,
        client_id: str,
        *,
        max_unacked: int = MAX_UNACKED_PUBLISHES,
        backoff: Callable[[], object] = backoff_delays,
        persistent: bool = False,
    ) -> None:
        self.settings = settings
        self.client_id = client_id
        self.persistent = persistent
        self._max_unacked = max_unacked
        self._backoff = backoff
        # Clean session by default: an agent must not depend on the broker's offline queue (amqtt
        # keeps none for anonymous clients, and work queued for a dead connection may be someone
        # else's now). ``persistent`` (the coordinator): the broker keeps this client id's
        # subscriptions and queues its QoS 1 messages while it is away, so results published
        # during a short disconnection arrive after it; a later client with the same id, e.g.
        # a standby coordinator, inherits them (docs/protocol.md, "The coordinator's session").
        self._client = _Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=not persistent,
            protocol=mqtt.MQTTv311,
        )
        # 0 = no paho in-flight limit: our own bound (max_unacked) blocks the publisher instead.
        # With any limit > 0, paho walks every unacknowledged message on each PUBACK
        # (Client._update_inflight): with 1,000 workers that walk was ~30 % of the coordinator's
        # time and halved its throughput (bench/, scale mode).
        self._client.max_inflight_messages_set(0)
        self._client.max_queued_messages_set(0)
        if settings.username:
            self._client.username_pw_set(settings.username, settings.password)
        if settings.tls:
            try:
                self._client.tls_set(
                    ca_certs=settings.ca_file,
                    cert_reqs=ssl.CERT_NONE if settings.insecure else ssl.CERT_REQUIRED,
                )
            except (OSError, ssl.SSLError) as exc:  # paho reads the file here: the name is ours to give
                raise ca_file_problem(settings, exc) from None
            self._client.tls_insecure_set(settings.insecure)
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_message = self._handle_message
        self._client.on_publish = self._handle_publish
        self._subscriptions: dict[str, int] = {}
        # The broker's nodes (one unless the URL lists several) and the one tried now.
        self._addresses = settings.addresses
        self._index = 0
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._acked = threading.Condition()
        self._unacked = 0
        self._last_error = "not connected yet"
        self._thread: threading.Thread | None = None
        self._network_thread_id: int | None = None
        self._init_lending()  # the owner thread the connection is lent to (broker/lending.py)
        # Until the first connection succeeds, an error that retrying cannot mend ends the
        # transport (failure); after it, every error is retried (a broker restart, a reload).
        self._ever_connected = False
        self.failure: ConnectionFailed | None = None

    # -- Transport -------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=f"mqtt-{self.client_id}", daemon=True)
        # When paho believes no loop thread exists (Client._thread is None) it writes to the
        # socket from whichever thread calls publish(), racing this network thread: packets
        # were seen reordered, and a partial write could interleave two packets. Naming our
        # thread makes publish() only queue the packet and wake the loop, which does every write.
        self._client._thread = self._thread
        self._thread.start()

    def wait_connected(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._connected.wait(min(0.05, max(0.0, deadline - time.monotonic()))):
            if self.failure is not None:
                raise self.failure
            if time.monotonic() >= deadline:
                raise ConnectionFailed(self.settings.url, self._last_error)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def last_error(self) -> str:
        return self._last_error

    @property
    def unacked(self) -> int:
        return self._unacked

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self._subscriptions[topic_filter] = qos
        if self._connected.is_set():
            self._client.subscribe(topic_filter, qos)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        # paho calls on_publish once per message it sent (QoS 0) or saw acknowledged (QoS 1),
        # so every publish is counted and each callback uncounts one.
        with self._acked:
            if qos > 0:
                self._make_room()
            self._unacked += 1
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        self.write_pending()  # the owner's: queued as by the reader, nobody else would write it
        kept = info.rc == mqtt.MQTT_ERR_SUCCESS or (qos > 0 and info.rc == mqtt.MQTT_ERR_NO_CONN)
        if not kept:
            with self._acked:
                self._unacked -= 1
                self._acked.notify_all()
            if qos > 0:
                raise BrokerError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")

    def publish_many(self, messages: list[tuple[str, bytes]], qos: int = 1) -> list[tuple[str, str]]:
        # One count of the unacknowledged and one wake-up of the network loop for the batch,
        # instead of one each per message (the batch may overshoot max_unacked once).
        if not messages:
            return []
        with self._acked:
            if qos > 0:
                self._make_room()
            self._unacked += len(messages)
        failed = []
        # A big batch (a dispatch round to 50,000 workers) goes to the network thread, which
        # writes each part as it is queued and reads the acks meanwhile, as it did for every
        # batch before the coordinator read its own connection: the owner writing it alone
        # held all of it until its step ended (50 MB more at the peak of that round).
        hold = len(messages) > PUBLISH_PART and threading.get_ident() == self._owner_id
        if hold:
            self._hold_back()
        try:
            for start in range(0, len(messages), PUBLISH_PART):
                with self._client.quiet():
                    for topic, payload in messages[start:start + PUBLISH_PART]:
                        try:
                            info = self._client.publish(topic, payload, qos=qos)
                            rc = info.rc
                        except ValueError as exc:  # paho: invalid topic or payload too large
                            rc, reason = mqtt.MQTT_ERR_INVAL, str(exc)
                        else:
                            reason = mqtt.error_string(rc)
                        if not (rc == mqtt.MQTT_ERR_SUCCESS or (qos > 0 and rc == mqtt.MQTT_ERR_NO_CONN)):
                            failed.append((topic, reason))
                if self._lent and threading.get_ident() == self._owner_id:
                    if hold:  # lent again in a race with _hold_back: the network thread writes it
                        self._give_back()
                    else:
                        self._check_lent()  # quiet() wrote this part here: see that all of it went
        finally:
            if hold:
                self._release_back()
        if failed:
            with self._acked:
                self._unacked -= len(failed)
                self._acked.notify_all()
        return failed

    def _make_room(self) -> None:
        """Holding ``_acked``: wait while ``max_unacked`` messages are unacknowledged (paho loses
        messages past 65,535). The network thread itself goes on. An owner would wait for acks
        only it reads: it gives the connection back first, and the network thread, which reads
        them meanwhile, lends it again only once the owner is done waiting (broker/lending.py)."""
        if self._unacked < self._max_unacked:
            return
        me = threading.get_ident()
        owner = me == self._owner_id
        if not owner and me == self._client.network_thread_id:
            return
        if owner:
            self._hold_back()
        try:
            while self._unacked >= self._max_unacked and not self._stopping.is_set():
                if owner and self._lent:  # lent again in a race with _hold_back: nobody would read
                    self._give_back()
                self._acked.wait(0.5)
        finally:
            if owner:
                self._release_back()

    def flush(self, timeout: float) -> bool:
        self._disown_here()  # the acks come in on the network thread from now on
        deadline = time.monotonic() + timeout
        with self._acked:
            while self._unacked > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._acked.wait(remaining)
        return True

    def close(self, timeout: float = 5.0) -> None:
        self._disown_here()
        if self._connected.is_set() and not self.flush(timeout):
            log.warning("closing with %d message(s) not acknowledged by the broker", self._unacked)
        self._stopping.set()
        with self._acked:
            self._acked.notify_all()
        try:
            # Queued: the network thread writes the DISCONNECT, then paho closes the socket.
            self._client.disconnect()
        except Exception:  # noqa: BLE001 - already gone is fine when closing
            pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._connected.clear()

    def drop(self) -> None:
        """Close the socket without DISCONNECT, as a crash would (tests of wills)."""
        sock = self._client.socket()
        if sock is not None:
            sock.close()
            self._client.wake()  # an owner waiting on the socket would not notice it closed

    # -- network thread ----------------------------------------------------------------------
    def _run(self) -> None:
        self._network_thread_id = self._client.network_thread_id = self._client.loop_thread_id = threading.get_ident()
        delays = self._backoff()
        failed_in_row = 0  # attempts that never connected since the last connection: a full round waits
        while not self._stopping.is_set():
            if self.may_connect is not None and not self.may_connect():
                self._stopping.wait(_GATE_RECHECK)
                continue
            will = self.will_factory() if self.will_factory else None
            if will is not None:
                self._client.will_set(will.topic, will.payload, will.qos, will.retain)
            else:
                self._client.will_clear()
            host, port = self._address
            reached = False  # the TCP connection was made: a failure after it is the broker's answer
            was_up = False  # a CONNACK came on this attempt
            try:
                # connect(), not reconnect(): the node may differ from the last attempt's.
                self._client.connect(host, port, self.settings.keepalive)
                reached = True
                self._set_nodelay()
                stop_since: float | None = None
                while True:
                    rc = self._client.loop(timeout=0.2)
                    if rc != mqtt.MQTT_ERR_SUCCESS:
                        break  # includes the socket paho closes after writing our DISCONNECT
                    if self._stopping.is_set():
                        # Keep looping until close()'s DISCONNECT is written; give up if it can't be.
                        stop_since = stop_since if stop_since is not None else time.monotonic()
                        if time.monotonic() - stop_since > DISCONNECT_GRACE_SECONDS:
                            break
                    elif self._connected.is_set() and not was_up:
                        was_up, failed_in_row = True, 0
                        delays = self._backoff()
                    if (self._owner_id is not None and self._connected.is_set() and not self._stopping.is_set()
                            and not self._client.want_write() and not self._holds):
                        if not self._lend():
                            break  # lost while lent (the owner saw it and called on_disconnect)
            except Exception as exc:  # noqa: BLE001 - any failure means: wait, then reconnect
                self._last_error = describe_connect_error(exc)
                if self.failure is None and not self._ever_connected:
                    self.failure = self._permanent(exc)
                if self.failure is None and isinstance(exc, (OSError, ssl.SSLError)):
                    log.warning("broker %s unreachable: %s; retrying%s", self._where(), self._last_error,
                                " on the next URL" if len(self._addresses) > 1 else "")
                elif self.failure is None:
                    log.exception("MQTT network loop failed; reconnecting")
            else:
                if (reached and self.failure is None and not self._ever_connected and not self.settings.tls
                        and not self._stopping.is_set() and not self._last_error.startswith("the broker refused")):
                    # Closed before any CONNACK: a TLS listener drops a plain CONNECT like this.
                    if speaks(host, port, tls=True):
                        self.failure = ConnectionRejected(
                            self.settings.url, "that port speaks TLS, and this URL plain MQTT",
                            "use mqtts:// (with ?ca=/path/to/ca.crt for a private CA) or the broker's plain port")
            self._connected.clear()
            if self.failure is not None:
                self._give_up()
                break
            if self._stopping.is_set():
                break
            # Fail over: the next attempt goes to the next node of the list (the same one when
            # there is one). After a lost connection, or once every node failed in a row, wait
            # the backoff first (jittered: a node's clients do not all arrive at once); between
            # nodes of one round, do not wait.
            self._index = (self._index + 1) % len(self._addresses)
            failed_in_row = 0 if was_up else failed_in_row + 1
            if was_up or failed_in_row % len(self._addresses) == 0:
                self._stopping.wait(next(delays))

    @property
    def _address(self) -> tuple[str, int]:
        return self._addresses[self._index]

    def _where(self) -> str:
        """The node tried now, for logs (the whole list when there is one node: its URL)."""
        return self.settings.url if len(self._addresses) == 1 else self.settings.address_url(self._index)

    def _permanent(self, exc: BaseException) -> ConnectionRejected | None:
        """The error as one retrying cannot mend, or None for one worth retrying."""
        if isinstance(exc, ssl.SSLCertVerificationError):
            return ConnectionRejected(self.settings.url, self._last_error,
                                      "pass the broker's CA certificate as ?ca=/path/to/ca.crt, and connect "
                                      "by a host name the certificate names")
        if (self.settings.tls and isinstance(exc, (ssl.SSLError, ConnectionResetError, EOFError))
                and speaks(*self._address, tls=False)):
            return ConnectionRejected(self.settings.url, "that port speaks plain MQTT, and this URL TLS",
                                      "use mqtt:// for this port, or the broker's TLS port (8883)")
        return None

    def _give_up(self) -> None:
        """Stop for good (network thread): say why once, and tell the owner."""
        assert self.failure is not None
        log.error("%s; not retrying (%s)", self.failure, self.failure.hint)
        if self.on_disconnect is not None:
            try:
                self.on_disconnect(self.failure.reason)
            except Exception:  # noqa: BLE001
                log.exception("on_disconnect callback failed")

    def _set_nodelay(self) -> None:
        # Nagle + delayed ACK cost ~3.6x throughput with many small messages in flight.
        sock = self._client.socket()
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        if reason_code.is_failure:
            self._last_error = f"the broker refused the connection: {reason_code}"
            credentials = "authori" in str(reason_code).lower() or "password" in str(reason_code).lower()
            if credentials:
                self._last_error += " (check the user name and password in the broker URL)"
            if credentials and not self._ever_connected:
                self.failure = ConnectionRejected(
                    self.settings.url, f"the broker refused the user name or password ({reason_code})",
                    "check the user name and password (in the URL, --username or the password variable); "
                    "the broker's operator can re-issue them")
            else:
                log.warning("%s", self._last_error)
            return
        if self._subscriptions:
            client.subscribe(list(self._subscriptions.items()))
        self._last_error = ""
        self._ever_connected = True
        self._connected.set()
        log.info("connected to %s as %s", self._where(), self.client_id)
        if self.on_connect is not None:
            try:
                self.on_connect()
            except Exception:  # noqa: BLE001 - a callback bug must not kill the network loop
                log.exception("on_connect callback failed")

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        was_connected = self._connected.is_set()
        self._connected.clear()
        if self._stopping.is_set():
            return
        reason = f"connection lost ({reason_code})"
        # A refused CONNACK is followed by this callback ("Unspecified error"): keep the refusal,
        # it is what the user must fix (e.g. the password).
        if was_connected or not self._last_error.startswith("the broker refused"):
            self._last_error = reason
        if self.failure is not None:
            return  # _run stops and reports it once
        if was_connected:
            log.warning("%s from %s; reconnecting", reason, self._where())
        if self.on_disconnect is not None:
            try:
                self.on_disconnect(reason)
            except Exception:  # noqa: BLE001
                log.exception("on_disconnect callback failed")

    def _handle_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:  # noqa: ANN001
        if self.on_message is None:
            return
        try:
            self.on_message(message.topic, message.payload, bool(message.retain))
        except Exception:  # noqa: BLE001 - one bad message must not stop the connection
            log.exception("handler failed for a message on %s", message.topic)

    def _handle_publish(self, client, userdata, mid, reason_code, properties) -> None:  # noqa: ANN001
        with self._acked:
            if self._unacked > 0:
                self._unacked -= 1
            self._acked.notify_all()
