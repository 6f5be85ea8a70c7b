"""paho's MQTT client with fewer system calls and less work per message (MqttConnection's client).

The protocol is paho's own; only how bytes are read and written, and two per-message costs
in paho's Python code, change here (bench/ measures what each saves).
"""

from __future__ import annotations

import logging
import socket
import threading
from contextlib import contextmanager
from typing import Iterator

import paho.mqtt.client as mqtt
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger("dockercomp.broker.connection")  # the transport's one logger name


class _BufferedSocket:
    """paho's socket, read in large chunks.

    paho reads every packet with at least three recv() calls (type, length, body): a system
    call each, and each lets the other threads take the GIL. This hands paho the bytes it
    asks for from one large read, and reports them as ``pending()`` (paho's check for
    buffered TLS data), so paho's select() does not wait while packets are buffered here.
    Everything else is the socket's own."""

    __slots__ = ("_sock", "_buffer", "_pos")

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = b""
        self._pos = 0

    def recv(self, size: int) -> bytes:
        self.fill()  # BlockingIOError when nothing came; b"" when the peer closed
        start, self._pos = self._pos, min(self._pos + size, len(self._buffer))
        return self._buffer[start:self._pos]

    def fill(self) -> bool:
        """Read what the socket holds into the buffer if it is empty, so that ``packet()`` can
        take the first packet of a wake-up whole too; False when the peer closed (b"")."""
        if self._pos < len(self._buffer):
            return True
        data = self._sock.recv(_READ_CHUNK)  # BlockingIOError when nothing came
        self._buffer, self._pos = data, 0
        return bool(data)

    def pending(self) -> int:
        inner = self._sock.pending() if hasattr(self._sock, "pending") else 0
        return max(0, len(self._buffer) - self._pos) + inner

    def packet(self) -> tuple[int, bytes] | None:
        """The next whole MQTT packet if the buffer holds all of it: (its first byte, the bytes
        after its remaining length). None otherwise (paho then reads it its own way, bytes
        already buffered first); also None for a malformed length, which paho reports."""
        buffer, start = self._buffer, self._pos
        end = len(buffer)
        i = start + 1
        length, shift = 0, 0
        while True:
            if i >= end or shift > 21:  # MQTT's remaining length has at most 4 bytes
                return None
            byte = buffer[i]
            i += 1
            length |= (byte & 127) << shift
            if byte < 128:
                break
            shift += 7
        if end - i < length:
            return None
        self._pos = i + length
        return buffer[start], buffer[i:self._pos]

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)


# Bytes asked of the socket per read; a burst of results is a few kilobytes.
_READ_CHUNK = 65536
# Most bytes written in one send() when queued packets are joined.
_WRITE_CHUNK = 65536
_PUBLISH, _DISCONNECT, _PUBACK = 0x30, 0xE0, 0x40
# What every MQTT 3.1.1 PUBACK says, built once (see _Client._handle_pubackcomp).
_PUBACK_REASON = ReasonCode(PacketTypes.PUBACK)
_PUBACK_PROPERTIES = Properties(PacketTypes.PUBACK)
# paho gives every message it receives an MQTTMessageInfo (a threading.Condition inside),
# which only means something for messages it sends: received ones share this one.
_RECEIVED_INFO = mqtt.MQTTMessageInfo(0)


