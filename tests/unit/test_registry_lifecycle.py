"""The registry's part in a worker's life cycle (issue 10, items 1 and 2): draining, replayed
presences that prove nothing, rebirth deadlines and workers presumed lost; memory store,
fake clock."""

from __future__ import annotations

import pytest

from dockercomp.broker.errors import DecodeError
from dockercomp.broker.messages import OfflineReason, Presence, PresenceState, Rebirth
from dockercomp.broker.topics import WorkerRef
from dockercomp.coordinator.registry import PresenceChange, WorkerSlot
from tests.support.rules import Rules

REF = WorkerRef("local", "w1")


def say(rules: Rules, state: PresenceState, live: bool = True, seq: int = 1) -> tuple[WorkerSlot, PresenceChange]:
    presence = Presence(worker="w1", volunteer="local", state=state, seq=seq, capacity=1, functions=("add",),
                        started=1.0, reason=OfflineReason.SHUTDOWN if state is PresenceState.OFFLINE else None)
    return rules.workers.apply(REF, presence, rules.now, live)


def test_a_draining_worker_gets_no_work_and_its_goodbye_is_a_shutdown() -> None:
    rules = Rules()
    slot, _ = say(rules, PresenceState.ONLINE)
    assert rules.workers.dispatchable() == [slot]
    assert say(rules, PresenceState.DRAINING)[1] is PresenceChange.DRAINING
    assert rules.workers.dispatchable() == [] and rules.store.workers()[0].state == "draining"
    assert say(rules, PresenceState.DRAINING)[1] is PresenceChange.UNCHANGED
    assert say(rules, PresenceState.ONLINE)[1] is PresenceChange.STALE  # the same connection's older news
    assert say(rules, PresenceState.OFFLINE)[1] is PresenceChange.SHUTDOWN


def test_a_replayed_presence_does_not_confirm_and_silence_makes_the_worker_lost() -> None:
    rules = Rules()
    rules.workers.answer_timeout = 5
    slot, change = say(rules, PresenceState.ONLINE, live=False)
    assert change is PresenceChange.NEW and not slot.confirmed and rules.workers.dispatchable() == []
    rules.tick(4.9)
    assert rules.workers.silent(rules.now) == []
    rules.tick(0.2)
    assert rules.workers.silent(rules.now) == [slot]
    rules.workers.presume_lost(slot, rules.now)
    assert rules.store.workers()[0].state == "lost"
    # Its retained online, replayed again, does not bring it back; a live answer does.
    assert say(rules, PresenceState.ONLINE, live=False)[1] is PresenceChange.STALE
    assert say(rules, PresenceState.ONLINE)[1] is PresenceChange.ONLINE
    assert rules.workers.dispatchable() == [slot]


def test_a_live_answer_to_the_rebirth_request_confirms() -> None:
    rules = Rules()
    rules.workers.answer_timeout = 5
    slot, _ = say(rules, PresenceState.ONLINE)
    rules.workers.unconfirm_all()  # the coordinator reconnected
    rules.workers.ask_all(rules.now)
    assert rules.workers.dispatchable() == []
    assert say(rules, PresenceState.ONLINE)[1] is PresenceChange.RECONNECTED
    rules.tick(10)
    assert rules.workers.silent(rules.now) == [] and rules.workers.dispatchable() == [slot]


def test_a_worker_asked_after_an_expired_lease_gets_work_again_once_it_answers() -> None:
    rules = Rules()
    rules.workers.answer_timeout = 5
    slot, _ = say(rules, PresenceState.ONLINE)
    rules.workers.ask(slot, rules.now)
    assert rules.workers.dispatchable() == []
    say(rules, PresenceState.ONLINE)
    assert rules.workers.dispatchable() == [slot] and rules.workers.awaiting == {}


def test_a_rebirth_request_round_trips_and_a_bad_one_is_refused() -> None:
    assert Rebirth.decode(Rebirth().encode()).asks("local/w1")
    targeted = Rebirth.decode(Rebirth(("local/w2",)).encode())
    assert targeted.asks("local/w2") and not targeted.asks("local/w1")
    with pytest.raises(DecodeError, match="'workers' must be a list"):
        Rebirth.decode(b'{"v":2,"workers":[""]}')


def test_a_paused_worker_gets_no_work_is_not_lost_and_resumes_on_the_same_connection() -> None:
    """Issue 12: paused is connected and alive (its will still counts), resumable (unlike
    draining), and a resume on the same seq is not stale."""
    rules = Rules()
    slot, _ = say(rules, PresenceState.ONLINE)
    assert say(rules, PresenceState.PAUSED)[1] is PresenceChange.PAUSED
    assert rules.workers.dispatchable() == [] and rules.store.workers()[0].state == "paused"
    assert say(rules, PresenceState.PAUSED)[1] is PresenceChange.UNCHANGED
    assert say(rules, PresenceState.ONLINE)[1] is PresenceChange.RESUMED
    assert rules.workers.dispatchable() == [slot]
    # Paused again, then its will (same connection): lost, so what it holds goes back.
    say(rules, PresenceState.PAUSED)
    will = Presence(worker="w1", volunteer="local", state=PresenceState.OFFLINE, seq=1, reason=OfflineReason.LOST)
    assert rules.workers.apply(REF, will, rules.now, True)[1] is PresenceChange.LOST
    # A paused worker that reconnects (new seq) announces paused again: no work yet.
    assert say(rules, PresenceState.PAUSED, seq=2)[1] is PresenceChange.PAUSED
    assert rules.workers.dispatchable() == []
    # Paused, then shutting down: draining.
    assert say(rules, PresenceState.DRAINING, seq=2)[1] is PresenceChange.DRAINING
