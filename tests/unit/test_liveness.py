"""Heartbeats: the coordinator's watch (coordinator/liveness.py) in the engine, on the memory
store and the in-memory broker with a fake clock: a repeated beat costs no store write, a worker
silent past its bound is lost and its work returned, its next beat brings it back, and a
worker announcing no heartbeat is never watched; and the agent's beat (agent/liveness.py)."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest

from dockercomp.agent.liveness import Heartbeat
from dockercomp.broker.memory import MemoryBroker
from dockercomp.broker.messages import Presence, PresenceState
from dockercomp.broker.topics import Topics, WorkerRef
from dockercomp.coordinator.service import Coordinator, CoordinatorSettings
from dockercomp.coordinator.store import Store
from tests.support.agents import FakeAgent

TOPICS = Topics()
SETTINGS = CoordinatorSettings(lease_margin=5, connect_timeout=1, heartbeat_misses=3, heartbeat_slack=5)


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def setup() -> tuple[Coordinator, FakeAgent, Clock, bytes]:
    broker, clock = MemoryBroker(), Clock()
    coordinator = Coordinator(Store.open("memory://"), broker.connect("coordinator"), TOPICS, SETTINGS, clock)
    coordinator.open()
    # Its rebirth answers would be its own presence, without the heartbeat: the beats answer here.
    agent = FakeAgent(broker.connect("agent"), "w1", auto=False, rebirth=False).start()
    decoded = Presence.decode(agent.presence("online"))
    beat = replace(decoded, heartbeat=2.0).encode()  # what an agent with --heartbeat 2 publishes
    agent.transport.publish(TOPICS.presence(agent.ref), beat, qos=1, retain=True)
    steps(coordinator, clock, 0.1, 3)
    return coordinator, agent, clock, beat


def steps(coordinator: Coordinator, clock: Clock, seconds: float, times: int) -> None:
    for _ in range(times):
        clock.now += seconds
        coordinator.step()


def test_a_beat_repeating_the_presence_moves_the_deadline_without_writing_the_store() -> None:
    coordinator, agent, clock, beat = setup()
    writes = []
    update = coordinator.store.update_worker
    coordinator.store.update_worker = lambda *a, **k: (writes.append(a), update(*a, **k))[1]  # type: ignore[method-assign]
    for _ in range(10):  # a beat every 3 s for 30 s: each within the 11 s bound
        agent.transport.publish(TOPICS.presence(agent.ref), beat, qos=0)
        steps(coordinator, clock, 1.5, 2)
    assert writes == []
    slot = coordinator.workers.get("local/w1")
    assert slot is not None and slot.state == "online" and slot.last_seen == pytest.approx(clock.now - 1.5)  # its last beat


def test_a_silent_worker_is_lost_past_its_bound_its_work_returned_and_its_next_beat_revives_it() -> None:
    coordinator, agent, clock, beat = setup()
    job = coordinator.store.create_job("add", [[1, 2]], timeout=300)  # a lease of 305 s
    steps(coordinator, clock, 0.2, 5)
    assert len(agent.received) == 1
    assert coordinator.liveness.bound(2.0) == 11.0
    steps(coordinator, clock, 1.0, 9)  # 10 s of silence: not yet
    assert coordinator.workers.get("local/w1").state == "online"  # type: ignore[union-attr]
    steps(coordinator, clock, 1.0, 2)
    slot = coordinator.workers.get("local/w1")
    assert slot is not None and slot.state == "lost"
    assert coordinator.leases.count(slot.id) == 0  # returned at once, not after its lease
    assert coordinator.store.progress(job).pending == 1
    steps(coordinator, clock, 0.5, 4)
    assert len(agent.received) == 1  # never given back to the lost worker...

    agent.transport.publish(TOPICS.presence(agent.ref), beat, qos=0)  # ...until it shows life again
    steps(coordinator, clock, 0.2, 5)
    assert coordinator.workers.get("local/w1").state == "online"  # type: ignore[union-attr]
    assert len(agent.received) == 2


def test_a_worker_announcing_no_heartbeat_is_never_watched() -> None:
    coordinator, agent, clock, _ = setup()
    agent.announce()  # the FakeAgent's own presence: heartbeat 0, as agents before issue 15
    steps(coordinator, clock, 0.1, 2)
    assert len(coordinator.liveness) == 0
    steps(coordinator, clock, 10.0, 10)
    assert coordinator.workers.get("local/w1").state == "online"  # type: ignore[union-attr]


def test_an_outage_of_the_coordinator_does_not_count_as_missed_beats() -> None:
    coordinator, agent, clock, beat = setup()
    coordinator._connection_changed(False, clock.now)
    clock.now += 60
    coordinator._connection_changed(True, clock.now)
    steps(coordinator, clock, 1.0, 5)
    assert coordinator.workers.get("local/w1").state == "online"  # type: ignore[union-attr]


# --- the agent's side (agent/liveness.py) ----------------------------------------------------------


class _Transport:
    def __init__(self) -> None:
        self.connected = True
        self.sent: list[tuple[str, bytes, int, bool]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.sent.append((topic, payload, qos, retain))


class _Agent:
    """What Heartbeat reads of an Agent: its presence, under its lock."""

    def __init__(self) -> None:
        self._presence_lock = threading.Lock()
        self._announced, self._left, self._seq = False, False, 7
        self.transport = _Transport()
        self.presence_topic = TOPICS.presence(WorkerRef("local", "w1"))

    def _live_state(self) -> PresenceState:
        return PresenceState.ONLINE

    def _presence(self, state: PresenceState, reason: object, seq: int) -> Presence:
        return Presence("w1", "local", state, seq, heartbeat=2.0)


def test_the_agent_beats_its_presence_not_retained_at_qos_0_only_while_announced_and_connected() -> None:
    clock, agent = Clock(), _Agent()
    beat = Heartbeat(agent, 2.0, clock)  # type: ignore[arg-type]
    clock.now += 2.0
    # Not announced yet (the presence on CONNACK comes first): nothing.
    assert beat.step() == clock.now + 2.0 and agent.transport.sent == []
    agent._announced = True
    clock.now += 1.0
    beat.step()
    assert agent.transport.sent == []  # not due yet
    clock.now += 1.0
    beat.step()
    (topic, payload, qos, retain), = agent.transport.sent
    assert (topic, qos, retain) == (agent.presence_topic, 0, False)
    assert Presence.decode(payload) == Presence("w1", "local", PresenceState.ONLINE, 7, heartbeat=2.0)
    agent.transport.connected = False
    clock.now += 2.0
    beat.step()
    agent.transport.connected, agent._left = True, True  # its goodbye is out: never again
    clock.now += 2.0
    beat.step()
    assert len(agent.transport.sent) == 1
    assert Heartbeat(agent, 0.0, clock).step() == float("inf")  # type: ignore[arg-type]  # --heartbeat 0
