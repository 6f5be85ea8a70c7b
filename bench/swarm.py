"""Simulated workers for scale mode: hundreds of light paho clients in one process.

Each simulated worker behaves like a real agent on the wire: a last will with a retained
offline (lost) presence, a retained online presence with the same ``seq`` on CONNACK
(capacity 1, offering the no-op function; again when a rebirth request asks), a QoS 1
subscription to its task topic, and a Result (outcome ok, value None; the bytes an agent sends) for every task, at once. It runs no task process: scale
mode measures the coordinator, not the agents.

All clients of one process share one ``selectors`` loop driven through paho's external-loop
callbacks (on_socket_open / register_write ...), so 250 workers cost one thread, not 250.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import time
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt

from dockercomp.broker.messages import OfflineReason, Outcome, Presence, PresenceState, Rebirth, Result
from dockercomp.broker.topics import Topics, WorkerRef
from bench.defaults import FUNCTION, KEEPALIVE
from bench.fleetbrokers import raise_fd_limit

# Seconds between paho housekeeping passes (keepalive pings, retries) over all clients.
_MISC_INTERVAL = 1.0
# Connections one swarm process has waiting for their CONNACK at once.
_MAX_CONNECTING = 200
# Seconds a TCP connect to the broker may take on a loaded machine.
_CONNECT_TIMEOUT = 30.0
# Longest select() wait, so a stop request is noticed quickly.
_SELECT_TIMEOUT = 0.1
# Placeholders in a simulated worker's Result template, replaced per task.
_TASK_ID = b"TASK-ID"
_ATTEMPT = b"987654321"
_NONCE = b"NONCE-PLACEHOLDER"


@dataclass
class _Sim:
    """One simulated worker's state."""

    ref: WorkerRef
    client: mqtt.Client
    seq: int
    online: Presence
    tasks_topic: str
    results_topic: str
    presence_topic: str
    result_template: bytes = b""
    connected: bool = False
    answered: int = 0


