"""Idle-only mode's load verdict (agent/pause.py) and what `installer up --idle-only` gives the
agent: pure logic, the load from a file written by the test."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from dockercomp.agent.defaults import IDLE_ONLY_ENV, MAX_LOAD_ENV
from dockercomp.agent.pause import LoadWatch, default_max_load
from dockercomp.installer.spec import WorkerSpec


def watch(tmp_path: Path, max_load: float) -> tuple[LoadWatch, Path]:
    path = tmp_path / "loadavg"
    return LoadWatch(path, max_load, hysteresis=0.5), path


def test_busy_above_the_threshold_idle_only_below_it_minus_the_hysteresis(tmp_path: Path) -> None:
    load, path = watch(tmp_path, 2.0)
    verdicts = []
    for value in ("1.90", "2.10", "1.80", "1.49", "2.00"):
        path.write_text(f"{value} 1.00 1.00 1/100 42\n")
        verdicts.append(load.sample(own_tasks=0))
    # Above 2: busy; it stays busy at 1.8 (no flapping) and is idle again below 1.5.
    assert verdicts == [False, True, True, False, False]


def test_the_agents_own_tasks_do_not_count_as_the_host_being_busy(tmp_path: Path) -> None:
    load, path = watch(tmp_path, 1.0)
    path.write_text("2.50 1.00 1.00 3/100 42\n")
    assert load.sample(own_tasks=2) is False and load.load == 0.5
    assert load.sample(own_tasks=0) is True


def test_an_unreadable_load_keeps_the_last_verdict(tmp_path: Path) -> None:
    load, path = watch(tmp_path, 1.0)
    path.write_text("3.0 1 1 1/1 1\n")
    assert load.sample(0) is True
    path.write_text("garbage\n")
    assert load.sample(0) is True
    path.unlink()
    assert load.sample(0) is True
    path.write_text("0.1 1 1 1/1 1\n")
    assert load.sample(0) is False


def test_a_small_threshold_still_has_a_resume_point_above_zero(tmp_path: Path) -> None:
    assert watch(tmp_path, 0.4)[0].resume_below == 0.2
    assert default_max_load(8) == 4.0


def test_installer_idle_only_reaches_the_agent_through_its_environment() -> None:
    plain = WorkerSpec(broker="mqtt://127.0.0.1:1883")
    idle = plain.with_changes(idle_only=True, max_load=1.5)
    assert IDLE_ONLY_ENV not in plain.environment("w-1")
    assert idle.environment("w-1")[IDLE_ONLY_ENV] == "1" and idle.environment("w-1")[MAX_LOAD_ENV] == "1.5"
    # Containers made before idle-only existed keep their configuration hash: `up` does not
    # re-create them; turning idle-only on does.
    before = {k: v for k, v in asdict(plain).items() if k not in ("idle_only", "max_load")}
    assert plain.config_hash() == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    assert plain.config_hash() != idle.config_hash()


class FakeRunner:
    def __init__(self) -> None:
        self.running: list[object] = []

    def drop_queued(self) -> list[object]:
        return []


class FakeAgent:
    """What Pauser uses of an Agent: its runner, grace, presence switch and results."""

    def __init__(self) -> None:
        self.runner = FakeRunner()
        self.settings = type("S", (), {"grace": 30.0})()
        self.presence: list[bool] = []

    def set_paused(self, paused: bool) -> None:
        self.presence.append(paused)

    def report_all(self, ended: list[object]) -> None:
        raise AssertionError("nothing to hand back here")


def test_a_volunteers_pause_and_a_busy_host_add_up(tmp_path: Path) -> None:
    from dockercomp.agent.pause import Pauser

    load, path = watch(tmp_path, 1.0)
    load.interval = 0.0  # sample on every step
    path.write_text("0.1 1 1 1/1 1\n")
    agent = FakeAgent()
    pauser = Pauser(agent, load, clock=lambda: 0.0)  # type: ignore[arg-type]
    pauser.step()
    assert agent.presence == []  # idle host, nobody asked: running
    pauser.requested = True
    pauser.step()
    path.write_text("5.0 1 1 1/1 1\n")
    pauser.step()
    pauser.requested = False  # the volunteer resumes, the host is still busy: stays paused
    pauser.step()
    assert agent.presence == [True] and pauser.paused
    path.write_text("0.1 1 1 1/1 1\n")
    pauser.step()
    assert agent.presence == [True, False] and not pauser.paused


def test_a_pause_file_makes_a_restarted_agent_start_paused(tmp_path: Path) -> None:
    from dockercomp.agent.pause import Pauser

    marker = tmp_path / "paused"
    agent = FakeAgent()
    pauser = Pauser(agent, None, clock=lambda: 0.0)  # type: ignore[arg-type]
    pauser.remember_in(marker)
    pauser.requested = True
    pauser.step()
    assert marker.exists()
    restarted = FakeAgent()
    again = Pauser(restarted, None, clock=lambda: 0.0)  # type: ignore[arg-type]
    again.remember_in(marker)
    again.step()
    assert restarted.presence == [True]
    again.requested = False
    again.step()
    assert restarted.presence == [True, False] and not marker.exists()