class _Client(mqtt.Client):
    """paho's client with fewer system calls per message; the protocol is paho's own.

    - Reads go through ``_BufferedSocket``.
    - Reads of whole packets: a packet already whole in the read buffer is taken in one slice
      (paho: three reads, a bytearray grown per read, a dict rebuilt per packet), and the two
      packets every task costs, an MQTT 3.1.1 PUBLISH (QoS 0 or 1) and a PUBACK, are decoded
      here with paho's checks and effects; everything else goes to paho's handlers.
    - Writes: packets queued since the last write are joined into one send() (paho sends
      each packet on its own). Packets paho must act on once written (QoS 0 publishes, whose
      callbacks fire then, and DISCONNECT) are left alone.
    - Wake-ups: paho writes a byte to a socket pair for every packet it queues, to wake its
      network loop out of select(). None is needed for packets queued by the network thread
      itself (PUBACKs: the loop writes them next), and ``quiet()`` lets a thread queue a batch
      of publishes with one wake-up at the end instead of one per message.
    - ``quiet()`` even skips that wake-up when it can: on a plain TCP socket, the publishing
      thread writes the batch itself (under ``_writing``, the lock every write takes, so
      packets never interleave or reorder), and the network thread is woken only for what the
      socket did not take. A message then leaves without a hand-over to another thread:
      what a window-1 round trip is made of. (Never over TLS: an SSL object must not be read
      and written from two threads at once.)
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._local = threading.local()
        self.network_thread_id: int | None = None  # the thread that reads the socket now
        self.loop_thread_id: int | None = None  # the thread that runs paho's loop
        self._writing = threading.Lock()  # held by whichever thread writes to the socket

    def _create_socket(self):  # noqa: ANN202 - paho's SocketLike
        sock = super()._create_socket()
        return _BufferedSocket(sock) if isinstance(sock, socket.socket) else sock

    def _packet_queue(self, command: int, packet: bytes | bytearray, mid: int, qos: int,
                      info: mqtt.MQTTMessageInfo | None = None) -> mqtt.MQTTErrorCode:
        if threading.get_ident() != self.network_thread_id and not getattr(self._local, "quiet", False):
            return super()._packet_queue(command, packet, mid, qos, info)
        self._out_packet.append({"command": command, "mid": mid, "qos": qos, "pos": 0,
                                 "to_process": len(packet), "packet": packet, "info": info})
        return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS

    @contextmanager
    def quiet(self) -> Iterator[None]:
        """Queue publishes without waking the network loop; wake it once at the end."""
        self._local.quiet = True
        try:
            yield
        finally:
            self._local.quiet = False
            if not self._write_here():
                self.wake()

    def _write_here(self) -> bool:
        """Write the queued packets from this thread; True when none is left for the network
        thread (False: it must be woken to write them, or to see a broken connection)."""
        if self.owner_reads and threading.get_ident() == self.network_thread_id:
            return self.write_queued()
        if threading.get_ident() == self.network_thread_id or not isinstance(self._sock, _BufferedSocket):
            return False
        if not self._writing.acquire(blocking=False):
            return False  # the network thread is writing: it takes ours along or is woken
        try:
            self._join_queued()
            # Packets paho acts on once written (DISCONNECT, QoS 0 publishes) are its own to send.
            if any(p["command"] & 0xF0 == _DISCONNECT or (p["command"] & 0xF0 == _PUBLISH and p["qos"] == 0)
                   for p in self._out_packet):
                return False
            rc = mqtt.Client._packet_write(self)
        except Exception:  # noqa: BLE001 - whatever went wrong, the network thread sees it too
            return False
        finally:
            self._writing.release()
        return rc == mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS and not self._out_packet

    @property
    def owner_reads(self) -> bool:
        """The reading thread is an owner lent the connection (MqttConnection.adopt), which
        writes what it queues at once: no loop of paho's runs on it."""
        return self.network_thread_id is not None and self.network_thread_id != self.loop_thread_id

    def write_queued(self) -> bool:
        """The reading thread writes what is queued now; True when nothing is left queued."""
        try:
            rc = self.loop_write() if self.want_write() else mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
        except Exception:  # noqa: BLE001 - a broken connection: the next read finds it
            return False
        return rc == mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS and not self._out_packet

    def wake(self) -> None:
        waker = self._sockpairW
        if waker is not None:
            try:
                waker.send(b"0")
            except OSError:  # full (it is awake anyway) or replaced by a reconnection
                pass

    def _handle_pubackcomp(self, cmd: str) -> mqtt.MQTTErrorCode:
        # An MQTT 3.1.1 PUBACK is a bare message id, but paho builds a ReasonCode and a
        # Properties object for each: a fifth of the network thread's time. Shared ones do
        # (on_publish ignores them); anything else is left to paho, which validates it.
        packet = self._in_packet["packet"]
        if cmd != "PUBACK" or self._protocol == mqtt.MQTTv5 or len(packet) != 2:
            return super()._handle_pubackcomp(cmd)  # type: ignore[arg-type]
        mid = (packet[0] << 8) | packet[1]
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, _PUBACK_REASON, _PUBACK_PROPERTIES)
        return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS

    def _handle_on_message(self, message: mqtt.MQTTMessage) -> None:
        # MqttConnection registers no per-topic callbacks (message_callback_add): skip paho's
        # walk of its topic matcher for every message and call on_message directly.
        on_message = self.on_message
        if on_message is None:
            return
        with self._in_callback_mutex:
            try:
                on_message(self, self._userdata, message)
            except Exception:  # noqa: BLE001 - as paho: log, and go on with the next packet
                log.exception("on_message failed")
                if not self.suppress_exceptions:
                    raise

    def _packet_write(self) -> mqtt.MQTTErrorCode:
        with self._writing:
            self._join_queued()
            return super()._packet_write()

    def _join_queued(self) -> None:
        # Only the network thread takes from the left of this deque; others append on the right.
        queue_ = self._out_packet
        taken = []
        size = 0
        while queue_ and size < _WRITE_CHUNK:
            packet = queue_[0]
            kind = packet["command"] & 0xF0
            if packet["pos"] or kind == _DISCONNECT or (kind == _PUBLISH and packet["qos"] == 0):
                break
            taken.append(queue_.popleft())
            size += len(packet["packet"])
        if len(taken) == 1:
            queue_.appendleft(taken[0])  # nothing to join: back as it was
        elif taken:
            # Written like a PUBACK: nothing to do once sent (QoS 1 publishes complete on
            # their own PUBACK from the broker, tracked apart from this queue).
            queue_.appendleft({"command": _PUBACK, "mid": 0, "qos": 1, "pos": 0, "to_process": size,
                               "packet": b"".join(p["packet"] for p in taken), "info": None})

    def loop_read(self, max_packets: int = 1) -> mqtt.MQTTErrorCode:
        rc = super().loop_read(max_packets)
        # paho's loop writes what a read queued (the PUBACKs of the messages read) on its next
        # turn, after one more select() and keepalive check: on this turn here, which is one
        # turn of the network thread per message less (an owner writes its own: write_pending).
        if (rc == mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS and self._out_packet
                and threading.get_ident() == self.loop_thread_id == self.network_thread_id):
            rc = self.loop_write()
        return rc

    def _packet_read(self) -> mqtt.MQTTErrorCode:
        sock = self._sock
        if self._in_packet["command"] == 0 and type(sock) is _BufferedSocket:
            # Filled here first: at window 1 every packet is the first of its wake-up, and
            # paho's own read of it costs a call per byte of its length and a MQTTMessage built
            # the long way (a quarter of the time a message's read took).
            try:
                filled = sock.fill()
            except BlockingIOError:
                return mqtt.MQTTErrorCode.MQTT_ERR_AGAIN  # as paho's read: nothing more for now
            except OSError:
                filled = False  # paho's own read below meets the error again, and reports it
            if filled:
                whole = sock.packet()
                if whole is not None:
                    return self._whole_packet(*whole)
        return super()._packet_read()

    def _whole_packet(self, command: int, body: bytes) -> mqtt.MQTTErrorCode:
        """Handle one packet read whole, as paho's _packet_read would once it had read it."""
        with self._msgtime_mutex:
            self._last_bytes_received = mqtt.time_func()
        kind = command & 0xF0
        if self._protocol != mqtt.MQTTv5:
            if kind == _PUBLISH and command & 0x06 != 0x04:  # QoS 0 or 1 (2 and 3 go to paho)
                rc = self._publish_received(command, body)
                if rc is not None:
                    return rc
            elif kind == _PUBACK and len(body) == 2:
                mid = (body[0] << 8) | body[1]
                with self._out_message_mutex:
                    if mid in self._out_messages:
                        return self._do_on_publish(mid, _PUBACK_REASON, _PUBACK_PROPERTIES)
                return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
        # Any other packet: paho's own handler, with _in_packet as paho leaves it after a read.
        self._in_packet = {"command": command, "have_remaining": 1, "remaining_count": [], "remaining_mult": 1,
                           "remaining_length": len(body), "packet": bytearray(body), "to_process": 0, "pos": 0}
        try:
            rc = self._packet_handle()
        except MalformedPacket as exc:
            self._easy_log(mqtt.MQTT_LOG_DEBUG, "Received malformed packet: %s", exc)
            rc = mqtt.MQTTErrorCode.MQTT_ERR_PROTOCOL
        self._in_packet = {"command": 0, "have_remaining": 0, "remaining_count": [], "remaining_mult": 1,
                           "remaining_length": 0, "packet": bytearray(b""), "to_process": 0, "pos": 0}
        return rc

    def _publish_received(self, command: int, body: bytes) -> mqtt.MQTTErrorCode | None:
        """paho's _handle_publish for an MQTT 3.1.1 PUBLISH of QoS 0 or 1, or None to leave a
        malformed one (no topic, or cut short) to paho, which says what is wrong with it."""
        qos = (command & 0x06) >> 1
        size = len(body)
        topic_end = 2 + ((body[0] << 8) | body[1]) if size >= 2 else 0
        if topic_end <= 2 or topic_end + 2 * qos > size:
            return None
        message = mqtt.MQTTMessage.__new__(mqtt.MQTTMessage)
        message._topic = body[2:topic_end]
        if qos:
            message.mid = (body[topic_end] << 8) | body[topic_end + 1]
            message.payload = body[topic_end + 2:]
        else:
            message.mid = 0
            message.payload = body[topic_end:]
        message.qos = qos
        message.dup = bool(command & 0x08)
        message.retain = bool(command & 0x01)
        message.state = mqtt.mqtt_ms_invalid
        message.info = _RECEIVED_INFO
        message.properties = None
        if self._logger is not None or self.on_log is not None:
            self._easy_log(mqtt.MQTT_LOG_DEBUG, "Received PUBLISH (d%d, q%d, r%d, m%d), '%s', ...  (%d bytes)",
                           message.dup, qos, message.retain, message.mid,
                           message._topic.decode("utf-8", "backslashreplace"), len(message.payload))
        message.timestamp = mqtt.time_func()
        self._handle_on_message(message)
        if qos == 0 or self._manual_ack:
            return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
        return self._send_puback(message.mid)
