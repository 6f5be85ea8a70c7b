"""Pause, resume and idle-only mode (issue 12) over real brokers and real agent processes:
a paused worker announces itself first, hands back what it holds without using an attempt,
stays connected (no will), takes nothing until resumed; idle-only mode pauses and resumes
it from the host's load (injected through --load-file)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from dockercomp.broker.messages import OfflineReason, Presence, PresenceState
from dockercomp.broker.topics import Topics, WorkerRef
from dockercomp.coordinator.service import Coordinator
from dockercomp.coordinator.store import Store
from tests.support import Watcher, wait_until
from tests.support.brokers import BrokerProcess
from tests.support.processes import Processes, finished, online

pytestmark = pytest.mark.timeout(120)
TOPICS = Topics()


def agent(procs: Processes, name: str, *options: str) -> subprocess.Popen[bytes]:
    return procs.start(name, ["dockercomp.agent.cli", "run", "--broker", str(procs.broker_url), "--worker-id", name,
                              "--concurrency", "2", "--keepalive", "2", "-v", *options])


def presences(watcher: Watcher) -> list[Presence]:
    return [Presence.decode(m.payload) for m in watcher.messages if m.payload]


def state_of(store: Store, key: str) -> str:
    return next((w.state for w in store.workers() if w.key == key), "")


def attempt_outcomes(store: Store, job_id: int) -> dict[str, int]:
    store.bind()
    return dict(store.db.execute_sql(
        "SELECT a.outcome, count(*) FROM attempt a JOIN task t ON t.id = a.task_id WHERE t.job_id = ? "
        "GROUP BY a.outcome", (job_id,)).fetchall())


def quiet_for(store: Store, key: str, job: object, seconds: float) -> tuple[int, int]:
    """(tasks held by `key`, tasks done) after watching for `seconds`; raises if it takes any."""
    done = store.progress(job).done
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert store.inflight().get(key, 0) == 0, f"{key} took work while paused"
        time.sleep(0.05)
    return store.inflight().get(key, 0), store.progress(job).done - done


def test_pause_mid_job_hands_back_without_attempts_and_no_will(
        engine: Coordinator, procs: Processes, broker: BrokerProcess) -> None:
    store = engine.store
    with Watcher(broker.url, TOPICS.presence(WorkerRef("local", "napper"))) as watcher:
        napper = agent(procs, "napper", "--grace", "0.3", "--prefetch", "4")
        online(store, 1)
        job = store.create_job("sleep", [[0.4]] * 30, timeout=30, max_attempts=1)
        # Running two and holding four more: both the queued and the running are handed back.
        wait_until(lambda: store.inflight().get("local/napper", 0) >= 6 and store.progress(job).done >= 2, timeout=30)

        napper.send_signal(signal.SIGUSR1)
        wait_until(lambda: state_of(store, "local/napper") == "paused", timeout=10)
        wait_until(lambda: store.inflight().get("local/napper", 0) == 0, timeout=10)
        held, done = quiet_for(store, "local/napper", job, 1.5)  # several dispatch rounds: nothing sent
        assert (held, done) == (0, 0)
        assert napper.poll() is None  # alive and connected all along

        napper.send_signal(signal.SIGUSR2)
        progress = finished(store, job, timeout=60)
        napper.send_signal(signal.SIGTERM)
        assert napper.wait(15) == 0

    assert (progress.done, progress.failed) == (30, 0), [r.errors for r in store.results(job) if r.state != "done"]
    outcomes = attempt_outcomes(store, job.id)
    assert outcomes.get("released", 0) >= 4 and set(outcomes) <= {"ok", "released"}, outcomes
    assert all(r.attempts >= 1 and r.worker == "local/napper" for r in store.results(job))
    seen = presences(watcher)
    states = [p.state for p in seen]
    assert PresenceState.PAUSED in states and states.index(PresenceState.PAUSED) < len(states) - 1
    assert states[states.index(PresenceState.PAUSED) + 1] is PresenceState.ONLINE  # resumed
    assert len({p.seq for p in seen}) == 1  # one connection all along: no reconnection, no will
    assert not [p for p in seen if p.reason is OfflineReason.LOST]
    assert [p.reason for p in seen if p.state is PresenceState.OFFLINE] == [OfflineReason.SHUTDOWN]
    log = procs.log("napper")
    assert "paused (asked)" in log and "resumed" in log


def test_idle_only_takes_nothing_above_the_threshold_and_computes_below(
        engine: Coordinator, procs: Processes, tmp_path: Path) -> None:
    store = engine.store
    load = tmp_path / "loadavg"
    load.write_text("3.00 2.50 2.00 3/400 4242\n")  # /proc/loadavg's format
    agent(procs, "idler", "--idle-only", "--max-load", "1.5", "--load-file", str(load))
    wait_until(lambda: state_of(store, "local/idler") == "paused", timeout=20)
    job = store.create_job("add", [[i, 1] for i in range(20)], timeout=30, max_attempts=1)
    assert quiet_for(store, "local/idler", job, 2.0) == (0, 0)

    load.write_text("0.20 1.00 1.50 1/400 4242\n")  # the volunteer went away: below 1.5 - 0.5
    progress = finished(store, job, timeout=30)  # one load sample later (5 s)
    assert (progress.done, progress.failed) == (20, 0)
    assert all(r.worker == "local/idler" for r in store.results(job))
    log = procs.log("idler")
    assert "paused (host load 3.00 above 1.5)" in log and "resumed: taking tasks again (host load 0.20)" in log
