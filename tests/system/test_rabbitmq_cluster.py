"""dockercomp on a three-node RabbitMQ cluster (its MQTT plugin), unchanged but for the URLs.

Real `dockercomp coordinator serve` and `dockercomp agent run` processes, a SQLite store the
test reads, and three RabbitMQ 3.10 nodes on 127.0.0.1 (tests/support/rabbitmq.py): the
coordinator on one node, agents spread over the others, as an operator would run them.
What RabbitMQ does differently from Mosquitto (docs/protocol.md, "RabbitMQ"): retained
messages are kept per node and only replayed to exact-topic subscriptions, a node that dies
sends no wills for its clients, a client's subscription queue stays homed on the node it
connected to, and '.' in a topic level becomes '/'.

Every job's task timeout is 60 s, so its leases (timeout + 2 s) never run out within a test:
whatever finishes a task after a failure is the protocol's liveness, not a lease expiring.
Each test has its own topic root (`?root=`), so the retained messages earlier tests left on
the shared cluster are not its business.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from dockercomp.coordinator.store import JobRow, Store
from dockercomp.broker.rabbitmq import NODE_START_TIMEOUT, find_rabbitmq
from tests.support import REPO_ROOT, require, wait_until
from tests.support.processes import FAST_SERVE, Processes, finished
from tests.support.rabbitmq import RabbitCluster, RabbitNode, cluster, rabbitmq_cluster  # noqa: F401

pytestmark = [pytest.mark.timeout(180), pytest.mark.real, pytest.mark.slow]

# A task timeout no test waits out (see the module docstring).
TASK_TIMEOUT = 60.0
# The bound: tasks of agents on a node that died finish within this of its death.
NODE_LOSS_BOUND = 30.0
# "Within seconds": how long agents or a (re)started coordinator may take to get work going.
PICKUP_BOUND = 30.0
VOLUNTEER = "local"
# Seconds between the agents' heartbeats: one that falls silent is lost 3 x this + 5 s later.
HEARTBEAT = 2.0


def broker_url(nodes: Sequence[RabbitNode], root: str) -> str:
    """The --broker value naming `nodes` in order of preference (comma-separated), each
    with this test's topic root."""
    return ",".join(f"{node.url}?root={root}" for node in nodes)


class Deployment:
    """One test's processes on the cluster: `serve` and agents, logs in LOGS/, a SQLite store."""

    def __init__(self, cluster: RabbitCluster, workdir: Path, root: str) -> None:
        self.cluster = cluster
        self.root = root
        self.procs = Processes(None, workdir / "logs")
        self.db = str(workdir / "coordinator.db")
        self.store = Store.open(self.db)

    def serve(self, *nodes: RabbitNode, name: str = "serve") -> None:
        self.procs.start(name, ["dockercomp.coordinator", "serve", "--broker", broker_url(nodes, self.root),
                                "--db", self.db, *FAST_SERVE])

    def agent(self, worker: str, *nodes: RabbitNode, concurrency: int = 2) -> None:
        self.procs.start(worker, ["dockercomp.agent.cli", "run", "--broker", broker_url(nodes, self.root),
                                  "--worker-id", worker, "--volunteer", VOLUNTEER, "--concurrency", str(concurrency),
                                  "--keepalive", "2", "--heartbeat", str(HEARTBEAT), "--grace", "1", "-v",
                                  "--health-file", str(self.procs.logs / f"{worker}.health")])

    def job(self, function: str, args: list[list[object]]) -> JobRow:
        return self.store.create_job(function, args, timeout=TASK_TIMEOUT)

    def worker(self, name: str) -> dict[str, object]:
        row = next((w for w in self.store.workers() if w.key == f"{VOLUNTEER}/{name}"), None)
        return {} if row is None else {"state": row.state, "seq": row.seq, "done": row.tasks_done}

    def online(self, *names: str, timeout: float = PICKUP_BOUND) -> None:
        wait_until(lambda: all(self.worker(n).get("state") == "online" for n in names), timeout=timeout)

    def holding(self, name: str) -> int:
        """Tasks the store says the worker holds (open attempts)."""
        return self.store.inflight().get(f"{VOLUNTEER}/{name}", 0)

    def exactly_once(self, job: JobRow, earlier: int = 0) -> None:
        """Every task done, one accepted result each, and the workers' counters add up
        (`earlier`: tasks they had done before this job)."""
        progress = self.store.progress(job)
        results = list(self.store.results(job))
        assert (progress.done, progress.failed, len(results)) == (progress.total, 0, progress.total)
        assert sorted(r.index for r in results) == list(range(progress.total))
        assert all(r.state == "done" and r.worker for r in results)
        assert sum(w.tasks_done for w in self.store.workers()) == earlier + progress.total


@pytest.fixture
def deployment(cluster: RabbitCluster, tmp_path: Path,  # noqa: F811 - the fixture imported above
               request: pytest.FixtureRequest) -> Iterator[Deployment]:
    made = Deployment(cluster, tmp_path, root=f"dc{int(time.time() * 1000) % 10**9}")
    yield made
    made.procs.stop_all()
    made.store.close()
    if getattr(getattr(request.node, "report_call", None), "failed", False):
        print(made.procs.log())


