"""PostgreSQL: the store suite of test_store.py on a real server (a fresh database per test),
and one end-to-end run of the coordinator with real agents on it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tests.contract import test_store  # until the store suite is one suite over every backend
from dockercomp.coordinator.errors import StoreError
from dockercomp.coordinator.service import Coordinator, CoordinatorSettings
from dockercomp.coordinator.store import Store
from tests.support import free_port, wait_until
from tests.support.brokers import BrokerProcess
from tests.support.processes import Processes, finished, online

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]

# The store suite, minus what is about SQLite itself, with its `store` fixture.
store = test_store.store
globals().update({name: getattr(test_store, name) for name in dir(test_store)
                  if name.startswith("test_") and not name.startswith("test_sqlite_")})


@pytest.fixture
def store_url(postgres_db: str) -> str:
    return postgres_db


def test_postgres_unreachable_server_says_what_to_do() -> None:
    with pytest.raises(StoreError, match="PostgreSQL server running"):
        Store.open(f"postgresql://postgres@127.0.0.1:{free_port()}/nothing")


def test_postgres_end_to_end_with_real_agents_and_a_killed_one(
        postgres_db: str, mosquitto: BrokerProcess, tmp_path: Path) -> None:
    settings = CoordinatorSettings(lease_margin=1, lease_check=0.1, purge_after=60, poll_interval=0.2,
                                   status_interval=0.2)
    engine = Coordinator.connect(mosquitto.url, postgres_db, settings).start()
    procs = Processes(mosquitto.url, tmp_path / "logs")
    try:
        store = engine.store
        for name in ("w0", "w1", "w2"):
            procs.agent(name)
        online(store, 3)
        job = store.create_job("sleep", [[0.02 + i / 1e6] for i in range(150)], timeout=30)
        # w2 has answered at least once (its results must stay attributed to it), then dies.
        wait_until(lambda: store.progress(job).done >= 20
                   and any(w.key == "local/w2" and w.tasks_done >= 1 for w in store.workers()), timeout=30)
        procs.kill("w2")  # its will returns what it held at once

        progress = finished(store, job)

        assert (progress.done, progress.failed) == (150, 0)
        rows = list(store.results(job))
        assert [r.value for r in rows] == [0.02 + i / 1e6 for i in range(150)]
        per_worker = Counter(r.worker for r in rows)
        assert set(per_worker) == {"local/w0", "local/w1", "local/w2"}
        assert {w.key: w.tasks_done for w in store.workers()} == dict(per_worker)
        assert {w.key: w.state for w in store.workers()}["local/w2"] == "lost"
        assert sum(engine.rejections.counts.values()) == 0
    finally:
        procs.stop_all()
        engine.stop()
    assert engine.error is None
