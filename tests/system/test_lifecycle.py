"""A worker's life cycle as the coordinator sees it, over real brokers and real agent
processes: a clean shutdown hands its work back without using attempts (issue 10, item 1).
"""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from dockercomp.coordinator.service import Coordinator
from dockercomp.coordinator.store import Store
from tests.support import wait_until
from tests.support.brokers import BrokerProcess
from tests.support.processes import Processes, finished, online

pytestmark = pytest.mark.timeout(120)


def agent(procs: Processes, name: str, *options: str) -> subprocess.Popen[bytes]:
    return procs.start(name, ["dockercomp.agent.cli", "run", "--broker", str(procs.broker_url), "--worker-id", name,
                              "--concurrency", "2", "--keepalive", "2", "-v", *options])


def attempt_outcomes(store: Store, job_id: int) -> dict[str, int]:
    store.bind()
    return dict(store.db.execute_sql(
        "SELECT a.outcome, count(*) FROM attempt a JOIN task t ON t.id = a.task_id WHERE t.job_id = ? "
        "GROUP BY a.outcome", (job_id,)).fetchall())


def test_a_clean_shutdown_mid_job_uses_no_attempt(engine: Coordinator, procs: Processes, broker: BrokerProcess) -> None:
    """The field report's run: `--grace 0.3`, `--max-attempts 1`, SIGTERM mid-job. The tasks
    killed at the end of the grace period, the prefetched ones and any sent while it drained
    all go back unused; another agent does them all."""
    store = engine.store
    victim = agent(procs, "victim", "--grace", "0.3", "--prefetch", "4")
    online(store, 1)
    job = store.create_job("sleep", [[0.4]] * 40, timeout=30, max_attempts=1)
    # Running two and holding four more: each kind of handing back happens.
    wait_until(lambda: store.inflight().get("local/victim", 0) >= 6 and store.progress(job).done >= 2, timeout=30)
    agent(procs, "heir")
    online(store, 2)

    victim.send_signal(signal.SIGTERM)
    assert victim.wait(15) == 0
    progress = finished(store, job, timeout=60)

    assert (progress.done, progress.failed) == (40, 0), [r.errors for r in store.results(job) if r.state != "done"]
    outcomes = attempt_outcomes(store, job.id)
    assert outcomes.get("released", 0) >= 4, outcomes  # the running and the prefetched ones came back
    assert set(outcomes) <= {"ok", "released"}, outcomes
    workers = {w.key: w for w in store.workers()}
    assert workers["local/victim"].state == "offline" and workers["local/victim"].tasks_failed == 0
    assert "draining" in procs.log("victim")
    results = list(store.results(job))
    assert all(r.attempts >= 1 for r in results)
    assert sum(r.worker == "local/heir" for r in results) >= 1, [(r.worker, r.attempts, r.errors) for r in results]
