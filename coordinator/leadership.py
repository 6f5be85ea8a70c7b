"""Which coordinator is active: a lease with a fencing token, one row in the store.

Two `serve` processes may share one database; only the one holding the lead dispatches. The
row says who holds it (``holder``, ``host``, ``pid``), since when, until when (``expires_at``)
and the fencing token (``epoch``, raised by one at every change of holder). Times are the
DATABASE's clock, so the holders' clocks never need to agree.

- A standby takes the lead only once it expired (``claim``): epoch + 1.
- The active one renews it INSIDE every transaction that writes (``renew``: an UPDATE naming
  its epoch). Once another took over, that UPDATE matches no row and the engine rolls back:
  a holder that was frozen (SIGSTOP, a VM paused, a network cut) and wakes up can never commit
  anything. On PostgreSQL the UPDATE also locks the row until the commit, so a takeover waits
  for a transaction in flight instead of interleaving with it.
- A clean stop releases the lead (``release``) so that the standby takes over at once.

Why not a PostgreSQL advisory lock alone: a frozen process keeps its TCP connection, and with
it the lock, until the server notices the peer is gone (hours with default keepalives).

The table is plain SQL made here (not a model), like the heartbeat's: one row, id 1.
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass
from typing import Any

TABLE = "coordinator_lead"
_CREATE = (
    f"CREATE TABLE IF NOT EXISTS {TABLE} (id INTEGER PRIMARY KEY, epoch BIGINT NOT NULL, "
    "holder VARCHAR(64) NOT NULL, host VARCHAR(255) NOT NULL, pid INTEGER NOT NULL, "
    "since DOUBLE PRECISION NOT NULL, expires_at DOUBLE PRECISION NOT NULL)"
)
_COLUMNS = "epoch, holder, host, pid, since, expires_at"
# Milliseconds a claim waits for the row lock held by the active one's transaction in flight;
# past it the claim counts as lost and is tried again at the next poll.
CLAIM_LOCK_TIMEOUT_MS = 1_000


@dataclass(frozen=True)
class Holder:
    """One `serve` process as a candidate: a random id (a restarted process is a new holder)."""

    id: str
    host: str
    pid: int

    @classmethod
    def mine(cls) -> "Holder":
        return cls(secrets.token_hex(6), socket.gethostname(), os.getpid())


@dataclass(frozen=True)
class Lead:
    """The lead as stored, read with the database's clock (``now``)."""

    epoch: int  # 0: nobody ever held it
    holder: str
    host: str
    pid: int
    since: float
    expires_at: float
    now: float

    @property
    def expired(self) -> bool:
        return self.now >= self.expires_at

    def held_by(self, holder: Holder) -> bool:
        return self.holder == holder.id and not self.expired


def now_sql(db: Any) -> str:
    """The database's clock in seconds since the epoch, as SQL (the lease never uses ours)."""
    if _is_postgres(db):
        # clock_timestamp(): now() is frozen at the start of the transaction.
        return "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"
    return "((julianday('now') - 2440587.5) * 86400.0)"


def _is_postgres(db: Any) -> bool:
    import peewee  # here: the memory store never needs it

    return isinstance(db, peewee.PostgresqlDatabase)  # pooled variants included


def create_table(db: Any) -> None:
    db.execute_sql(_CREATE)


def claim(db: Any, holder: Holder, ttl: float, take_from: int | None = None) -> Lead:
    """Take the lead if it expired (or is still at epoch ``take_from``: its holder is known
    dead); returns the lead as it is afterwards, whoever holds it."""
    p, now = db.param, now_sql(db)
    with db.atomic():  # SQLite: BEGIN IMMEDIATE, one claimant at a time
        if _is_postgres(db):
            db.execute_sql(f"SET LOCAL lock_timeout = {CLAIM_LOCK_TIMEOUT_MS}")
        if read(db) is None:  # the first `serve` on this database; a row that exists is not written
            db.execute_sql(f"INSERT INTO {TABLE} (id, {_COLUMNS}) VALUES (1, 0, '', '', 0, 0, 0) "
                           "ON CONFLICT (id) DO NOTHING")
        db.execute_sql(f"UPDATE {TABLE} SET epoch = epoch + 1, holder = {p}, host = {p}, pid = {p}, "
                       f"since = {now}, expires_at = {now} + {p} WHERE id = 1 AND (expires_at <= {now} OR epoch = {p})",
                       (holder.id, holder.host, holder.pid, ttl, -1 if take_from is None else take_from))
    lead = read(db)
    assert lead is not None  # inserted above
    return lead


def renew(db: Any, epoch: int, ttl: float) -> bool:
    """Inside the caller's transaction: extend the lead of ``epoch``; False if another holds it."""
    p = db.param
    cursor = db.execute_sql(f"UPDATE {TABLE} SET expires_at = {now_sql(db)} + {p} WHERE id = 1 AND epoch = {p}",
                            (ttl, epoch))
    return cursor.rowcount == 1


def release(db: Any, epoch: int) -> None:
    """Let the lead of ``epoch`` expire now (a clean stop: the standby takes over at once)."""
    p = db.param
    with db.atomic():
        db.execute_sql(f"UPDATE {TABLE} SET expires_at = 0 WHERE id = 1 AND epoch = {p}", (epoch,))


def read(db: Any) -> Lead | None:
    row = db.execute_sql(f"SELECT {_COLUMNS}, {now_sql(db)} FROM {TABLE} WHERE id = 1").fetchone()
    return None if row is None else Lead(int(row[0]), row[1], row[2], int(row[3]), float(row[4]), float(row[5]),
                                         float(row[6]))
