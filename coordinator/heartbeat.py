"""The engine's heartbeat in the store, and what it says about the coordinator's liveness.

`serve` writes one row every ``HEARTBEAT_INTERVAL`` seconds (and ``stopped_at`` when it stops
cleanly); `status`, `workers` and the API read it to tell whether what they show is live or
only the last known state: with `serve` stopped or cut off from its broker, nobody updates the
workers' states, so "online" then means "online when last heard of".

The table is plain SQL made here (not a model): one row, id 1, on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from dockercomp.coordinator.defaults import HEARTBEAT_INTERVAL, HEARTBEAT_MISSED

_COLUMNS = ("started", "beat_at", "stopped_at", "connected", "host", "pid", "broker", "epoch")
_CREATE = (
    "CREATE TABLE IF NOT EXISTS heartbeat (id INTEGER PRIMARY KEY, started DOUBLE PRECISION NOT NULL, "
    "beat_at DOUBLE PRECISION NOT NULL, stopped_at DOUBLE PRECISION, connected INTEGER NOT NULL DEFAULT 0, "
    "host VARCHAR(255) NOT NULL DEFAULT '', pid INTEGER NOT NULL DEFAULT 0, "
    "broker VARCHAR(512) NOT NULL DEFAULT '', epoch BIGINT NOT NULL DEFAULT 0)"
)
# Added with the standby coordinator: tables made before it lack the column.
_ADD_EPOCH = "ALTER TABLE heartbeat ADD COLUMN epoch BIGINT NOT NULL DEFAULT 0"


@dataclass(frozen=True)
class Heartbeat:
    """The engine's sign of life, written every few seconds by `serve` (one row)."""

    started: float  # when this `serve` started
    beat_at: float  # its latest heartbeat
    stopped_at: float | None  # set when it stopped cleanly; None while it runs (or if it died)
    connected: bool  # whether it was connected to the broker at its latest heartbeat
    host: str
    pid: int
    broker: str  # its broker URL, password masked
    epoch: int = 0  # the lead it held (leader.py); 0: not elected (the Python API's engine)


def create_table(db: Any) -> None:
    db.execute_sql(_CREATE)
    if "epoch" not in {c.name for c in db.get_columns("heartbeat")}:
        try:
            db.execute_sql(_ADD_EPOCH)
        except Exception as exc:  # noqa: BLE001 - another process added it meanwhile (database.upgrade)
            if "duplicate" not in str(exc) and "already exists" not in str(exc):
                raise


def write(db: Any, beat: Heartbeat) -> None:
    """Replace the heartbeat row (inside the caller's transaction)."""
    p = db.param
    values = [beat.started, beat.beat_at, beat.stopped_at, int(beat.connected), beat.host, beat.pid, beat.broker,
              beat.epoch]
    sets = ", ".join(f"{column} = {p}" for column in _COLUMNS)
    if not db.execute_sql(f"UPDATE heartbeat SET {sets} WHERE id = 1", values).rowcount:
        db.execute_sql(f"INSERT INTO heartbeat (id, {', '.join(_COLUMNS)}) VALUES (1, {', '.join([p] * len(_COLUMNS))})",
                       values)


def read(db: Any) -> Heartbeat | None:
    row = db.execute_sql(f"SELECT {', '.join(_COLUMNS)} FROM heartbeat WHERE id = 1").fetchone()
    if row is None:
        return None
    started, beat_at, stopped_at, connected, host, pid, broker, epoch = row
    return Heartbeat(started, beat_at, stopped_at, bool(connected), host, pid, broker, int(epoch))


@dataclass(frozen=True)
class Liveness:
    """Whether the coordinator runs now, as its heartbeat says."""

    running: bool  # heartbeats are fresh
    connected: bool  # running and connected to its broker
    since: float | None  # not running: when it stopped or last beat (None: never ran)
    beat: Heartbeat | None

    @property
    def live(self) -> bool:
        """Worker states are current only when the engine runs and hears the broker."""
        return self.running and self.connected

    def sentence(self, now: float | None = None) -> str:
        """One line for `status` and `workers` when the states shown are only the last known."""
        now = time.time() if now is None else now
        if self.beat is None:
            return "The coordinator has never run on this database: start it with `dockercomp coordinator serve`."
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since or self.beat.beat_at))
        ago = _ago(now - (self.since or self.beat.beat_at))
        if not self.running:
            how = "it stopped" if self.beat.stopped_at is not None else "its last heartbeat was"
            return (f"The coordinator is not running: {how} {ago} ago ({when}); worker states are as last known. "
                    "Start it with `dockercomp coordinator serve`.")
        return (f"The coordinator is running but not connected to its broker {self.beat.broker} "
                "(as of its last heartbeat); worker states are as last known.")

    def active(self) -> str:
        """Which coordinator is active (several `serve` may share the store: one active, the
        others standing by), or "" when none runs."""
        if not self.running or self.beat is None:
            return ""
        elected = f", lead epoch {self.beat.epoch}" if self.beat.epoch else ""
        return f"Active coordinator: pid {self.beat.pid} on {self.beat.host}{elected}."


def liveness(beat: Heartbeat | None, now: float | None = None,
             interval: float = HEARTBEAT_INTERVAL, missed: int = HEARTBEAT_MISSED) -> Liveness:
    now = time.time() if now is None else now
    if beat is None:
        return Liveness(False, False, None, None)
    if beat.stopped_at is not None:
        return Liveness(False, False, beat.stopped_at, beat)
    if now - beat.beat_at > interval * missed:
        return Liveness(False, False, beat.beat_at, beat)
    return Liveness(True, beat.connected, None, beat)


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
