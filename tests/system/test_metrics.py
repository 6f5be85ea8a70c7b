"""`dockercomp coordinator serve --metrics-port 0` end to end: a real broker (Mosquitto and
amqtt), real `dockercomp agent run` processes, a SQLite file; `/metrics` fetched over HTTP and
parsed with Prometheus' own text parser; every figure compared with what the store says."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dockercomp.broker.connection import MqttConnection
from dockercomp.broker.messages import Outcome, Result
from dockercomp.broker.settings import BrokerSettings
from dockercomp.broker.topics import Topics, WorkerRef
from dockercomp.coordinator.store import Store
from tests.support import REPO_ROOT, wait_until
from tests.support.brokers import BrokerProcess
from tests.support.processes import Processes, finished, online

TOPICS = Topics()
pytestmark = pytest.mark.timeout(120)

# Fast leases; lost workers are NOT purged during the test (default --purge-after), so "lost"
# stays put while the store and /metrics are compared.
SERVE = ("--lease-check", "0.2", "--lease-margin", "2", "-v", "--metrics-port", "0")

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def series(samples: Samples, name: str, label: str) -> dict[str, float]:
    """``{label value: sample}`` of one metric, zeros left out."""
    return {dict(labels)[label]: value for (metric, labels), value in samples.items()
            if metric == name and value}


def store_figures(store: Store) -> dict[str, object]:
    """What /metrics must say, as the store says it."""
    store.bind()
    attempts = dict(store.db.execute_sql(
        "SELECT outcome, count(*) FROM attempt WHERE outcome != 'open' GROUP BY outcome").fetchall())
    tasks = dict(store.db.execute_sql("SELECT state, count(*) FROM task GROUP BY state").fetchall())
    dispatched = store.db.execute_sql("SELECT count(*) FROM attempt").fetchone()[0]
    return {"attempts": attempts, "tasks": tasks, "dispatched": dispatched,
            "workers": dict(Counter(w.state for w in store.workers()))}


def metrics_figures(samples: Samples) -> dict[str, object]:
    return {"attempts": {k: int(v) for k, v in series(samples, "dockercomp_attempts_closed_total", "outcome").items()},
            "tasks": {k: int(v) for k, v in series(samples, "dockercomp_tasks", "state").items()},
            "dispatched": int(samples[("dockercomp_dispatches_total", ())]),
            "workers": {k: int(v) for k, v in series(samples, "dockercomp_workers", "state").items()}}


def agree(url: str, store: Store) -> Samples:
    """Scrapes until /metrics says what the store says (the counters follow each commit by a
    few instructions), then checks it once more, for the message."""
    try:
        wait_until(lambda: metrics_figures(scrape(url)) == store_figures(store), timeout=10, interval=0.2)
    except TimeoutError:
        pass
    samples = scrape(url)
    assert metrics_figures(samples) == store_figures(store)
    return samples


def test_metrics_match_the_store_after_a_job_rejections_and_a_killed_agent(
        procs: Processes, broker: BrokerProcess, tmp_path: Path) -> None:
    db = str(tmp_path / "coordinator.db")
    procs.serve(db, options=SERVE)
    found = wait_until(lambda: re.search(r"metrics at (http://\S+/metrics)", procs.log("serve")), timeout=20)
    url = found.group(1)
    assert url.startswith("http://127.0.0.1:")  # loopback unless --metrics-host says otherwise
    store = wait_until(lambda: Path(db).exists() and Store.open(db), timeout=20)
    for name in ("w0", "w1"):
        procs.agent(name)
    online(store, 2)

    # A job with tasks that succeed and tasks a worker refuses (bad arguments: failed at once)
    job = store.create_job("add", [[i, 1] for i in range(40)] + [["x", 1]] * 3, name="sums")
    progress = finished(store, job)
    assert (progress.done, progress.failed) == (40, 3)
    samples = agree(url, store)
    assert series(samples, "dockercomp_tasks", "state") == {"done": 40, "failed": 3}
    assert series(samples, "dockercomp_jobs", "state") == {"failed": 1}
    assert not [key for key in samples if key[0] == "dockercomp_job_tasks"]  # no active job left
    assert samples[("dockercomp_result_latency_seconds_count", ())] == sum(store_figures(store)["attempts"].values())
    assert samples[("dockercomp_coordinator_up", ())] == 1
    assert samples[("dockercomp_broker_connected", ())] == 1
    assert samples[("dockercomp_engine_step_seconds_count", ())] > 0
    # Results come several to a message (batches, docs/protocol.md): fewer messages than tasks.
    assert samples[("dockercomp_messages_total", ())] >= 3
    assert sum(series(samples, "dockercomp_rejections_total", "kind").values()) == 0

    # Forged and unknown results, on a worker's own results topic, are counted by kind
    sender = MqttConnection(BrokerSettings.from_url(broker.url), "forger")
    sender.start()
    sender.wait_connected(10)
    try:
        ref = WorkerRef("local", "w0")
        task_id = min(store.task_ids(job.id, ["done"]))
        sender.publish(TOPICS.results(ref), Result(str(task_id), 1, "w0", "local", Outcome.OK, 5,
                                                   nonce="x" * 22).encode(), qos=1)
        sender.publish(TOPICS.results(ref), Result("424242", 1, "w0", "local", Outcome.OK, 5).encode(), qos=1)
    finally:
        sender.close(5)
    wait_until(lambda: sum(series(scrape(url), "dockercomp_rejections_total", "kind").values()) >= 2, timeout=10)
    samples = agree(url, store)  # they changed nothing in the store
    # (a done task's attempt without its nonce is forged before it could be a duplicate)
    assert series(samples, "dockercomp_rejections_total", "kind") == {"forged": 1, "unknown": 1}

    # A killed agent: its will makes it lost, in the store and in /metrics alike
    procs.kill("w1")
    wait_until(lambda: any(w.state == "lost" for w in store.workers()), timeout=20)
    samples = agree(url, store)
    assert series(samples, "dockercomp_workers", "state") == {"online": 1, "lost": 1}


def test_a_taken_metrics_port_is_a_usage_error_with_a_hint(procs: Processes, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "dockercomp.coordinator", "serve", "--broker", procs.broker_url or "",
                               "--db", str(tmp_path / "c.db"), "--metrics-port", str(port)],
                              env=procs.env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}" in done.stderr
    assert "hint: choose another --metrics-port" in done.stderr
