"""The paho client with fewer system calls (broker/paho_client.py) reads what paho reads: the
same bytes fed to paho's own client and to ours, over a socket pair (no network), give the same
messages, the same acknowledgements and the same errors; the packets a task costs (PUBLISH of
QoS 0 and 1, PUBACK) take our whole-packet path, whole or split across reads."""

from __future__ import annotations

import socket
import struct
import threading
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from dockercomp.broker.paho_client import _BufferedSocket, _Client


def publish(topic: bytes, payload: bytes, qos: int = 0, mid: int = 0, retain: bool = False, dup: bool = False) -> bytes:
    body = struct.pack("!H", len(topic)) + topic + (struct.pack("!H", mid) if qos else b"") + payload
    return bytes([0x30 | (dup << 3) | (qos << 1) | retain]) + remaining(len(body)) + body


def remaining(length: int) -> bytes:
    out = bytearray()
    while True:
        byte, length = length % 128, length // 128
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out)


def puback(mid: int) -> bytes:
    return bytes([0x40, 2]) + struct.pack("!H", mid)


class Fed:
    """A client whose socket is one end of a socket pair; the test writes the broker's end."""

    def __init__(self, cls: type[mqtt.Client]) -> None:
        self.client = cls(mqtt.CallbackAPIVersion.VERSION2, client_id="t", protocol=mqtt.MQTTv311)
        ours, self.broker = socket.socketpair()
        ours.setblocking(False)
        self.ours = ours
        self.client._sock = _BufferedSocket(ours) if cls is _Client else ours  # as _create_socket does
        if isinstance(self.client, _Client):
            self.client.network_thread_id = None  # acknowledgements are queued as from any thread
        self.client._sockpairW = None  # no network loop to wake
        self.received: list[tuple[Any, ...]] = []
        self.acked: list[int] = []
        self.client.on_message = lambda c, u, m: self.received.append(
            (m.topic, m.payload, m.qos, m.retain, m.dup, m.mid))
        self.client.on_publish = lambda c, u, mid, rc, props: self.acked.append(mid)
        for mid in (7, 8):  # two QoS 1 messages of ours, awaiting their PUBACK
            message = mqtt.MQTTMessage(mid, b"out")
            message.qos = 1
            self.client._out_messages[mid] = message

    def feed(self, data: bytes) -> list[int]:
        self.broker.sendall(data)
        codes = []
        while True:
            rc = self.client.loop_read()
            codes.append(int(rc))
            if rc != mqtt.MQTT_ERR_SUCCESS or not self.pending():
                return codes

    def pending(self) -> bool:
        sock = self.client._sock
        if isinstance(sock, _BufferedSocket):
            if sock.pending():
                return True
            sock = sock._sock
        try:
            return bool(sock.recv(1, socket.MSG_PEEK))
        except BlockingIOError:
            return False

    def queued(self) -> list[bytes]:
        return [bytes(p["packet"]) for p in self.client._out_packet]

    def close(self) -> None:
        self.ours.close()  # paho drops its socket after a protocol error: ours is still ours to close
        self.broker.close()


STREAM = b"".join([
    publish(b"dockercomp/results/v/w", b'{"ok":1}', qos=1, mid=1),
    publish(b"dockercomp/presence/v/w", b"retained", qos=1, mid=2, retain=True),
    publish(b"t", b"", qos=0),
    publish(b"t/dup", b"again", qos=1, mid=3, dup=True),
    puback(7),
    puback(9),  # not one of ours: ignored
    publish(b"big", b"x" * 70_000, qos=1, mid=4),  # past one read's worth
    bytes([0xD0, 0]),  # PINGRESP: paho's own handler
    publish(b"q2", b"exactly once", qos=2, mid=5),  # QoS 2: paho's own handler
    puback(8),
])


@pytest.mark.parametrize("split", [None, 1, 5, 4096, 70_100])
def test_our_client_reads_a_stream_as_paho_does(split: int | None) -> None:
    paho, ours = Fed(mqtt.Client), Fed(_Client)
    whole = 0
    original = _Client._publish_received

    def counted(self: _Client, command: int, body: bytes) -> Any:
        nonlocal whole
        whole += 1
        return original(self, command, body)

    _Client._publish_received = counted  # type: ignore[method-assign]
    try:
        for fed in (paho, ours):
            parts = [STREAM] if split is None else [STREAM[:split], STREAM[split:]]
            for part in parts:
                fed.feed(part)
    finally:
        _Client._publish_received = original  # type: ignore[method-assign]
        paho.close()
        ours.close()
    assert ours.received == paho.received and len(paho.received) == 5  # QoS 2 waits for its PUBREL
    assert ours.acked == paho.acked == [7, 8]
    assert ours.queued() == paho.queued()  # PUBACKs for 1-4, PUBREC for 5, in order
    # The QoS 0/1 publishes took the whole-packet path: all four small ones in one read (the
    # big one is longer than a read), those split by a read maybe not.
    assert whole == 4 if split is None else whole >= 3


