"""SQLite WAL checkpoints on their own thread, off the engine's.

By default SQLite checkpoints inside a commit: the commit that takes the WAL past 1,000 pages
copies them into the database file first. With one result per step (``python -m
bench.engine_cpu --in-flight 1 --chunk 1``) that was one step in a hundred taking 4-15 ms
instead of ~0.07, and 20-25 % of the engine's time. At window 1 the p99 was 5.3-7.2 ms; with
this thread, 2.6-4.3 ms in 6 of 9 runs interleaved with the old code (7.2-8.1 in the other 3).
The p50 does not change.

``serve`` turns the engine connection's automatic checkpoints off (``PRAGMA
wal_autocheckpoint=0``) and runs this thread on a connection of its own. A PASSIVE checkpoint
never blocks the engine: it copies the frames committed when it began while the engine goes on
appending, and its fsyncs happen here, with the GIL released. The engine's next transaction
starts the WAL over if, by then, every frame was copied and no reader still needs one.

A busy engine has often written a few frames more by then, so the WAL could grow without end.
Once it holds ``CHECKPOINT_FINISH_PAGES``, the thread raises ``due`` and the engine, right after
its next commit, runs one PASSIVE checkpoint itself (``SqlStore.transaction``). That one copies
only what was written since the thread's, well under a millisecond's work, and the WAL starts over
at the engine's next transaction. (A RESTART checkpoint from this thread would deadlock with the
engine until its busy timeout: the engine's BEGIN IMMEDIATE takes a read lock before it waits for
the write lock, and RESTART waits for readers while holding the write lock.) Durability is
unchanged: each checkpoint syncs as the engine's own would have.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from typing import Any, Callable
from urllib.parse import quote

from dockercomp.coordinator.defaults import CHECKPOINT_INTERVAL, CHECKPOINT_FINISH_PAGES

log = logging.getLogger(__name__)

# PASSIVE checkpoints per turn, at most, while the engine keeps writing.
CATCH_UP_PASSES = 3


class Checkpointer:
    """``Checkpointer(path).start()``; ``stop()`` runs one last checkpoint and joins the thread."""

    def __init__(self, path: str, interval: float = CHECKPOINT_INTERVAL,
                 finish_pages: int = CHECKPOINT_FINISH_PAGES) -> None:
        self.path = path
        self.interval = interval
        self.finish_pages = finish_pages
        # Set here, read and cleared by the engine after a commit: the WAL is big, finish it.
        self.due = False
        self.owner = threading.get_ident()  # the thread whose connection stopped checkpointing: it stops this
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._failing = False  # the last attempt failed: say so once, and once when it works again
        # What the checkpoints did, for tests and the log at stop.
        self.runs = 0
        self.finishes = 0  # engine-side checkpoints (finish)
        self.failures = 0
        self.largest_wal = 0  # pages

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "Checkpointer":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="wal-checkpoint", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self.runs:
            log.debug("WAL checkpoints: %d, finished by the engine %d, failures %d, largest WAL %d pages",
                      self.runs, self.finishes, self.failures, self.largest_wal)

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                self.checkpoint()
            self.checkpoint()  # what the engine committed last is in the database file
        finally:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def checkpoint(self) -> tuple[int, int] | None:
        """PASSIVE checkpoints until one copied everything it saw (at most ``CATCH_UP_PASSES``);
        returns (pages in the WAL, pages copied) of the last, or None when it failed (logged
        once until it works again)."""
        try:
            conn = self._connection()
            for _ in range(CATCH_UP_PASSES):
                # What the engine wrote during one pass is copied by the next, a shorter one:
                # the last is likely to end between two of its transactions, and then the
                # engine's next transaction starts the WAL over.
                busy, pages, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                self.runs += 1
                self.largest_wal = max(self.largest_wal, pages)
                if copied >= pages:
                    break
        except sqlite3.Error as exc:
            self.failures += 1
            if not self._failing:
                self._failing = True
                log.warning("WAL checkpoint of %s failed, retrying every %g s: %s", self.path, self.interval, exc)
            if self._conn is not None:  # a fresh connection next time
                self._conn.close()
                self._conn = None
            return None
        if self._failing:
            self._failing = False
            log.info("WAL checkpoints of %s work again", self.path)
        if pages >= self.finish_pages:
            self.due = True  # the engine copies the rest after its next commit (finish)
        return pages, copied

    def finish(self, execute: Callable[[str], Any]) -> None:
        """The engine, after a commit while ``due``: copy the rest on its own connection (what
        the thread's last checkpoint did not see), so that its next transaction starts the WAL over."""
        self.due = False
        try:
            execute("PRAGMA wal_checkpoint(PASSIVE)")
        except Exception as exc:  # noqa: BLE001 - after the commit: never fail the engine's step
            self.failures += 1
            log.warning("WAL checkpoint of %s after a commit failed (the thread's go on): %s", self.path, exc)
            return
        self.finishes += 1

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            # mode=rw: never create an empty database where the engine's is missing.
            conn = sqlite3.connect(f"file:{quote(os.path.abspath(self.path))}?mode=rw", uri=True,
                                   isolation_level=None, check_same_thread=False)
            # The engine's durability (SqlStore.relax_durability): the checkpoint syncs the WAL
            # before copying it and the database file after.
            conn.execute("PRAGMA synchronous=NORMAL")
            self._conn = conn
        return self._conn
