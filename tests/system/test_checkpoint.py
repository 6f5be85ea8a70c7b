"""The engine's SQLite WAL checkpoints on their own thread (coordinator/checkpoint.py), on real
database files: the engine's commits no longer checkpoint, the thread's checkpoints keep the WAL
bounded and the data in the database file, and a failing checkpoint is logged once."""

from __future__ import annotations

import logging
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dockercomp.coordinator.checkpoint import Checkpointer
from dockercomp.coordinator.sqlstore import SqlStore
from dockercomp.coordinator.store import Store
from tests.support import wait_until


def _fill(store: Store, jobs: int, tasks: int = 200) -> None:
    for _ in range(jobs):
        store.create_job("add", [[i, i] for i in range(tasks)])


def _engine_store_without_its_thread(tmp_path: Path) -> Store:
    """A store set up as the engine's (no automatic checkpoints), its own checkpoint thread
    stopped: the test drives checkpoints, or starts a Checkpointer of its own."""
    store = Store.open(str(tmp_path / "coordinator.db"))
    store.relax_durability()
    store.checkpointer.stop()  # type: ignore[union-attr]
    return store


@pytest.fixture
def engine_store(tmp_path: Path) -> Iterator[SqlStore]:
    store = Store.open(str(tmp_path / "coordinator.db"))
    assert isinstance(store, SqlStore)
    yield store
    store.close()


def test_the_engine_connection_leaves_checkpoints_to_the_thread(engine_store: SqlStore) -> None:
    engine_store.relax_durability()

    (autocheckpoint,) = engine_store.db.execute_sql("PRAGMA wal_autocheckpoint").fetchone()
    (synchronous,) = engine_store.db.execute_sql("PRAGMA synchronous").fetchone()
    assert autocheckpoint == 0 and synchronous == 1  # NORMAL
    checkpointer = engine_store.checkpointer
    assert checkpointer is not None and checkpointer.running
    engine_store.relax_durability()  # a reload calls it again: still one thread
    assert engine_store.checkpointer is checkpointer


def test_its_checkpoints_copy_what_the_engine_committed(engine_store: SqlStore, tmp_path: Path) -> None:
    engine_store.relax_durability()
    checkpointer = engine_store.checkpointer
    assert checkpointer is not None
    checkpointer.stop()  # driven by hand below
    _fill(engine_store, 5)
    assert checkpointer.waiting() > 10  # type: ignore[operator] - the engine's commits did not checkpoint

    pages, copied = checkpointer.checkpoint()  # type: ignore[misc]

    assert pages > 10 and copied == pages
    reader = sqlite3.connect(tmp_path / "coordinator.db")
    assert reader.execute("SELECT COUNT(*) FROM task").fetchone() == (1000,)
    reader.close()


def _write(store: Store, tasks: int = 50) -> None:
    """One engine transaction (SqlStore.transaction, as the engine's steps)."""
    with store.transaction():
        job = store.create_job("add", [[i, i] for i in range(tasks)])
        store.db.execute_sql("UPDATE task SET state = 'assigned' WHERE job_id = ?", (job.id,))


def test_past_the_limit_the_engine_finishes_the_checkpoint_and_the_wal_starts_over(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "coordinator.db"))
    store.relax_durability()
    checkpointer = store.checkpointer
    assert checkpointer is not None
    checkpointer.stop()  # driven by hand below
    checkpointer.finish_pages = 20
    _fill(store, 5)

    checkpointer.checkpoint()
    assert checkpointer.due and checkpointer.largest_wal > 20
    _write(store)  # commits, then copies what it wrote: everything is in the database file

    assert not checkpointer.due and checkpointer.finishes == 1
    checkpointer.due = True
    with store.transaction():
        _write(store)  # nested: the finish waits for the outermost commit
        assert checkpointer.due and checkpointer.finishes == 1
    assert not checkpointer.due and checkpointer.finishes == 2 and checkpointer.failures == 0
    _write(store, tasks=1)  # this transaction starts at the front of the WAL
    pages, copied = checkpointer.checkpoint()  # type: ignore[misc]
    assert pages < 20 and copied == pages and not checkpointer.due
    store.close()


