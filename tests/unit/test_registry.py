"""The worker registry: presence, connection sequence, confirmation, lost and purged workers,
on the memory store with a fake clock (no processes, no sockets)."""

from __future__ import annotations

import pytest

from dockercomp.broker.messages import OfflineReason
from dockercomp.coordinator.registry import PresenceChange, WorkerRegistry
from tests.support.rules import Rules


@pytest.fixture
def rules() -> Rules:
    return Rules()


def test_a_new_worker_is_stored_with_what_its_presence_says(rules: Rules) -> None:
    slot, change = rules.online("w1", capacity=4, prefetch=2, functions=("sum", "add"))
    assert change is PresenceChange.NEW and slot.confirmed and slot.limit == 6
    [row] = rules.store.workers()
    assert (row.key, row.state, row.capacity, row.prefetch, row.functions, row.first_seen) == (
        "local/w1", "online", 4, 2, ("add", "sum"), rules.now)
    assert rules.workers.dispatchable() == [slot]


def test_prefetch_is_capped(rules: Rules) -> None:
    slot, _ = rules.online("w1", prefetch=10_000)
    assert slot.prefetch == rules.store.workers()[0].prefetch < 10_000


def test_the_same_presence_again_changes_nothing_and_a_new_connection_is_a_reconnect(rules: Rules) -> None:
    rules.online("w1")
    assert rules.online("w1")[1] is PresenceChange.UNCHANGED
    assert rules.online("w1", reconnect=True)[1] is PresenceChange.RECONNECTED
    assert rules.online("w1", started=2.0, reconnect=True)[1] is PresenceChange.RESTARTED


def test_a_will_marks_the_worker_lost_and_a_stale_will_is_ignored(rules: Rules) -> None:
    rules.online("w1")
    rules.online("w1", reconnect=True)  # connection 2
    rules.tick(5)
    # a will of connection 1 arrives after connection 2's birth: stale
    slot, change = rules.offline("w1", seq=1)
    assert change is PresenceChange.STALE and slot.state == "online"
    # connection 2's own will: lost
    slot, change = rules.offline("w1")
    assert change is PresenceChange.LOST
    [row] = rules.store.workers()
    assert (row.state, row.lost_at) == ("lost", rules.now)
    assert rules.workers.dispatchable() == []
    # the retained online of that same connection, replayed later, is older news
    assert rules.online("w1")[1] is PresenceChange.STALE


def test_a_goodbye_is_a_shutdown_and_the_next_birth_brings_it_back(rules: Rules) -> None:
    rules.online("w1")
    assert rules.offline("w1", OfflineReason.SHUTDOWN)[1] is PresenceChange.SHUTDOWN
    assert rules.store.workers()[0].state == "offline"
    slot, change = rules.online("w1", reconnect=True)
    assert change is PresenceChange.ONLINE and rules.workers.dispatchable() == [slot]


def test_stored_workers_are_hearsay_until_their_presence_is_seen_again(rules: Rules) -> None:
    rules.online("w1", capacity=3)
    # a coordinator restarted on the same store
    rules.workers = WorkerRegistry(rules.store, rules.topics)
    rules.workers.load()
    [slot] = rules.workers
    assert (slot.key, slot.capacity, slot.confirmed) == ("local/w1", 3, False)
    assert rules.workers.dispatchable() == []
    # its retained presence, seen again, confirms it
    assert rules.online("w1", capacity=3)[1] is PresenceChange.RECONNECTED
    assert rules.workers.dispatchable() == [slot]


def test_after_an_outage_no_worker_gets_work_until_it_shows_life(rules: Rules) -> None:
    slot, _ = rules.online("w1")
    rules.workers.unconfirm_all()
    assert rules.workers.dispatchable() == []
    assert rules.online("w1")[1] is PresenceChange.RECONNECTED
    assert rules.workers.dispatchable() == [slot]


def test_lost_workers_are_purged_after_the_grace_period(rules: Rules) -> None:
    rules.online("w1")
    rules.online("w2")
    rules.offline("w1")
    rules.tick(30)
    assert rules.workers.purge(60, rules.now) == ([], [])
    rules.tick(31)
    purged, elsewhere = rules.workers.purge(60, rules.now)
    assert [s.key for s in purged] == ["local/w1"] and elsewhere == []
    assert {w.key: w.state for w in rules.store.workers()} == {"local/w1": "purged", "local/w2": "online"}


def test_a_purge_made_by_the_cli_is_noticed(rules: Rules) -> None:
    rules.online("w1")
    rules.offline("w1")
    rules.store.purge_lost(0, rules.now)  # `dockercomp coordinator purge` meanwhile
    purged, elsewhere = rules.workers.purge(60, rules.now)
    assert purged == [] and [s.key for s in elsewhere] == ["local/w1"]
    assert rules.workers.get("local/w1").state == "purged"  # type: ignore[union-attr]
