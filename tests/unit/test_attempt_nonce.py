"""Attempt nonces across the engine's restarts and upgrades: the nonce is kept with the attempt
in the database, so a restarted engine resends each open attempt with its own nonce and keeps
refusing answers without it; an attempt opened before nonces existed cannot be answered at
all and is sent again, with one, when its lease runs out. A SQLite file and the in-memory
broker (no sockets), on a fake clock."""

from __future__ import annotations

import base64
import string
from pathlib import Path

import pytest

from dockercomp.broker.memory import MemoryBroker
from dockercomp.broker.messages import MAX_NONCE_LENGTH
from dockercomp.broker.topics import Topics
from dockercomp.coordinator.defaults import NONCE_BYTES
from dockercomp.coordinator.leases import new_nonces
from dockercomp.coordinator.service import Coordinator, CoordinatorSettings
from dockercomp.coordinator.store import Store
from tests.support.agents import FakeAgent

TOPICS = Topics()
SETTINGS = CoordinatorSettings(lease_margin=5, connect_timeout=1)


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def engine(store: Store, broker: MemoryBroker, clock: Clock, name: str) -> Coordinator:
    coordinator = Coordinator(store, broker.connect(name), TOPICS, SETTINGS, clock)
    coordinator.open()
    return coordinator


def steps(coordinator: Coordinator, clock: Clock, seconds: float = 0.5, times: int = 4) -> None:
    for _ in range(times):
        clock.now += seconds
        coordinator.step()


def test_a_restarted_engine_resends_each_open_attempt_with_its_own_nonce(tmp_path: Path) -> None:
    broker, clock = MemoryBroker(), Clock()
    store = Store.open(str(tmp_path / "c.db"))
    first = engine(store, broker, clock, "coordinator-1")
    agent = FakeAgent(broker.connect("agent"), "w1", auto=False).start()
    job = store.create_job("add", [[1, 2]])
    steps(first, clock)
    [sent] = agent.received
    first.transport.kill()  # type: ignore[attr-defined]

    # When: another engine starts on the same database (it sees the worker's retained presence)
    second = engine(Store.open(str(tmp_path / "c.db")), broker, clock, "coordinator-2")
    steps(second, clock)

    # Then: the attempt is resent with the nonce it was first sent with; a guess is still forged
    assert agent.received == [sent, sent]
    forged = type(sent)(sent.task_id, sent.job_id, sent.attempt, sent.function, sent.args, sent.timeout,
                        nonce="x" * 22)
    agent.answer(forged, value=999)
    steps(second, clock, times=1)
    assert second.rejections.counts["forged"] == 1 and store.progress(job).done == 0
    agent.answer(sent)
    steps(second, clock, times=1)
    assert [row.value for row in store.results(job)] == [3]


def test_an_attempt_opened_before_nonces_is_sent_again_with_one(tmp_path: Path) -> None:
    # Given: a database of protocol version 1 (no nonce column) with an open attempt
    url = str(tmp_path / "old.db")
    old = Store.open(url)
    job = old.create_job("add", [[20, 22]])
    [task_id] = old.task_ids(job.id, ["pending"])
    worker = old.add_worker("local/w1", "local", "w1", 1.0, capacity=1, functions=["add"])
    old.open_attempts([(task_id, 1, worker.id, 1_800_000_003.0, "")], 1_800_000_000.0)
    old.db.execute_sql("ALTER TABLE attempt DROP COLUMN nonce")
    old.close()

    # When: this version opens it, and the worker answers what it is sent, nonce echoed
    broker, clock = MemoryBroker(), Clock()
    store = Store.open(url)
    assert [lease.nonce for lease in store.open_leases()] == [""]
    coordinator = engine(store, broker, clock, "coordinator")
    agent = FakeAgent(broker.connect("agent"), "w1", capacity=1, functions=("add",)).start()
    steps(coordinator, clock, seconds=1, times=8)  # past the old attempt's deadline

    # Then: the answer to the nonce-less attempt was refused (anyone could have sent it), the
    # attempt expired, and the new attempt, with a nonce, was answered and accepted.
    assert [(t.attempt, bool(t.nonce)) for t in agent.received] == [(1, False), (2, True)]
    assert coordinator.rejections.counts["forged"] == 1
    [row] = store.results(job)
    assert (row.value, row.attempts, row.state) == (42, 2, "done")
    coordinator.close()


@pytest.mark.parametrize("count", [1, 2, 25, 1000])
def test_nonces_drawn_together_are_each_a_full_token_and_all_differ(count: int) -> None:
    # Dispatch draws a round's nonces at once (one system call, one encoding): each must still
    # be NONCE_BYTES of randomness in URL-safe base64, nothing to escape in JSON, no two alike.
    nonces = new_nonces(count)
    assert len(nonces) == count and len(set(nonces)) == count
    for nonce in nonces:
        assert len(nonce) == NONCE_BYTES // 3 * 4 <= MAX_NONCE_LENGTH
        assert len(base64.urlsafe_b64decode(nonce)) == NONCE_BYTES
        assert set(nonce) <= set(string.ascii_letters + string.digits + "-_")
