"""What the engine's heartbeat says about the coordinator (coordinator/heartbeat.py)."""

from __future__ import annotations

from dockercomp.coordinator.heartbeat import Heartbeat, liveness


def beat(at: float, stopped: float | None = None, connected: bool = True) -> Heartbeat:
    return Heartbeat(started=0.0, beat_at=at, stopped_at=stopped, connected=connected, host="lab", pid=7,
                     broker="mqtt://b:1883")


def test_never_ran() -> None:
    alive = liveness(None, now=100.0)
    assert (alive.running, alive.live, alive.since) == (False, False, None)
    assert "never run on this database" in alive.sentence(100.0)


def test_fresh_heartbeats_mean_running_and_live_only_when_connected() -> None:
    assert liveness(beat(99.0), now=100.0, interval=2, missed=3).live
    cut_off = liveness(beat(99.0, connected=False), now=100.0, interval=2, missed=3)
    assert cut_off.running and not cut_off.live
    assert "running but not connected to its broker mqtt://b:1883" in cut_off.sentence(100.0)


def test_a_clean_stop_is_told_with_its_time() -> None:
    alive = liveness(beat(50.0, stopped=50.5), now=110.5)
    assert (alive.running, alive.since) == (False, 50.5)
    assert "not running: it stopped 60 s ago" in alive.sentence(110.5)


def test_missed_heartbeats_mean_it_died() -> None:
    # killed: no stop recorded, and the last beat is older than `missed` intervals
    assert liveness(beat(94.5), now=100.0, interval=2, missed=3).running
    dead = liveness(beat(93.0), now=100.0 + 300, interval=2, missed=3)
    assert (dead.running, dead.since) == (False, 93.0)
    assert "not running: its last heartbeat was 5 min ago" in dead.sentence(400.0)
