"""The engine's heap freezes (coordinator/heap.py): at the floor, then at each growth of the
fleet; a shrinking fleet and a reload thaw it (a dropped cycle is collected then); the engine
checks after every step: a fleet registering on the memory broker freezes once it reaches the
floor, and again after a reload."""

from __future__ import annotations

import gc
import weakref
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
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()  # the rest of the test session's objects are collected as usual
    gc.set_threshold(*thresholds)


def test_freezes_at_the_floor_then_at_each_growth_and_not_in_between() -> None:
    heap = HeapFreezer(floor=100, growth=0.25)
    assert [n for n in (0, 50, 99) if heap.check(n)] == []
    assert gc.get_freeze_count() == 0
    assert heap.check(100) and gc.get_freeze_count() > 0
    assert heap.next_mark == 125
    assert not heap.check(124) and heap.check(125) and heap.next_mark == 156
    assert heap.check(10_000) and heap.next_mark == 12_500  # a burst: the next mark follows it
    assert heap.freezes == 3


def test_a_steady_fleet_never_freezes_again() -> None:
    heap = HeapFreezer(floor=10, growth=0.5)
    assert heap.check(10)
    assert [n for n in (10, 14, 7, 14, 10) if heap.check(n)] == []  # 7 x 1.5 is not below 10
    assert heap.freezes == 1


def test_zero_growth_still_moves_the_mark_forward() -> None:
    heap = HeapFreezer(floor=1, growth=0.0)
    assert heap.check(5) and not heap.check(5) and heap.check(6)


class _Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the cyclic collector frees it


def test_a_shrinking_fleet_thaws_and_a_dropped_cycle_is_collected_then() -> None:
    heap = HeapFreezer(floor=100, growth=0.25)
    node = _Node()
    gone = weakref.ref(node)
    assert heap.check(1000) and heap.frozen_at == 1000
    del node
    gc.collect()
    assert gone() is not None  # frozen: the collector does not look at it
    assert not heap.check(800)  # shrank by no more than the growth share: still frozen
    assert gone() is not None and heap.frozen_at == 1000
    assert heap.check(799)  # 799 x 1.25 < 1000: thawed, collected, frozen again as it is now
    assert gone() is None and heap.frozen_at == 799 and heap.next_mark == 998


def test_thaw_collects_and_the_next_check_freezes_again() -> None:
    heap = HeapFreezer(floor=10, growth=0.25)
    heap.thaw()  # never frozen: nothing to do
    assert heap.check(50)
    node = _Node()
    gone = weakref.ref(node)
    heap.check(100)
    del node
    heap.thaw()
    assert gone() is None and gc.get_freeze_count() == 0 and heap.next_mark == 10
    assert heap.check(50) and heap.freezes == 3


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
    # a reload after a failed transaction rebuilds the state: the old one must be collectable
    assert coordinator._reload() and coordinator._heap.frozen_at == 0 and gc.get_freeze_count() == 0
    coordinator.step()
    assert coordinator._heap.freezes == 2 and coordinator._heap.frozen_at == 39
    coordinator.close()


def test_while_frozen_the_oldest_generation_is_collected_less_often_and_thawing_restores_it() -> None:
    # Given the collector's own thresholds
    before = gc.get_threshold()
    heap = HeapFreezer(floor=10, growth=0.5, full_every=before[2] * 10)

    # When the heap freezes, and again
    assert heap.check(10)
    raised = gc.get_threshold()
    assert heap.check(15)

    # Then only the oldest generation's threshold was raised, once, and a thaw gives it back
    assert raised == (before[0], before[1], before[2] * 10) and gc.get_threshold() == raised
    heap.thaw()
    assert gc.get_threshold() == before
    # A threshold already above it is left alone
    gc.set_threshold(before[0], before[1], before[2] * 20)
    assert heap.check(10) and gc.get_threshold()[2] == before[2] * 20
    heap.thaw()
    assert gc.get_threshold()[2] == before[2] * 20
