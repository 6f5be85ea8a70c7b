"""The engine under an elected lead (coordinator/leader.py): two engines on one SQLite file, as
two `serve` processes, and the in-memory broker. The standby neither connects nor writes; it
takes over once the active one's lease ran out; the deposed one's next step writes nothing,
and it leaves without a goodbye; the active one replaces an older coordinator's presence.
The real processes, PostgreSQL and SIGSTOP are in tests/system/test_standby.py."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from dockercomp.broker.memory import MemoryBroker
from dockercomp.broker.messages import decode_status, encode_status
from dockercomp.broker.topics import Topics
from dockercomp.coordinator.leader import LeadLost, Leader
from dockercomp.coordinator.leadership import Holder
from dockercomp.coordinator.service import Coordinator, CoordinatorSettings
from dockercomp.coordinator.store import Store
from tests.support import wait_until
from tests.support.agents import FakeAgent

TOPICS = Topics()
SETTINGS = CoordinatorSettings(lease_margin=5, lease_check=0.05, poll_interval=0.05, connect_timeout=1)
TTL = 0.5


def candidate(url: str, broker: MemoryBroker, name: str) -> Coordinator:
    engine = Coordinator(Store.open(url), broker.connect(name), TOPICS, SETTINGS)
    engine.leader = Leader(engine.store, TTL, poll=0.05)
    return engine


def run_for(engine: Coordinator, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        engine.step(0.01)


def snapshot(store: Store) -> list[object]:
    """Every row the engine writes (the lead's own row aside: its holder owns it)."""
    store.bind()
    db = store.db  # type: ignore[attr-defined]
    return [db.execute_sql(f"SELECT * FROM {table} ORDER BY 1").fetchall()
            for table in ("worker", "job", "task", "attempt", "result", "heartbeat")]


def presence(broker: MemoryBroker) -> dict[str, object]:
    return decode_status(broker.retained[TOPICS.coordinator_presence])


def test_the_standby_takes_over_and_the_deposed_engine_writes_nothing(tmp_path: Path) -> None:
    url, broker = str(tmp_path / "c.db"), MemoryBroker()
    first, second = candidate(url, broker, "coordinator-a"), candidate(url, broker, "coordinator-b")
    assert first.leader.wait(threading.Event())  # type: ignore[union-attr]
    first.open()
    agent = FakeAgent(broker.connect("agent"), "w1", auto=False).start()
    job = first.store.create_job("add", [[1, 2], [3, 4]])
    run_for(first, 0.2)
    assert len(agent.held) == 2 and presence(broker)["id"] == first.leader.holder.id  # type: ignore[union-attr]

    # The standby waits: not connected to the broker, nothing written.
    standby = threading.Thread(target=second.leader.wait, args=(threading.Event(),))  # type: ignore[union-attr]
    before = snapshot(first.store)
    standby.start()
    time.sleep(0.2)
    assert standby.is_alive() and not second.transport.connected and snapshot(first.store) == before

    # The active one freezes (no step): its lease runs out and the standby takes over.
    standby.join(5)
    assert not standby.is_alive() and second.leader.epoch == first.leader.epoch + 1  # type: ignore[union-attr]
    assert not first.leader.fresh()  # type: ignore[union-attr]  # by its own clock: it publishes nothing more
    second.open()
    run_for(second, 0.2)
    assert presence(broker)["epoch"] == 2 and presence(broker)["role"] == "active"
    agent.answer_held()  # the results reach the new active one: it resent nothing twice
    wait_until(lambda: run_for(second, 0.05) or second.store.progress(job).done == 2, timeout=5)

    # The frozen one wakes with a result in its inbox: its step writes nothing and it stops.
    other = first.store.create_job("add", [[5, 6]])
    frozen = snapshot(second.store)
    with pytest.raises(LeadLost):
        first.step(0.0)
    assert snapshot(second.store) == frozen
    first.close()
    assert presence(broker)["id"] == second.leader.holder.id  # type: ignore[union-attr]  # no goodbye over it
    run_for(second, 0.2)
    agent.answer_held()
    wait_until(lambda: run_for(second, 0.05) or second.store.progress(other).done == 1, timeout=5)
    second.close()


def test_an_older_coordinator_presence_is_replaced_by_the_active_one(tmp_path: Path) -> None:
    broker = MemoryBroker()
    engine = candidate(str(tmp_path / "c.db"), broker, "coordinator")
    assert engine.leader.wait(threading.Event())  # type: ignore[union-attr]
    engine.open()
    run_for(engine, 0.1)
    publisher = broker.connect("predecessor")
    publisher.start()

    # A predecessor's will, fired late (epoch 0: before this one's), then a newer holder's presence.
    publisher.publish(TOPICS.coordinator_presence, encode_status({"state": "offline", "reason": "lost", "epoch": 0}),
                      retain=True)
    assert presence(broker)["state"] == "online" and presence(broker)["id"] == engine.leader.holder.id  # type: ignore[union-attr]
    newer = encode_status({"state": "online", "epoch": 99, "id": "someone-else"})
    publisher.publish(TOPICS.coordinator_presence, newer, retain=True)
    assert broker.retained[TOPICS.coordinator_presence] == newer  # the stale one is this engine: it says nothing
    engine.close()


def test_a_clean_stop_releases_the_lead_and_a_stopped_standby_leaves_no_trace(tmp_path: Path) -> None:
    url, broker = str(tmp_path / "c.db"), MemoryBroker()
    first, second = candidate(url, broker, "coordinator-a"), candidate(url, broker, "coordinator-b")
    assert first.leader.wait(threading.Event())  # type: ignore[union-attr]
    first.open()
    run_for(first, 0.1)
    stop = threading.Event()
    stop.set()
    assert not second.leader.wait(stop)  # type: ignore[union-attr]
    before = snapshot(first.store)
    second.close()  # a standby stopped: no presence, no heartbeat
    assert snapshot(first.store) == before and presence(broker)["id"] == first.leader.holder.id  # type: ignore[union-attr]

    first.close()

    lead = Store.open(url).lead()
    assert lead is not None and lead.expired and presence(broker)["state"] == "offline"


@pytest.mark.parametrize("payload, replaced", [
    (b"", True),  # a cleared retained presence
    (b"not json", True),
    (b"[1, 2]", True),
    (encode_status({"state": "offline", "reason": "lost"}), True),  # an unelected coordinator's will
    (encode_status({"state": "online", "epoch": -1}), True),
    (encode_status({"state": "online", "epoch": 4}), True),
    (encode_status({"state": "online", "epoch": "99"}), True),  # wrong type: not a claim to be newer
    (encode_status({"state": "online", "epoch": True}), True),
    (encode_status({"state": "online", "epoch": 99.0}), True),
    (encode_status({"state": "online", "epoch": 5, "id": "someone-else"}), True),  # same epoch, not us: a forgery
    (encode_status({"state": "online", "epoch": 6}), False),  # newer: this one is the stale one
    (encode_status({"state": "online", "epoch": 10**30}), False),
    (encode_status({"state": "online", "epoch": 5, "id": "me"}), False),  # our own echo
    (b"x" * 1_000_000, True),
])
def test_which_coordinator_presences_the_active_one_replaces(payload: bytes, replaced: bool) -> None:
    leader = Leader(Store.open("memory://"), TTL, holder=Holder("me", "lab", 1))
    leader.epoch = 5
    assert leader.outranks(payload) is replaced


def test_serve_refuses_a_lease_the_engine_would_not_renew_in_time() -> None:
    from click.testing import CliRunner

    from dockercomp.coordinator.cli import main

    result = CliRunner().invoke(main, ["serve", "--lease-ttl", "2", "--lease-check", "1", "--db", "memory://"])

    assert result.exit_code == 2
    assert "--lease-ttl" in result.output and "less than 3 x --lease-check" in result.output
