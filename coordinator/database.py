"""The database behind the store: opened from a path or URL, and its schema brought up to date.

``connect(url)`` gives a peewee database for a SQLite file (``coordinator.db``,
``sqlite:///path``) or a PostgreSQL URL (``postgresql://user:pass@host:port/db``).
``upgrade(db)`` brings tables made by an older coordinator up to date (columns added with a
default, indexes no query uses any more dropped): ``create_tables(safe=True)`` creates
missing tables and indexes but never changes an existing table.
"""

from __future__ import annotations

import os
import threading
from typing import Any
from urllib.parse import unquote, urlsplit

import peewee as pw

from dockercomp.coordinator.defaults import DB_URL_ENV, SQLITE_BUSY_TIMEOUT_MS, SQLITE_STATEMENT_CACHE
from dockercomp.coordinator.errors import DatabaseMissing, StoreError

class ThreadDatabaseProxy(pw.DatabaseProxy):
    """A database proxy bound per thread: a coordinator engine thread and an API client in the
    same process may each use their own Store (even on different databases) without one
    rebinding the other's queries. A thread that never bound uses the last store bound."""

    __slots__ = ("_local", "_fallback")

    def __init__(self) -> None:
        object.__setattr__(self, "_local", threading.local())
        object.__setattr__(self, "_fallback", None)
        super().__init__()

    @property  # type: ignore[override]
    def obj(self) -> pw.Database | None:
        bound = getattr(self._local, "db", None)
        return bound if bound is not None else self._fallback

    @obj.setter
    def obj(self, value: pw.Database | None) -> None:
        self._local.db = value
        if value is not None:
            object.__setattr__(self, "_fallback", value)

    def bound_here(self) -> pw.Database | None:
        return getattr(self._local, "db", None)

    def __setattr__(self, attr: str, value: Any) -> None:
        object.__setattr__(self, attr, value)


# The models' database (sqlstore.BaseModel), bound per thread by each SqlStore.
database_proxy = ThreadDatabaseProxy()


class NeverReusedId(pw.AutoField):
    """An id never given twice: SQLite otherwise hands a deleted job's (or task's) highest id to
    the next one, and a late result for a deleted task could then match a new task's attempt
    (PostgreSQL sequences never go back). Databases made before `delete` existed lack it."""

    def ddl(self, ctx: Any) -> Any:
        node = super().ddl(ctx)
        return pw.NodeList((node, pw.SQL("AUTOINCREMENT"))) if isinstance(database_proxy.obj, pw.SqliteDatabase) else node


# Columns added after the first release: (table, column, SQL type and default). Each is added
# when missing; rows that existed before get the default.
ADDED_COLUMNS: list[tuple[str, str, str]] = [
    ("worker", "prefetch", "INTEGER NOT NULL DEFAULT 0"),
    ("job", "replication", "TEXT"),
    ("attempt", "value", "TEXT"),
    ("attempt", "elapsed", "DOUBLE PRECISION"),
    ("attempt", "nonce", "VARCHAR(64) NOT NULL DEFAULT ''"),
]
# Indexes of the first release that no query uses but every dispatch and result updated:
# (table, index). Dropping them cut the engine's database time by a fifth.
DROPPED_INDEXES: list[tuple[str, str]] = [
    ("task", "task_state_id"),  # (state, id): every task query names its job first
    ("attempt", "attempt_task_id"),  # (task_id): the unique (task_id, number) serves it
    ("attempt", "attempt_deadline"),  # (deadline): open attempts are kept in memory
    ("attempt", "attempt_outcome"),  # (outcome): replaced by the partial attempt_open (models.py)
    ("attempt", "attempt_worker_id"),  # (worker_id): joins go from attempt to worker, never back
    ("result", "result_worker_id"),  # (worker_id): the same
]


def connect(url: str, busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS) -> pw.Database:
    """A database for a SQLite path or ``postgresql://`` URL (not yet connected).
    ``busy_timeout_ms``: how long a SQLite writer waits for another writer's lock."""
    if url.startswith(("postgresql://", "postgres://")):
        return _open_postgres(url)
    return _open_sqlite(_sqlite_path(url), busy_timeout_ms)