def test_the_wal_stays_bounded_while_the_engine_writes_without_a_pause(tmp_path: Path) -> None:
    """The worst case for the thread: no gap between the engine's transactions for its
    checkpoints to end in. The engine's own finishing checkpoints keep the WAL bounded."""
    store = _engine_store_without_its_thread(tmp_path)
    checkpointer = store.checkpointer = Checkpointer(str(tmp_path / "coordinator.db"), interval=0.01, pages=50,
                                                     finish_pages=200).start()
    deadline = time.monotonic() + 30
    while checkpointer.finishes < 5 and time.monotonic() < deadline:
        _write(store)

    assert checkpointer.finishes >= 5 and checkpointer.failures == 0
    # Each time: the limit, plus what the writes added during one turn of the thread.
    assert checkpointer.largest_wal < 1_000
    store.close()


def test_the_thread_checkpoints_once_enough_pages_wait(tmp_path: Path) -> None:
    """As SQLite's own automatic checkpoint would, and not on a timer: the pages the engine
    rewrites all the time would be copied more often (10-20 % more coordinator CPU per task with
    50,000 workers)."""
    store = _engine_store_without_its_thread(tmp_path)
    path = str(tmp_path / "coordinator.db")
    patient = Checkpointer(path, interval=0.01, pages=1_000_000).start()
    _fill(store, 3)
    waiting = patient.waiting()
    assert waiting is not None and waiting > 10  # read from the wal-index header
    time.sleep(0.2)
    assert patient.runs == 0

    eager = Checkpointer(path, interval=0.01, pages=10).start()
    assert wait_until(lambda: eager.runs >= 1, timeout=10)
    assert wait_until(lambda: eager.waiting() == 0, timeout=10)
    patient.stop()
    eager.stop()
    store.close()


def test_a_wal_index_it_cannot_read_means_a_checkpoint_now_and_then(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """No -shm file, or one of another layout version: it cannot tell how much waits, so it
    checkpoints once per _BLIND_INTERVAL (1 s) instead of never, or on every look."""
    (tmp_path / "other.db-shm").write_bytes(b"\0" * 200)  # layout version 0
    assert Checkpointer(str(tmp_path / "other.db")).waiting() is None
    assert Checkpointer(str(tmp_path / "none.db")).waiting() is None
    store = _engine_store_without_its_thread(tmp_path)
    _fill(store, 1)
    checkpointer = Checkpointer(str(tmp_path / "coordinator.db"), interval=0.01, pages=1_000_000)
    monkeypatch.setattr(checkpointer, "waiting", lambda: None)

    checkpointer.start()

    assert wait_until(lambda: checkpointer.runs >= 1, timeout=10)
    time.sleep(0.3)
    assert checkpointer.runs == 1  # not one per 10 ms look
    checkpointer.stop()
    store.close()


def test_close_runs_a_last_checkpoint_and_stops_the_thread(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "coordinator.db"))
    store.relax_durability()
    checkpointer = store.checkpointer
    assert checkpointer is not None
    checkpointer.interval = 3600  # only the last one
    _fill(store, 3)

    store.close()

    assert not checkpointer.running and store.checkpointer is None
    assert checkpointer.runs >= 1 and not Path(f"{tmp_path / 'coordinator.db'}-wal").exists()


def test_another_threads_close_leaves_the_engines_checkpoints_running(engine_store: SqlStore) -> None:
    engine_store.relax_durability()
    closer = threading.Thread(target=engine_store.close)  # e.g. a reader thread ending
    closer.start()
    closer.join()

    assert engine_store.checkpointer is not None and engine_store.checkpointer.running