class Swarm:
    """Many simulated workers sharing one selector loop in the calling thread."""

    def __init__(self, host: str, port: int, workers: list[tuple[str, str]], *, root: str = "dockercomp",
                 source: str = "") -> None:
        """``workers``: (volunteer, worker name) of each simulated worker; ``source``: the local
        address they connect from (paho binds before it connects, so every connection of the
        machine from one address shares one pool of ephemeral ports, ~28,000)."""
        self.host, self.port, self.source = host, port, source
        self.topics = Topics(root)
        self.selector = selectors.DefaultSelector()
        self.sims: list[_Sim] = []
        self.connected = 0
        self._connecting = 0  # connects sent, CONNACK not seen yet
        self.malformed = 0
        hostname = socket.gethostname()
        for volunteer, name in workers:
            ref = WorkerRef(volunteer, name)
            seq = time.time_ns() // 1000
            online = Presence(worker=name, volunteer=volunteer, state=PresenceState.ONLINE, seq=seq,
                              host=hostname, version="bench", cpus=1, capacity=1,
                              functions=(FUNCTION,), started=time.time())
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-sim-{volunteer}-{name}",
                                 clean_session=True, protocol=mqtt.MQTTv311)
            client.max_inflight_messages_set(0)  # no walk over unacked messages per PUBACK
            sim = _Sim(ref, client, seq, online, self.topics.tasks(ref), self.topics.results(ref),
                       self.topics.presence(ref))
            sim.result_template = Result(task_id=_TASK_ID.decode(), attempt=int(_ATTEMPT), worker=name,
                                         volunteer=volunteer, outcome=Outcome.OK, value=None, elapsed=0.0,
                                         nonce=_NONCE.decode()).encode()
            will = Presence(worker=name, volunteer=volunteer, state=PresenceState.OFFLINE, seq=seq,
                            reason=OfflineReason.LOST)
            client.will_set(sim.presence_topic, will.encode(), qos=1, retain=True)
            client.user_data_set(sim)
            client.on_connect = self._on_connect
            client.on_message = self._on_message
            # A callback of its own: the tasks' on_message stays as it was.
            client.message_callback_add(self.topics.coordinator_rebirth, self._on_rebirth)
            client.on_socket_open = self._on_socket_open
            client.on_socket_close = self._on_socket_close
            client.on_socket_register_write = self._on_register_write
            client.on_socket_unregister_write = self._on_unregister_write
            self.sims.append(sim)

    # -- lifecycle -----------------------------------------------------------------------
    def connect_all(self) -> None:
        """Open every connection (TCP connect + CONNECT queued); the loop does the rest."""
        next_misc = time.monotonic() + _MISC_INTERVAL
        for sim in self.sims:
            if time.monotonic() >= next_misc:  # keepalive pings of those connected already
                self.housekeeping()
                next_misc = time.monotonic() + _MISC_INTERVAL
            # Paced: tens of thousands of back-to-back connects overflow the broker's accept
            # queue on a busy machine, and a dropped SYN costs a second or more per client.
            while self._connecting >= _MAX_CONNECTING:
                self.step(_SELECT_TIMEOUT / 10)
            sim.client.connect_timeout = _CONNECT_TIMEOUT
            sim.client.connect(self.host, self.port, KEEPALIVE, bind_address=self.source)
            self._connecting += 1
            # Service what already arrived, so early clients get their CONNACK promptly.
            self.step(0)

    def step(self, timeout: float = _SELECT_TIMEOUT) -> None:
        for key, mask in self.selector.select(timeout):
            client: mqtt.Client = key.data
            if mask & selectors.EVENT_READ:
                client.loop_read()
            if mask & selectors.EVENT_WRITE:
                client.loop_write()

    def housekeeping(self) -> None:
        for sim in self.sims:
            sim.client.loop_misc()

    def close(self) -> None:
        """Clean disconnects (no will): the broker is about to go away anyway."""
        for sim in self.sims:
            sim.client.disconnect()
        deadline = time.monotonic() + 2.0
        while self.selector.get_map() and time.monotonic() < deadline:
            self.step(0.05)

    @property
    def answered(self) -> dict[str, int]:
        return {sim.ref.worker: sim.answered for sim in self.sims}

    # -- paho callbacks (all on this thread) -------------------------------------------------
    def _on_socket_open(self, client: mqtt.Client, sim: _Sim, sock: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.selector.register(sock, selectors.EVENT_READ, client)

    def _on_socket_close(self, client: mqtt.Client, sim: _Sim, sock: Any) -> None:
        try:
            self.selector.unregister(sock)
        except (KeyError, ValueError):
            pass

    def _on_register_write(self, client: mqtt.Client, sim: _Sim, sock: Any) -> None:
        self.selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)

    def _on_unregister_write(self, client: mqtt.Client, sim: _Sim, sock: Any) -> None:
        try:
            self.selector.modify(sock, selectors.EVENT_READ, client)
        except (KeyError, ValueError):
            pass

    def _on_connect(self, client: mqtt.Client, sim: _Sim, flags: Any, reason: Any, props: Any) -> None:
        if not sim.connected:
            self._connecting -= 1  # answered: another client may connect (connect_all)
        if reason.is_failure:
            return
        client.subscribe([(sim.tasks_topic, 1), (self.topics.coordinator_rebirth, 1)])
        client.publish(sim.presence_topic, sim.online.encode(), qos=1, retain=True)
        if not sim.connected:
            sim.connected = True
            self.connected += 1

    def _on_rebirth(self, client: mqtt.Client, sim: _Sim, message: Any) -> None:
        if not message.retain and Rebirth.decode(message.payload).asks(sim.ref.key):
            client.publish(sim.presence_topic, sim.online.encode(), qos=1, retain=True)

    def _on_message(self, client: mqtt.Client, sim: _Sim, message: Any) -> None:
        # A light parse, not Task.decode: the coordinator's cost is what scale mode measures,
        # and every microsecond spent here is taken from it on a small machine.
        try:
            task = json.loads(message.payload)
            task_id, attempt, nonce = task["task_id"], task["attempt"], task["nonce"]
            if not isinstance(task_id, str) or not isinstance(attempt, int) or not isinstance(nonce, str):
                raise ValueError("bad task_id or attempt")
        except (ValueError, KeyError, TypeError):
            self.malformed += 1
            return
        sim.answered += 1
        payload = (sim.result_template.replace(_TASK_ID, task_id.encode()).replace(_ATTEMPT, str(attempt).encode())
                   .replace(_NONCE, nonce.encode()))
        client.publish(sim.results_topic, payload, qos=1)


def swarm_main(host: str, port: int, workers: list[tuple[str, str]], root: str, go: Any, stop: Any,
               reports: Any, source: str = "") -> None:
    """A swarm process (spawned): build the clients, wait for ``go``, connect them all, serve
    tasks until ``stop``; reports ("ready", pid), ("connected", pid, monotonic time) and
    ("answered", pid, {worker: tasks}, malformed) on the ``reports`` queue."""
    raise_fd_limit()  # one descriptor per simulated worker
    swarm = Swarm(host, port, workers, root=root, source=source)
    reports.put(("ready", os.getpid()))
    go.wait()
    swarm.connect_all()
    announced = False
    next_misc = time.monotonic() + _MISC_INTERVAL
    while not stop.is_set():
        swarm.step()
        now = time.monotonic()
        if not announced and swarm.connected == len(swarm.sims):
            reports.put(("connected", os.getpid(), now))
            announced = True
        if now >= next_misc:
            swarm.housekeeping()
            next_misc = now + _MISC_INTERVAL
    reports.put(("answered", os.getpid(), swarm.answered, swarm.malformed))
    swarm.close()
