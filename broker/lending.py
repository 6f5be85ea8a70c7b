"""The connection lent to an owner thread: MqttConnection's side of ``Transport.adopt``.

A component with a wait loop of its own (the agent's main loop, the coordinator's engine in
coordinator/inbox.py) adopts the connection. While it is up, the network thread lends it to
that thread, which watches ``waitables()`` in its own wait, reads with ``pump`` and writes with
``write_pending``: a message reaches it without a hand-over between threads (each costs a
wake-up and a switch of the GIL: ~0.1 ms of a window-1 round trip on 2 cores, bench/ window1).
Meanwhile the network thread waits in ``_lend``.

It comes back to the network thread when it is lost (the network thread reconnects), when the
socket took less than was queued (the owner's wait is for reading only: the network thread
waits until it can write the rest, then lends it again), while the owner waits at
``max_unacked`` or queues more than ``PUBLISH_PART`` messages at once (``_hold_back``: the
network thread writes them and reads the acks meanwhile, then lends it again), and for good
when the owner flushes or closes (the acks then come in on the network thread). A close from
another thread takes it back after 2 s if the owner stopped pumping.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Callable, Collection

import paho.mqtt.client as mqtt

from dockercomp.broker.defaults import DISCONNECT_GRACE_SECONDS

if TYPE_CHECKING:
    from dockercomp.broker.paho_client import _Client

log = logging.getLogger("dockercomp.broker.connection")  # the transport's one logger name


class Lending:
    """MqttConnection's owner side (a mixin over its state: the client, the network thread's
    id, the stopping event)."""

    _client: _Client
    _network_thread_id: int | None
    _stopping: threading.Event
    on_lend: Callable[[], None] | None

    def _init_lending(self) -> None:
        # ``_lent`` is set while the owner reads the connection; ``_back`` when it gave it back.
        self._owner_id: int | None = None
        self._lent = False
        self._holds = 0  # the owner asked the network thread to keep the connection (_hold_back)
        self._back = threading.Event()

    def adopt(self) -> None:
        self._owner_id = threading.get_ident()

    def waitables(self) -> tuple[object, ...]:
        if not self._lent:
            return ()
        client = self._client
        return tuple(x for x in (client.socket(), client._sockpairR) if x is not None)

    def pump(self, ready: Collection[object]) -> None:
        if not self._lent or threading.get_ident() != self._owner_id:
            return
        client = self._client
        rc = mqtt.MQTT_ERR_SUCCESS
        # Only what the wait saw readable is read (a read that finds nothing is a system call
        # for nothing, and an agent wakes three times per task: task, answer, PUBACK), and what
        # waits in a buffer, where the wait cannot see it (left by the network thread, or TLS's).
        waker = client._sockpairR
        if waker is not None and waker in ready:
            try:
                waker.recv(4096)  # wake-ups from other threads' publishes: write_pending sends them
            except OSError:
                pass
        sock = client.socket()
        if sock is not None and (sock in ready or (hasattr(sock, "pending") and sock.pending())):
            while rc == mqtt.MQTT_ERR_SUCCESS and sock is not None:
                rc = client.loop_read()
                # paho reads a bounded number of packets per call: go on while bytes wait in a
                # buffer (ours, or TLS's), where the wait would not see them.
                if not (hasattr(sock, "pending") and sock.pending()):
                    break
        if rc == mqtt.MQTT_ERR_SUCCESS:
            rc = client.loop_misc()  # keepalive: PINGREQ when due, a silent broker is lost
        if rc != mqtt.MQTT_ERR_SUCCESS or client.socket() is None:
            self._give_back()  # lost: the network thread reconnects

    def write_pending(self) -> None:
        # The acknowledgements of tasks just read leave here, after the owner handed the tasks
        # on (agent: to its task processes), not before: ~0.05 ms of a window-1 round trip.
        if self._lent and threading.get_ident() == self._owner_id and self._client.want_write():
            self._client.write_queued()
            self._check_lent()

    def _check_lent(self) -> None:
        """Owner thread: give the connection back when it is lost (the network thread
        reconnects) or when the socket took less than was queued (the network thread waits
        until it can write the rest, which the owner's wait, for reading only, would not)."""
        client = self._client
        if client.socket() is None or client.want_write():
            self._give_back()

    def _hold_back(self) -> None:
        """Owner thread: the network thread keeps the connection (reads, writes, acks) until
        ``_release_back``: while the owner waits for acks, or queues a big batch."""
        self._holds += 1
        if self._lent:
            self._give_back()

    def _release_back(self) -> None:
        self._holds -= 1
        if not self._holds:
            self._client.wake()  # the network thread's loop lends the connection again now

    def _disown_here(self) -> None:
        """The owner stops reading (it is about to wait for acks, or to close): for good."""
        if self._owner_id is not None and threading.get_ident() == self._owner_id:
            self._owner_id = None
            if self._lent:
                self._give_back()

    def _give_back(self) -> None:
        self._client.network_thread_id = self._network_thread_id
        self._lent = False
        self._back.set()

    def _lend(self) -> bool:
        """Network thread, connected: lend the connection to the owner and wait until it comes
        back. True when it came back still open (the owner stopped reading: go on looping)."""
        self._back.clear()
        self._client.network_thread_id = self._owner_id
        self._lent = True
        if self.on_lend is not None:
            try:
                self.on_lend()
            except Exception:  # noqa: BLE001
                log.exception("on_lend callback failed")
        stop_since: float | None = None
        while not self._back.wait(0.5):
            if self._stopping.is_set():
                # close() from another thread: the owner writes its DISCONNECT and gives the
                # connection back; one that stopped pumping does not, and it is taken back.
                stop_since = stop_since if stop_since is not None else time.monotonic()
                if time.monotonic() - stop_since > DISCONNECT_GRACE_SECONDS:
                    self._give_back()
        return self._client.socket() is not None