def test_a_failing_checkpoint_is_logged_once_and_retried(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    missing = tmp_path / "gone" / "coordinator.db"  # its directory does not exist (yet)
    checkpointer = Checkpointer(str(missing))
    caplog.set_level(logging.INFO, logger="dockercomp.coordinator.checkpoint")

    assert checkpointer.checkpoint() is None and checkpointer.checkpoint() is None

    assert checkpointer.failures == 2
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "WAL checkpoint of" in caplog.records[0].getMessage() and "retrying" in caplog.records[0].getMessage()
    missing.parent.mkdir()
    assert checkpointer.checkpoint() is None and not missing.exists()  # never creates an empty database
    store = Store.open(str(missing))
    store.create_job("add", [[1, 2]])
    assert checkpointer.checkpoint() is not None
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"]
    assert "work again" in caplog.records[1].getMessage()
    checkpointer.stop()
    store.close()


# Run in another process: can it lock the wal-index's "DMS" byte (offset 128 of -shm, SQLite's
# unix VFS)? Every process with the database open holds a shared lock there; one that finds
# none takes the file for unused and truncates it.
_DMS_PROBE = r"""
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 128)
except OSError:
    print("held")
else:
    print("free")
"""


def _dms(path: str) -> str:
    return subprocess.run([sys.executable, "-c", _DMS_PROBE, f"{path}-shm"], capture_output=True, text=True,
                          check=True, timeout=30).stdout.strip()


def test_looking_at_the_wal_index_keeps_sqlite_s_lock_on_it(tmp_path: Path) -> None:
    """Closing any descriptor of a file drops every POSIX lock the process holds on it. A
    checkpointer that opened and closed -shm at each look dropped the engine connection's
    lock: the next process to open the database (any CLI command) truncated the wal-index
    under the engine's memory map, and the coordinator died of SIGBUS."""
    store = _engine_store_without_its_thread(tmp_path)
    _fill(store, 1)
    path = str(tmp_path / "coordinator.db")
    assert _dms(path) == "held"  # the engine's connection
    checkpointer = Checkpointer(path)

    for _ in range(3):
        assert checkpointer.waiting() is not None

    assert _dms(path) == "held"
    open(f"{path}-shm", "rb").close()  # what each look did before: the probe then finds the lock gone
    assert _dms(path) == "free"
    checkpointer.release()
    store.close()


def test_the_engine_s_store_closes_the_wal_index_only_after_its_connection(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "coordinator.db"))
    store.relax_durability()  # the engine's: its checkpoint thread looks at -shm every 50 ms
    checkpointer = store.checkpointer
    assert checkpointer is not None
    _fill(store, 2)
    wait_until(lambda: checkpointer._shm is not None, timeout=10)
    assert _dms(str(tmp_path / "coordinator.db")) == "held"

    store.close()

    assert checkpointer._shm is None and store.db.is_closed()


_ENGINE = r"""
import sys, time
from dockercomp.coordinator.store import Store
store = Store.open(sys.argv[1])
store.relax_durability()  # as `serve`: its checkpoint thread looks at -shm every 50 ms
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    store.create_job("add", [[1, 2]])
store.close()
"""


def test_an_engine_store_survives_other_processes_opening_its_database(tmp_path: Path) -> None:
    """What `dockercomp jobs`, `workers` or `status` do while `serve` runs. With the -shm file
    opened and closed at each look, the engine's process died of SIGBUS within a second here."""
    path = str(tmp_path / "coordinator.db")
    Store.open(path).close()
    engine = subprocess.Popen([sys.executable, "-c", _ENGINE, path, "3"])
    opened = 0
    try:
        while engine.poll() is None:
            reader = sqlite3.connect(path, timeout=10)
            reader.execute("SELECT count(*) FROM job").fetchone()
            reader.close()
            opened += 1
    finally:
        if engine.poll() is None:
            engine.kill()
        engine.wait(30)
    assert engine.returncode == 0, f"the engine's process ended with {engine.returncode} (-7: SIGBUS) after {opened} opens"
    assert opened > 10
