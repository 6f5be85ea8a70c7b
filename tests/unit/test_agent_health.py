"""The agent's health file as `dockercomp agent check` (the container's HEALTHCHECK) judges it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from dockercomp.agent.errors import HealthError
from dockercomp.agent.health import Health, check_health, write_health


def health(**changes: Any) -> Health:
    base = dict(pid=os.getpid(), worker="lab/w1", broker="mqtt://b:1883", state="running", connected=True,
                since=1000.0, updated=1000.0, keepalive=10)
    return Health(**{**base, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize("written, now, alive, problem", [
    (health(), 1001.0, True, None),
    (health(state="draining"), 1001.0, True, None),
    (health(), 1000.0 + 31, True, "has not updated"),  # 3 keepalives without a write: hung
    (health(keepalive=1), 1000.0 + 14, True, None),  # but never stale sooner than 15 s
    (health(connected=False, since=990.0, last_error="connection refused"), 1001.0, True,
     "has not been connected to mqtt://b:1883 for 11 s: connection refused"),
    (health(), 1001.0, False, "is not running"),
])
def test_check_health_judges_freshness_connection_and_process(
    tmp_path: Path, written: Health, now: float, alive: bool, problem: str | None
) -> None:
    path = tmp_path / "health.json"
    write_health(path, written)
    if problem is None:
        assert check_health(path, now=lambda: now, alive=lambda pid: alive) == written
    else:
        with pytest.raises(HealthError, match=problem):
            check_health(path, now=lambda: now, alive=lambda pid: alive)


@pytest.mark.parametrize("content, problem", [(None, "no health file"), ("{not json", "unreadable"), ('{"pid": 1}', "incomplete")])
def test_check_health_explains_a_missing_or_broken_file(tmp_path: Path, content: str | None, problem: str) -> None:
    path = tmp_path / "health.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(HealthError, match=problem):
        check_health(path)
