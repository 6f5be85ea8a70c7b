"""The engine's heap freezes (coordinator/heap.py): at the floor, then at each growth of the
fleet, and the engine checks after every step: a fleet registering on the memory broker
freezes once it reaches the floor."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from dockercomp.broker.memory import MemoryBroker
from dockercomp.broker.messages import Presence, PresenceState
from dockercomp.broker.topics import Topics, WorkerRef
from dockercomp.coordinator.heap import HeapFreezer
from dockercomp.coordinator.service import Coordinator, CoordinatorSettings
from dockercomp.coordinator.store import Store


@pytest.fixture(autouse=True)
def thawed() -> Iterator[None]:
    yield
    gc.unfreeze()  # the rest of the test session's objects are collected as usual


def test_freezes_at_the_floor_then_at_each_growth_and_not_in_between() -> None:
    heap = HeapFreezer(floor=100, growth=0.25)
    assert [n for n in (0, 50, 99) if heap.check(n)] == []
    assert gc.get_freeze_count() == 0
    assert heap.check(100) and gc.get_freeze_count() > 0
    assert heap.next_mark == 125
    assert not heap.check(124) and heap.check(125) and heap.next_mark == 156
    assert heap.check(10_000) and heap.next_mark == 12_500  # a burst: the next mark follows it
    assert heap.freezes == 3


def test_a_shrinking_or_steady_fleet_never_freezes_again() -> None:
    heap = HeapFreezer(floor=10, growth=0.5)
    assert heap.check(10)
    assert [n for n in (10, 14, 3, 0, 14) if heap.check(n)] == []
    assert heap.freezes == 1


def test_zero_growth_still_moves_the_mark_forward() -> None:
    heap = HeapFreezer(floor=1, growth=0.0)
    assert heap.check(5) and not heap.check(5) and heap.check(6)


def test_the_engine_freezes_when_its_fleet_reaches_the_floor() -> None:
    topics, broker = Topics(), MemoryBroker()
    coordinator = Coordinator(Store.open("memory://"), broker.connect("coordinator"), topics,
                              CoordinatorSettings(connect_timeout=1))
    coordinator.open()
    coordinator._heap = HeapFreezer(floor=20, growth=1.0)
    agents = broker.connect("agents")
    agents.start()

    def register(first: int, count: int) -> None:
        for i in range(first, first + count):
            ref = WorkerRef(f"v{i // 4}", f"w{i}")
            presence = Presence(ref.worker, ref.volunteer, PresenceState.ONLINE, 1, None, host="h", version="0",
                                cpus=1, capacity=1, functions=("noop",), started=1.0)
            agents.publish(topics.presence(ref), presence.encode(), qos=1, retain=True)
        while not coordinator._inbox.empty():
            coordinator.step()

    register(0, 19)
    assert len(coordinator.workers.by_id) == 19 and coordinator._heap.freezes == 0
    register(19, 1)
    assert coordinator._heap.freezes == 1 and coordinator._heap.next_mark == 40
    register(20, 19)
    assert coordinator._heap.freezes == 1
    coordinator.close()