# --------------------------------------------------------------------------- the basic job
def test_300_tasks_over_three_agents_on_three_nodes_all_done_and_attributed(deployment: Deployment) -> None:
    first, second, third = deployment.cluster.nodes
    deployment.serve(first)
    for name, node in (("a1", first), ("a2", second), ("a3", third)):
        deployment.agent(name, node)
    deployment.online("a1", "a2", "a3")

    job = deployment.job("add", [[i, i] for i in range(300)])
    finished(deployment.store, job, timeout=120)

    deployment.exactly_once(job)
    results = list(deployment.store.results(job))
    assert [r.value for r in sorted(results, key=lambda r: r.index)] == [2 * i for i in range(300)]
    # each node's agent took part: work crossed the cluster both ways
    assert {r.worker for r in results} == {f"{VOLUNTEER}/a1", f"{VOLUNTEER}/a2", f"{VOLUNTEER}/a3"}


# --------------------------------------------------------------------------- a killed agent
def test_killed_agent_on_another_node_has_its_tasks_reissued(deployment: Deployment) -> None:
    first, second, third = deployment.cluster.nodes
    deployment.serve(first)
    deployment.agent("a1", second)
    deployment.agent("a2", third)
    deployment.online("a1", "a2")
    job = deployment.job("sleep", [[0.2]] * 40)
    wait_until(lambda: deployment.holding("a1") >= 2 and deployment.worker("a1")["done"], timeout=30)

    deployment.procs.kill("a1")  # its will, published by node 2, reaches the coordinator on node 1
    killed_at = time.monotonic()
    finished(deployment.store, job, timeout=NODE_LOSS_BOUND)

    assert time.monotonic() - killed_at < NODE_LOSS_BOUND
    deployment.exactly_once(job)
    reissued = [r for r in deployment.store.results(job) if r.errors]
    assert reissued and all(r.worker == f"{VOLUNTEER}/a2" and r.errors[0]["worker"] == f"{VOLUNTEER}/a1"
                            for r in reissued)


# --------------------------------------------------------------------------- start-up order
def test_agents_started_before_the_coordinator_get_work_within_seconds(deployment: Deployment) -> None:
    first, second, third = deployment.cluster.nodes
    deployment.agent("a1", second)
    deployment.agent("a2", third)
    for name in ("a1", "a2"):  # both connected and announced (retained) before serve exists
        wait_until(lambda: (deployment.procs.logs / f"{name}.health").exists(), timeout=PICKUP_BOUND)
    job = deployment.job("add", [[i, 1] for i in range(30)])

    deployment.serve(first)
    started = time.monotonic()
    finished(deployment.store, job, timeout=PICKUP_BOUND)

    assert time.monotonic() - started < PICKUP_BOUND
    deployment.exactly_once(job)


def test_a_restarted_coordinator_on_another_node_gets_work_within_seconds(deployment: Deployment) -> None:
    first, second, third = deployment.cluster.nodes
    deployment.serve(first, name="serve-1")
    deployment.agent("a1", second)
    deployment.agent("a2", third)
    deployment.online("a1", "a2")
    finished(deployment.store, deployment.job("add", [[i, 1] for i in range(20)]), timeout=PICKUP_BOUND)

    deployment.procs.kill("serve-1")
    job = deployment.job("add", [[i, 2] for i in range(20)])
    # On node 2 now: its retained store holds a1's presence only, and not for a wildcard.
    deployment.serve(second, name="serve-2")
    started = time.monotonic()
    finished(deployment.store, job, timeout=PICKUP_BOUND)

    assert time.monotonic() - started < PICKUP_BOUND
    deployment.exactly_once(job, earlier=20)
    assert {r.worker for r in deployment.store.results(job)} == {f"{VOLUNTEER}/a1", f"{VOLUNTEER}/a2"}


# --------------------------------------------------------------------------- names
def test_a_worker_named_with_a_dot_is_refused_at_start_or_works(deployment: Deployment) -> None:
    first, second, _ = deployment.cluster.nodes
    deployment.serve(first)
    deployment.agent("lab.1", second)
    job = deployment.job("add", [[i, 1] for i in range(4)])

    agent = deployment.procs.running["lab.1"]
    try:
        code = agent.wait(10)
    except subprocess.TimeoutExpired:  # still running: then it must work
        finished(deployment.store, job, timeout=PICKUP_BOUND)
        deployment.exactly_once(job)
        assert {r.worker for r in deployment.store.results(job)} == {f"{VOLUNTEER}/lab.1"}
        return
    log = deployment.procs.log("lab.1")
    assert code == 2 and "lab.1" in log and "'.'" in log, log


