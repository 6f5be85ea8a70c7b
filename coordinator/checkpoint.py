"""SQLite WAL checkpoints on their own thread, off the engine's.

By default SQLite checkpoints inside a commit: the commit that takes the WAL past 1,000 pages
copies them into the database file first. With one result per step (``python -m
bench.engine_cpu --in-flight 1 --chunk 1``) that was one step in a hundred taking 4-15 ms
instead of ~0.07, and 20-25 % of the engine's time. Against the old code, in turns
(``python -m bench.compare 6f8d47c``, 4 pairs): window-1 p99 5.47 -> 2.50 ms, lower in every
pair; the p50 does not change. With 50,000 workers, coordinator CPU per task 0.88-0.98 x.

``serve`` turns the engine connection's automatic checkpoints off (``PRAGMA
wal_autocheckpoint=0``) and runs this thread on a connection of its own. It checkpoints when
as many frames wait to be copied as SQLite's own would have (``CHECKPOINT_PAGES``): it reads
that count from the wal-index header in the ``-shm`` file every ``CHECKPOINT_INTERVAL``, a
few-byte read (https://www.sqlite.org/walformat.html). Checkpointing by time instead copied the
pages the engine writes over and over (indexes, the worker rows) several times as often, and
with 50,000 workers cost the coordinator 10-20 % more CPU per task. A PASSIVE checkpoint never
blocks the engine: it copies the frames committed when it began while the engine goes on
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

The ``-shm`` file is opened once and closed only by ``release()``, after the engine's own
connection closed (``SqlStore.close``). Closing *any* descriptor of a file drops every POSIX
lock the process holds on it (https://www.sqlite.org/howtocorrupt.html, 2.2), SQLite's among
them: a version that opened and closed the file at each look dropped the engine's lock on the
wal-index, so the next process to open the database (any CLI command) took it for unused and
truncated it under the engine's memory map, and the coordinator died of SIGBUS without a word.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import struct
import threading
import time
from typing import Any, Callable
from urllib.parse import quote

from dockercomp.coordinator.defaults import CHECKPOINT_FINISH_PAGES, CHECKPOINT_INTERVAL, CHECKPOINT_PAGES

log = logging.getLogger(__name__)

# The wal-index header (walformat.html), in the machine's byte order: its version at byte 0,
# mxFrame (the frames in the WAL) at byte 16, nBackfill (those already copied into the
# database file) at byte 96. Another version: the layout is not known, so not read.
_FIELD = struct.Struct("=I")
_VERSION, _MX_FRAME_AT, _BACKFILL_AT = 3007000, 16, 96
# Seconds between checkpoints when that header cannot be read (no WAL yet, another VFS).
_BLIND_INTERVAL = 1.0


class Checkpointer:
    """``Checkpointer(path).start()``; ``stop()`` runs one last checkpoint and joins the thread."""

    def __init__(self, path: str, interval: float = CHECKPOINT_INTERVAL, pages: int = CHECKPOINT_PAGES,
                 finish_pages: int = CHECKPOINT_FINISH_PAGES) -> None:
        self.path = path
        self.interval = interval
        self.pages = pages
        self.finish_pages = finish_pages
        # Set here, read and cleared by the engine after a commit: the WAL is big, finish it.
        self.due = False
        self.owner = threading.get_ident()  # the thread whose connection stopped checkpointing: it stops this
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._shm: int | None = None  # the -shm file's descriptor, open until release()
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

    def release(self) -> None:
        """Close the ``-shm`` descriptor: only once no SQLite connection of this process to the
        database is open any more (see the module's docstring), and after ``stop``."""
        if self._shm is not None:
            os.close(self._shm)
            self._shm = None

    def _run(self) -> None:
        blind_since = float("-inf")
        try:
            while not self._stop.wait(self.interval):
                waiting = self.waiting()
                if waiting is None:  # cannot tell: checkpoint now and then anyway
                    if time.monotonic() - blind_since < _BLIND_INTERVAL:
                        continue
                    blind_since = time.monotonic()
                elif waiting < self.pages:
                    continue
                self.checkpoint()
            self.checkpoint()  # what the engine committed last is in the database file
        finally:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def waiting(self) -> int | None:
        """WAL frames not copied into the database file yet, from the wal-index header (a
        lock-free read: at worst a moment old), or None when it cannot be read."""
        try:
            if self._shm is None:
                self._shm = os.open(f"{self.path}-shm", os.O_RDONLY | os.O_CLOEXEC)
            header = os.pread(self._shm, _BACKFILL_AT + 4, 0)
        except OSError:
            return None
        if len(header) < _BACKFILL_AT + 4 or _FIELD.unpack_from(header, 0)[0] != _VERSION:
            return None
        (frames,) = _FIELD.unpack_from(header, _MX_FRAME_AT)
        (copied,) = _FIELD.unpack_from(header, _BACKFILL_AT)
        return max(0, frames - copied)

    def checkpoint(self) -> tuple[int, int] | None:
        """One PASSIVE checkpoint; returns (pages in the WAL, pages copied), or None when it
        failed (logged once until it works again)."""
        try:
            conn = self._connection()
            busy, pages, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            self.runs += 1
            self.largest_wal = max(self.largest_wal, pages)
        except sqlite3.Error as exc:
            self.failures += 1
            if not self._failing:
                self._failing = True
                log.warning("WAL checkpoint of %s failed (retrying while the WAL grows): %s", self.path, exc)
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
