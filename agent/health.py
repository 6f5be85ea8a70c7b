"""The health file: written by `dockercomp agent run`, read by `dockercomp agent check` (a container HEALTHCHECK).

A file, not a socket: `dockercomp agent check` runs in a fresh process (docker exec) and must answer in
milliseconds without touching the broker. The agent rewrites it atomically every few seconds;
a file not rewritten for several keepalives means a hung or killed agent.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from dockercomp.agent.defaults import HEALTH_STALE_KEEPALIVES, HEALTH_STALE_MIN_SECONDS
from dockercomp.agent.errors import HealthError


@dataclass(frozen=True)
class Health:
    pid: int
    worker: str  # volunteer/worker
    broker: str  # masked URL
    state: str  # running | draining
    connected: bool
    since: float  # wall time the connection came up or went down
    updated: float  # wall time of this write
    keepalive: int
    running: int = 0
    queued: int = 0
    last_error: str = ""

    def describe(self, now: float) -> str:
        link = "connected to" if self.connected else "NOT connected to"
        return (f"agent {self.worker} (pid {self.pid}) {self.state}, {link} {self.broker} for "
                f"{max(0.0, now - self.since):.0f} s; {self.running} running, {self.queued} queued")


def write_health(path: Path, health: Health) -> None:
    """Replace the file atomically, so a reader never sees half a write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".health-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(asdict(health), out)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def remove_health(path: Path, pid: int) -> None:
    """Remove the file if this process wrote it (another agent may share the path)."""
    try:
        if read_health(path).pid == pid:
            path.unlink()
    except (HealthError, OSError):
        pass


def read_health(path: Path) -> Health:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise HealthError(f"no health file at {path}: is `dockercomp agent run` running on this machine? "
                          "(set DOCKERCOMP_HEALTH_FILE if it writes elsewhere)") from None
    except (OSError, ValueError) as exc:
        raise HealthError(f"health file {path} is unreadable ({exc}); restart the agent") from None
    names = {f.name for f in fields(Health)}
    try:
        return Health(**{k: v for k, v in data.items() if k in names})
    except TypeError as exc:
        raise HealthError(f"health file {path} is incomplete ({exc}); restart the agent") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def check_health(
    path: Path, now: Callable[[], float] = time.time, alive: Callable[[int], bool] = _alive
) -> Health:
    """The agent's health if it is running, fresh and connected; else HealthError saying why."""
    health = read_health(path)
    current = now()
    if not alive(health.pid):
        raise HealthError(f"the agent that wrote {path} (pid {health.pid}) is not running")
    stale_after = max(HEALTH_STALE_MIN_SECONDS, HEALTH_STALE_KEEPALIVES * health.keepalive)
    age = current - health.updated
    if age > stale_after:
        raise HealthError(f"agent {health.worker} has not updated {path} for {age:.0f} s "
                          f"(limit {stale_after:.0f} s): it is hung or overloaded")
    if not health.connected:
        why = f": {health.last_error}" if health.last_error else ""
        raise HealthError(f"agent {health.worker} has not been connected to {health.broker} "
                          f"for {max(0.0, current - health.since):.0f} s{why}")
    return health