def test_a_packet_alone_in_its_read_takes_the_whole_packet_path() -> None:
    """At window 1 every message is the first (and only) one of its wake-up: it is read whole
    too, not the way paho reads (a call per byte of its length, a message built the long way)."""
    paho, ours = Fed(mqtt.Client), Fed(_Client)
    taken: list[int] = []
    original = _Client._whole_packet

    def counted(self: _Client, command: int, body: bytes) -> Any:
        taken.append(command)
        return original(self, command, body)

    _Client._whole_packet = counted  # type: ignore[method-assign]
    try:
        for fed in (paho, ours):
            assert fed.feed(publish(b"dockercomp/results/v/w", b'{"ok":1}', qos=1, mid=1)) == [0]
            assert fed.feed(puback(7)) == [0]
    finally:
        _Client._whole_packet = original  # type: ignore[method-assign]
    assert taken == [0x32, 0x40]
    assert ours.received == paho.received and len(ours.received) == 1
    assert ours.acked == paho.acked == [7]
    assert ours.queued() == paho.queued() == []
    try:
        assert ours.broker.recv(64) == paho.broker.recv(64) == puback(1)  # written at once, as paho does
    finally:
        paho.close()
        ours.close()


def test_an_empty_socket_and_a_closed_one_read_as_paho_reads_them() -> None:
    paho, ours = Fed(mqtt.Client), Fed(_Client)
    try:
        for fed in (paho, ours):
            assert fed.client.loop_read() == mqtt.MQTT_ERR_SUCCESS  # nothing came: try again later
            fed.broker.close()
        assert ours.client.loop_read() == paho.client.loop_read() == mqtt.MQTT_ERR_CONN_LOST
        assert ours.received == paho.received == []
    finally:
        paho.ours.close()
        ours.ours.close()


@pytest.mark.parametrize("bad", [
    publish(b"", b"no topic", qos=1, mid=1),  # MQTT 3.1.1 forbids an empty topic
    bytes([0x32, 3, 0, 5, ord("a")]),  # topic longer than the packet
    bytes([0x32, 3, 0, 1, ord("a")]),  # QoS 1 without room for its message id
])
def test_a_malformed_publish_is_refused_as_paho_refuses_it(bad: bytes) -> None:
    paho, ours = Fed(mqtt.Client), Fed(_Client)
    try:
        assert ours.feed(bad) == paho.feed(bad) == [int(mqtt.MQTT_ERR_PROTOCOL)]
        assert ours.received == paho.received == []
    finally:
        paho.close()
        ours.close()


def test_a_whole_packet_is_found_only_when_all_of_it_is_buffered() -> None:
    ours, theirs = socket.socketpair()
    try:
        buffered = _BufferedSocket(ours)
        packet = publish(b"t", b"y" * 300, qos=1, mid=9)  # a two-byte remaining length
        theirs.sendall(packet + packet[:10])
        assert buffered.recv(1) == packet[:1]  # paho's read of the first byte fills the buffer
        buffered._pos = 0  # as if that read had taken nothing
        assert buffered.packet() == (packet[0], packet[3:])
        assert buffered.packet() is None  # only 10 bytes of the next one
        assert buffered.recv(10) == packet[:10]
    finally:
        ours.close()
        theirs.close()


@pytest.mark.parametrize("reader", ["network thread", "owner"])
def test_the_network_thread_writes_its_acknowledgements_in_the_turn_that_read(reader: str) -> None:
    """paho's loop would write a PUBACK on its next turn, after one more select(): the network
    thread writes it in the turn that read its message. An owner (the agent's main loop) keeps
    it queued: it writes when it chooses (MqttConnection.write_pending, after the task left)."""
    fed = Fed(_Client)
    try:
        here = threading.get_ident()
        fed.client.network_thread_id = here
        fed.client.loop_thread_id = here if reader == "network thread" else here + 1
        fed.broker.setblocking(False)
        assert fed.feed(publish(b"dockercomp/results/v/w", b"{}", qos=1, mid=3)) == [int(mqtt.MQTT_ERR_SUCCESS)]
        assert len(fed.received) == 1
        if reader == "network thread":
            assert fed.broker.recv(64) == puback(3) and fed.queued() == []
        else:
            with pytest.raises(BlockingIOError):
                fed.broker.recv(64)
            assert fed.queued() == [puback(3)]
    finally:
        fed.close()
