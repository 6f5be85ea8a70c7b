"""dockercomp's own commands as child processes (`agent run`, `coordinator serve`, one-shot
commands), each with its log, and the fixtures of the end-to-end coordinator tests.

Fixtures (loaded through tests/conftest.py's pytest_plugins):
- `procs`: a Processes on the `broker` under test, stopped afterwards; logs printed on failure.
- `engine`: a Coordinator running in this process on `broker` and a SQLite file, with the
  settings of the `coordinator_settings` fixture (FAST here; a module may override it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from dockercomp.broker.processes import BrokerProcess
from dockercomp.coordinator.service import Coordinator, CoordinatorSettings
from dockercomp.coordinator.store import JobProgress, Store, WorkerRow
from tests.support import REPO_ROOT, wait_until

# Seconds a child gets to exit after SIGTERM before it is killed, and a one-shot command to finish.
STOP_TIMEOUT = 10.0
CLI_TIMEOUT = 60.0

# Fast intervals: leases checked 10x a second, lost workers purged after 1 s.
FAST = CoordinatorSettings(lease_margin=2, lease_check=0.1, purge_after=1.0, purge_check=0.2,
                           poll_interval=0.2, status_interval=0.2, connect_timeout=10)
# The same for `dockercomp coordinator serve`, verbose so its log says what it decided.
FAST_SERVE = ("--lease-check", "0.2", "--lease-margin", "2", "--purge-after", "1", "-v")


class Processes:
    """`dockercomp agent run`, `dockercomp coordinator serve` and other commands as child
    processes of this test, each logging to LOGS/NAME.log.

    `broker_url` is passed as --broker by agent() and serve(); None when every command gets
    its broker some other way (e.g. DOCKERCOMP_BROKER in `env`, to keep a password off the
    command line).
    """

    def __init__(self, broker_url: str | None, logs: Path) -> None:
        self.broker_url = broker_url
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """`python -m ARGS` with `env` added to the environment."""
        with open(self.logs / f"{name}.log", "ab") as out:
            process = subprocess.Popen([sys.executable, "-m", *args], env={**self.env, **(env or {})},
                                       stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        self.running[name] = process
        return process

    def _broker(self) -> list[str]:
        return [] if self.broker_url is None else ["--broker", self.broker_url]

    def agent(self, name: str, concurrency: int = 2, prefetch: int | None = None,
              batch: int | None = None) -> subprocess.Popen[bytes]:
        extra = [] if prefetch is None else ["--prefetch", str(prefetch)]
        extra += [] if batch is None else ["--batch", str(batch)]
        return self.start(name, ["dockercomp.agent.cli", "run", *self._broker(), "--worker-id", name,
                                 "--concurrency", str(concurrency), "--keepalive", "2", "--grace", "1",
                                 "--health-file", str(self.logs / f"{name}.health"), *extra])

    def serve(self, db: str, name: str = "serve", options: Sequence[str] = FAST_SERVE) -> subprocess.Popen[bytes]:
        """`dockercomp coordinator serve` with `options` (by default fast leases and purges)."""
        return self.start(name, ["dockercomp.coordinator", "serve", *self._broker(), "--db", db, *options])

    def cli(self, *args: str, env: dict[str, str] | None = None) -> str:
        """Runs `dockercomp coordinator ARGS` to its end; its stdout (it must succeed)."""
        done = subprocess.run([sys.executable, "-m", "dockercomp.coordinator", *args],
                              env={**self.env, **(env or {})}, cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=CLI_TIMEOUT, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def kill(self, name: str) -> None:
        """SIGKILL, as a crash: no goodbye to the broker."""
        process = self.running.pop(name)
        process.send_signal(signal.SIGKILL)
        process.wait(STOP_TIMEOUT)

    def stop(self, name: str) -> None:
        """SIGTERM, as a clean stop (first signal: drain), and wait for it to exit."""
        process = self.running.pop(name)
        process.terminate()
        process.wait(STOP_TIMEOUT)

    def stop_all(self) -> None:
        """SIGTERM to every child still running, newest first; SIGKILL to those that hang."""
        for process in reversed(self.running.values()):
            if process.poll() is None:
                process.terminate()
        for process in self.running.values():
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.running.clear()

    def log(self, name: str | None = None) -> str:
        """The log of child `name`, or the tail of every log."""
        if name is not None:
            path = self.logs / f"{name}.log"
            return path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(f"--- {p.name} ---\n{p.read_text(errors='replace')[-2500:]}"
                         for p in sorted(self.logs.glob("*.log")))


def online(store: Store, count: int) -> list[WorkerRow]:
    """Waits until at least `count` workers are online in the store; returns those online."""
    return wait_until(lambda: [w for w in store.workers() if w.state == "online"]
                      if sum(w.state == "online" for w in store.workers()) >= count else None, timeout=20)


def finished(store: Store, job: Any, timeout: float = 60) -> JobProgress:
    """Waits until `job` is no longer active; returns its progress."""
    return wait_until(lambda: (p := store.progress(job)).state != "active" and p, timeout=timeout, interval=0.05)


@pytest.fixture
def procs(broker: BrokerProcess, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Processes]:
    running = Processes(broker.url, tmp_path / "logs")
    yield running
    running.stop_all()
    if getattr(getattr(request.node, "report_call", None), "failed", False):
        print(running.log())


@pytest.fixture
def coordinator_settings() -> CoordinatorSettings:
    """The `engine`'s settings; override this fixture in a module for other intervals."""
    return FAST


@pytest.fixture
def engine(broker: BrokerProcess, tmp_path: Path, coordinator_settings: CoordinatorSettings) -> Iterator[Coordinator]:
    coordinator = Coordinator.connect(broker.url, str(tmp_path / "coordinator.db"), coordinator_settings).start()
    yield coordinator
    coordinator.stop()
    assert coordinator.error is None, coordinator.error