# --------------------------------------------------------------------------- a node dies
def test_agents_of_a_node_that_dies_fail_over_and_their_tasks_finish_within_30_s(deployment: Deployment) -> None:
    first, second, third = deployment.cluster.nodes
    deployment.serve(first)
    deployment.agent("a1", second, third)
    deployment.agent("a2", second, third)
    deployment.agent("a3", third, first)
    deployment.agent("a4", second)  # knows no other node: can only fall silent
    deployment.online("a1", "a2", "a3", "a4")
    job = deployment.job("sleep", [[0.3]] * 120)
    wait_until(lambda: all(deployment.holding(n) >= 2 and deployment.worker(n)["done"] for n in ("a1", "a2", "a4")),
               timeout=30)
    before = {n: deployment.worker(n) for n in ("a1", "a2")}

    second.kill()  # the whole node at once: no wills for a1, a2, a4; their queues there gone with it
    died_at = time.monotonic()
    progress = finished(deployment.store, job, timeout=NODE_LOSS_BOUND + 10)
    elapsed = time.monotonic() - died_at
    print(f"the job finished {elapsed:.1f} s after node 2 died")

    assert elapsed < NODE_LOSS_BOUND
    assert progress.state == "done"
    deployment.exactly_once(job)
    for name in ("a1", "a2"):  # on node 3 now, on a new connection, still working
        after = deployment.worker(name)
        assert after["state"] == "online" and int(after["seq"]) > int(before[name]["seq"]), (name, after)
        assert f"127.0.0.1:{third.port}" in deployment.procs.log(name)
    # a4's heartbeats stopped: lost, its tasks done by others, none of them sent back to it
    assert deployment.worker("a4")["state"] == "lost"
    taken_back = [r for r in deployment.store.results(job) if any(e["worker"] == f"{VOLUNTEER}/a4" for e in r.errors)]
    assert taken_back and all(r.worker != f"{VOLUNTEER}/a4" for r in taken_back)


def test_the_coordinators_node_dying_mid_job_loses_nothing(deployment: Deployment) -> None:
    first, second, third = deployment.cluster.nodes
    deployment.serve(first, second)
    deployment.agent("a1", second, third)
    deployment.agent("a2", third, second)
    deployment.online("a1", "a2")
    job = deployment.job("sleep", [[0.1]] * 150)
    wait_until(lambda: deployment.store.progress(job).done >= 20, timeout=30)

    first.kill()  # the coordinator's session queue is promoted on its mirror; results keep arriving there
    died_at = time.monotonic()
    finished(deployment.store, job, timeout=NODE_LOSS_BOUND + 10)

    assert time.monotonic() - died_at < NODE_LOSS_BOUND
    deployment.exactly_once(job)
    assert f"127.0.0.1:{second.port}" in deployment.procs.log("serve")


# --------------------------------------------------------------------------- the bench
def test_the_bench_scale_phase_runs_on_its_own_three_node_cluster(tmp_path: Path) -> None:
    require(find_rabbitmq(), "RabbitMQ (rabbitmq-server)", "apt-get install rabbitmq-server (or `make system`)")

    # When the scale phase runs, tiny, with --broker rabbitmq-cluster (bench/cluster.py)
    done = subprocess.run([sys.executable, "-m", "bench", "--only", "scale", "--broker", "rabbitmq-cluster",
                           "--scale-workers", "6", "--scale-processes", "3", "--scale-tasks", "60",
                           "--scale-slice", "60", "--out", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=170)

    # Then its figures are those of a job through three nodes, the broker's CPU measured
    assert done.returncode == 0, f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
    [path] = tmp_path.glob("*.json")
    scale = json.loads(path.read_text())["scale"]
    assert scale["brokers"]["kind"] == "rabbitmq-cluster" and scale["brokers"]["nodes"] == 3
    assert scale["workers"] == 6 and scale["answered_by_swarm"] >= 60 and scale["malformed_tasks"] == 0
    [job] = scale["jobs"]
    assert job["tasks"] == 60 and job["workers_used"] == 6 and job["cpu_ms_per_task_by_group"]["broker"] > 0


def test_the_cluster_said_each_step_of_its_start(cluster: RabbitCluster) -> None:  # noqa: F811
    """What `bench --broker rabbitmq-cluster` prints while the cluster starts: a slow step is
    seen while it runs long, instead of a silent wait."""
    steps = cluster.steps
    assert sum("booted" in line for line in steps) == 3 and sum("joined" in line for line in steps) == 2
    assert steps[-2].startswith("cluster formed (") and steps[-1].startswith("mirroring policy set (")


def test_a_start_out_of_time_fails_saying_so_and_leaves_nothing_running(tmp_path: Path) -> None:
    bindir = find_rabbitmq()
    require(bindir, "RabbitMQ (rabbitmq-server with its MQTT plugin)", "apt-get install rabbitmq-server")
    late = RabbitCluster(tmp_path / "late", bindir=bindir)
    began = time.monotonic()

    with pytest.raises(RuntimeError) as failed:  # BrokerStartError is one too
        late.start(timeout=2.0)  # a node alone boots in ~5 s

    assert time.monotonic() - began < 30  # not the 90 s a node may take
    assert "did not" in str(failed.value) or "within its time" in str(failed.value)
    left = late.leftovers()
    assert not left, [Path(f"/proc/{pid}/cmdline").read_bytes()[:300] for pid in left]
    assert all(node.start_timeout == NODE_START_TIMEOUT for node in late.nodes)  # a later lone start gets its time
