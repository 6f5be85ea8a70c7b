"""A throwaway PostgreSQL server for tests: private data dir, 127.0.0.1, a free port.

PostgreSQL refuses to run as root, so when the tests run as root (CI, containers) initdb
and the server run as the `postgres` system user (created by Debian's package), through
Popen(user=...) rather than runuser so the server is our direct child and gets our
signals. Its files live in a directory that user owns: pytest's own tmp dir is root-only
(0700), hence mkdtemp.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from dockercomp.broker.processes import start_on_a_free_port, stop_process

# User that owns and runs the server when we are root.
SYSTEM_USER = "postgres"
# Superuser created by initdb; connections from 127.0.0.1 are trusted (test only).
SUPERUSER = "postgres"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
# Durability off: a test database that loses its last commit on power loss is fine,
# and fsync is most of the cost of CREATE DATABASE.
FAST_SETTINGS = ("fsync=off", "synchronous_commit=off", "full_page_writes=off")


def find_bindir() -> Path | None:
    """Directory holding initdb and postgres: $PG_BINDIR, Debian's newest, or PATH."""
    candidates: list[Path] = []
    if os.environ.get("PG_BINDIR"):
        candidates.append(Path(os.environ["PG_BINDIR"]))
    candidates += sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).parent)
    for bindir in candidates:
        if (bindir / "initdb").exists() and (bindir / "postgres").exists():
            return bindir
    return None


def _server_user() -> str | None:
    """The user to run PostgreSQL as: SYSTEM_USER when we are root, else ourselves (None)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SYSTEM_USER)
    except KeyError as exc:
        raise RuntimeError(
            f"running as root and there is no {SYSTEM_USER!r} user to run PostgreSQL as "
            f"(apt-get install postgresql creates it)"
        ) from exc
    return SYSTEM_USER


class PostgresServer:
    """initdb + postgres on 127.0.0.1:PORT, unix socket in its own directory."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.host = "127.0.0.1"
        self.port = 0
        self.root = Path(tempfile.mkdtemp(prefix="dockercomp-pg-"))
        self.datadir = self.root / "data"
        self.sockdir = self.root / "sock"
        self.log_path = self.root / "postgres.log"
        self._user = _server_user()
        self.sockdir.mkdir()
        if self._user is not None:
            for path in (self.root, self.sockdir):
                shutil.chown(path, self._user, self._user)
        self._process: subprocess.Popen[bytes] | None = None
        self._db_numbers = itertools.count(1)

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{dbname}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except (FileNotFoundError, PermissionError):
            return ""

    def start(self) -> PostgresServer:
        self._run_as_server_user(
            str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", SUPERUSER,
            "-A", "trust", "-E", "UTF8", "--no-sync", "--locale=C",
        )  # fmt: skip
        start_on_a_free_port(self._launch, self.host, RuntimeError)
        return self

    def _launch(self, port: int) -> None:
        settings = [
            f"listen_addresses={self.host}",
            f"unix_socket_directories={self.sockdir}",
            "max_connections=200",
            *FAST_SETTINGS,
        ]
        command = [str(self.bindir / "postgres"), "-D", str(self.datadir), "-p", str(port)]
        for setting in settings:
            command += ["-c", setting]
        with open(self.log_path, "ab") as log_file:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                **self._user_kwargs(),
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._process = None
                raise RuntimeError(f"postgres exited on port {port}:\n{self.log()[-2000:]}")
            ready = subprocess.run(
                [str(self.bindir / "pg_isready"), "-q", "-h", self.host, "-p", str(port)],
                check=False,
            )
            if ready.returncode == 0:
                self.port = port
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(
            f"postgres not ready within {START_TIMEOUT:.0f} s:\n{self.log()[-2000:]}"
        )

    def _user_kwargs(self) -> dict[str, Any]:
        """Popen arguments that drop root to the server user (setuid in the child)."""
        if self._user is None:
            return {}
        return {"user": self._user, "group": self._user, "extra_groups": []}

    def _run_as_server_user(self, *command: str) -> None:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            check=False,
            cwd=self.root,
            **self._user_kwargs(),
        )
        if result.returncode != 0:
            raise RuntimeError(f"{command[0]} failed:\n{result.stdout}\n{result.stderr}")

    def execute(self, sql: str, dbname: str = "postgres") -> None:
        """Runs one statement outside a transaction (CREATE/DROP DATABASE need that)."""
        result = subprocess.run(
            [
                str(self.bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
                "-h", self.host, "-p", str(self.port), "-U", SUPERUSER, "-d", dbname, "-c", sql,
            ],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"psql failed: {sql}\n{result.stderr}")

    def create_database(self, prefix: str = "test") -> str:
        """A new empty database; returns its name (test_1, test_2, ...)."""
        name = f"{prefix}_{next(self._db_numbers)}"
        self.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        # FORCE: a test that leaked a connection must not make teardown fail.
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        """Fast shutdown (SIGINT: abort transactions, disconnect) and remove all files."""
        process = self._process
        if process is not None:
            stop_process(process, signal.SIGINT, STOP_TIMEOUT)  # SIGINT = "fast" shutdown for the postmaster
        self._process = None
        shutil.rmtree(self.root, ignore_errors=True)