def missing(url: str, where: str) -> DatabaseMissing:
    """The error of a command that only reads when there is no database at ``where``."""
    return DatabaseMissing(f"no coordinator database at {where}",
                           f"pass --db PATH|URL (or set ${DB_URL_ENV}) to the database `serve` uses; "
                           "only `submit` and `serve` create one")


def check_exists(url: str) -> None:
    """DatabaseMissing, naming the absolute path, when a SQLite file does not exist (a
    PostgreSQL database is checked once connected: SqlStore.open)."""
    if url.startswith(("postgresql://", "postgres://")):
        return
    path = _sqlite_path(url)
    if path not in ("", ":memory:") and not os.path.exists(path):
        raise missing(url, os.path.abspath(path))


def describe(url: str) -> str:
    """The database URL with any password masked."""
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@")
    return url


def upgrade(db: pw.Database) -> list[str]:
    """Add the columns in ADDED_COLUMNS that an existing database lacks and drop the indexes
    in DROPPED_INDEXES it still has; returns what was changed.

    Safe when several processes open one database at once (a CLI command next to `serve`):
    PostgreSQL adds with IF NOT EXISTS; on SQLite a column another process added meanwhile
    shows up as "duplicate column", which is success too."""
    added = []
    for table, column, definition in ADDED_COLUMNS:
        if column in {c.name for c in db.get_columns(table)}:
            continue
        if isinstance(db, pw.PostgresqlDatabase):
            db.execute_sql(f'ALTER TABLE "{table}" ADD COLUMN IF NOT EXISTS "{column}" {definition}')
        else:
            try:
                db.execute_sql(f'ALTER TABLE "{table}" ADD COLUMN "{column}" {definition}')
            except pw.OperationalError as exc:
                if "duplicate column" not in str(exc):
                    raise
        added.append(f"{table}.{column}")
    for table, index in DROPPED_INDEXES:
        if index in {i.name for i in db.get_indexes(table)}:
            db.execute_sql(f'DROP INDEX IF EXISTS "{index}"')
            added.append(f"-{index}")
    return added


def _sqlite_path(url: str) -> str:
    if url.startswith("sqlite://"):
        path = url[len("sqlite://"):]
        if not path.startswith("/") or path == "/":
            raise StoreError(f"database URL {url!r} names no file", "use sqlite:///relative.db or sqlite:////abs/path.db")
        return path[1:]  # sqlite:///x.db -> x.db, sqlite:////tmp/x.db -> /tmp/x.db
    return url


def _open_postgres(url: str) -> pw.Database:
    try:
        import psycopg2  # noqa: F401 - only to give a readable error when it is missing
    except ImportError:
        raise StoreError("PostgreSQL support is not installed",
                         "pip install 'dockercomp[postgres]' (psycopg2-binary)") from None
    parts = urlsplit(url)
    dbname = unquote(parts.path.lstrip("/")) or "postgres"
    return pw.PostgresqlDatabase(
        dbname, user=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        host=parts.hostname or None, port=parts.port or None,
    )


def _open_sqlite(path: str, busy_timeout_ms: int) -> pw.Database:
    if path in ("", ":memory:"):
        raise StoreError("an in-memory SQLite database cannot be shared by the CLI and `serve`",
                         "pass a file path, e.g. --db coordinator.db")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise StoreError(f"directory {parent} does not exist", "create it or pass another --db path")
    return pw.SqliteDatabase(
        path,
        # IMMEDIATE: a writer takes the lock when its transaction begins and waits for it
        # (busy_timeout), instead of failing when a read turns into a write.
        lock_type="IMMEDIATE",
        cached_statements=SQLITE_STATEMENT_CACHE,  # the engine's statements vary in row count
        pragmas={
            "journal_mode": "wal",  # readers (status, results) never block the engine
            "busy_timeout": busy_timeout_ms,
            "foreign_keys": 1,
            "synchronous": "full",  # a submit is on disk when it returns; serve relaxes its own
        },
    )
