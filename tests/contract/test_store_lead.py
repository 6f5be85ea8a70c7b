"""The store contract for the active coordinator's lease (issue 15, a standby coordinator):
one holder at a time, a takeover only once the lease expired, and a fence that fails for the
holder that was replaced. Over every store (the ``store`` fixture of test_store.py); on SQLite
and PostgreSQL the candidates are two Store objects on one database, as two `serve` processes."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from dockercomp.coordinator.heartbeat import Heartbeat
from dockercomp.coordinator.leadership import Holder
from dockercomp.coordinator.store import Store
from tests.contract.test_store import add_worker, store  # noqa: F401 - `store` is a fixture

A = Holder("aaaaaaaaaaaa", "host-a", 101)
B = Holder("bbbbbbbbbbbb", "host-b", 202)


def rival(store: Store) -> Store:  # noqa: F811
    """A second candidate: another Store on the same database (the same object in memory)."""
    return store if store.url.startswith("memory://") else Store.open(store.url)


def test_the_first_claim_wins_and_a_second_holder_waits(store: Store) -> None:  # noqa: F811
    assert store.lead() is None
    other = rival(store)
    won = store.claim_lead(A, 30)
    assert (won.epoch, won.holder, won.host, won.pid) == (1, A.id, "host-a", 101)
    assert won.held_by(A) and won.expires_at - won.now == pytest.approx(30, abs=2)

    lost = other.claim_lead(B, 30)

    assert lost.epoch == 1 and lost.held_by(A) and not lost.held_by(B)
    seen = other.lead()
    assert seen is not None and (seen.epoch, seen.holder, seen.expires_at) == (1, A.id, won.expires_at)


def test_an_expired_lease_is_taken_over_and_the_old_holder_is_fenced(store: Store) -> None:  # noqa: F811
    other = rival(store)
    first = store.claim_lead(A, 0.2)
    with store.transaction():
        assert store.renew_lead(first.epoch, 0.2)
    time.sleep(0.4)  # A froze: its lease ran out

    taken = other.claim_lead(B, 30)

    assert (taken.epoch, taken.holder) == (first.epoch + 1, B.id)
    job = store.create_job("add", [[1, 2]])
    with pytest.raises(RuntimeError), store.transaction():
        # A wakes: its fence fails, so the engine rolls back whatever its transaction did.
        add_worker(store, "local/written-by-a-stale-holder")
        if not store.renew_lead(first.epoch, 30):
            raise RuntimeError("fenced")
    assert [w.key for w in store.workers()] == []
    assert store.lead().holder == B.id  # type: ignore[union-attr]
    with other.transaction():
        assert other.renew_lead(taken.epoch, 30)
    assert store.progress(job).total == 1


def test_a_live_lease_is_not_taken_unless_its_holder_is_known_dead(store: Store) -> None:  # noqa: F811
    other = rival(store)
    first = store.claim_lead(A, 30)
    assert other.claim_lead(B, 30, take_from=first.epoch + 5).holder == A.id  # a stale guess changes nothing

    taken = other.claim_lead(B, 30, take_from=first.epoch)

    assert (taken.epoch, taken.holder) == (2, B.id)
    with store.transaction():
        assert not store.renew_lead(first.epoch, 30)


def test_a_released_lease_is_taken_at_once_and_a_stale_release_changes_nothing(store: Store) -> None:  # noqa: F811
    other = rival(store)
    first = store.claim_lead(A, 30)
    store.release_lead(first.epoch)
    assert store.lead().expired  # type: ignore[union-attr]
    taken = other.claim_lead(B, 30)
    assert taken.held_by(B) and taken.epoch == 2

    store.release_lead(first.epoch)  # the old holder's late goodbye

    assert other.lead().held_by(B)  # type: ignore[union-attr]


def test_racing_claims_elect_exactly_one_holder(store: Store) -> None:  # noqa: F811
    candidates = [Holder(f"{n:012d}", f"host-{n}", n) for n in range(4)]
    stores = [store] + [rival(store) for _ in candidates[1:]]
    leads: list[object] = []
    barrier = threading.Barrier(len(candidates))

    def run(candidate: Holder, on: Store) -> None:
        barrier.wait()
        leads.append(on.claim_lead(candidate, 30))

    threads = [threading.Thread(target=run, args=pair) for pair in zip(candidates, stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    final = store.lead()
    assert final is not None and final.epoch == 1
    assert sum(lead.held_by(c) for lead in leads for c in candidates) == len(candidates)  # type: ignore[attr-defined]
    assert {lead.holder for lead in leads} == {final.holder}  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", [pytest.param("sqlite", marks=pytest.mark.real),
                                  pytest.param("postgres", marks=[pytest.mark.real, pytest.mark.postgres])])
def test_a_heartbeat_table_from_before_the_standby_gets_its_epoch(kind: str, tmp_path: Path,
                                                                  request: pytest.FixtureRequest) -> None:
    url = str(tmp_path / "old.db") if kind == "sqlite" else request.getfixturevalue("postgres_db")
    old = Store.open(url)
    old.bind()
    old.db.execute_sql("DROP TABLE heartbeat")  # type: ignore[attr-defined]
    old.db.execute_sql(  # type: ignore[attr-defined]
        "CREATE TABLE heartbeat (id INTEGER PRIMARY KEY, started DOUBLE PRECISION NOT NULL, "
        "beat_at DOUBLE PRECISION NOT NULL, stopped_at DOUBLE PRECISION, connected INTEGER NOT NULL DEFAULT 0, "
        "host VARCHAR(255) NOT NULL DEFAULT '', pid INTEGER NOT NULL DEFAULT 0, "
        "broker VARCHAR(512) NOT NULL DEFAULT '')")
    old.db.execute_sql("INSERT INTO heartbeat (id, started, beat_at) VALUES (1, 1.0, 2.0)")  # type: ignore[attr-defined]
    old.close()

    upgraded = Store.open(url)

    assert upgraded.heartbeat() == Heartbeat(1.0, 2.0, None, False, "", 0, "", 0)
    upgraded.beat(Heartbeat(1.0, 3.0, None, True, "lab", 7, "mqtt://b", epoch=4))
    assert upgraded.heartbeat().epoch == 4  # type: ignore[union-attr]
    upgraded.close()
