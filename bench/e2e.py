"""dockercomp end to end: `dockercomp coordinator serve` (SQLite) + `dockercomp agent run` processes + a broker.

The run: start the coordinator and the agents as a user would, wait until every agent is
registered, run a small warm-up job (so task processes, imports and caches are warm), then
submit the measured job of no-op tasks through the Python API and wait until the store says
it is done. Every figure is read back from the store, not from a poller:

- throughput: tasks / (last result stored - first task dispatched), i.e. Attempt.sent_at of
  the earliest dispatch to Result.received_at of the latest result of the job;
- latency: per task, Result.received_at - Attempt.sent_at of the accepted attempt (dispatch
  -> worker -> task process -> result stored), the same span the raw baseline measures;
- pickup: first dispatch - submit returned (the coordinator polls for new jobs);
- coordinator CPU seconds and RSS from /proc over the measured job.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dockercomp.agent.defaults import HEALTH_FILE_ENV, TASK_BATCH, VOLUNTEER_ENV

from bench.defaults import FUNCTION, PHASE_TIMEOUT, START_TIMEOUT, VOLUNTEER
from bench.errors import BenchError
from bench.harness import Child, CpuMeter, Latency, console_script, descendants, proc_sample, wait_for
from bench.profile import summarize

# Warm-up tasks per unit of total capacity, run before the measured job.
WARMUP_PER_SLOT = 3
# Task processes per agent: what `dockercomp agent run` starts by default, one per CPU. The rest of the
# tasks an agent holds in flight is its prefetch (tasks queued on it), as a volunteer's
# agent would run: 25 task processes per agent on 2 cores would only measure their churn.
AGENT_PROCESSES = os.cpu_count() or 1
# Seconds between looks at the job row while waiting for it to finish (one indexed read).
_DONE_POLL = 0.05


@dataclass(frozen=True)
class E2ERun:
    """One end-to-end measurement."""

    key: str  # stable identifier in the JSON: e2e-mosquitto, e2e-amqtt, e2e-window1
    label: str
    broker: str
    tasks: int
    agents: int
    concurrency: int  # task processes per agent (`dockercomp agent run --concurrency`)
    window: int  # the most tasks the coordinator keeps in flight: agents x (concurrency + prefetch)
    submit_s: float
    pickup_s: float
    seconds: float
    tasks_per_s: float
    latency: Latency
    done: int
    failed: int
    redispatched: int  # attempts beyond the first: should be 0 in a healthy run
    per_worker: dict[str, int] = field(default_factory=dict)
    cpu_ms_per_task: dict[str, float] = field(default_factory=dict)  # coordinator, agents, task processes, broker
    cpu_busy: float = 0.0  # share of all cores those processes used during the measured job
    coordinator_rss_mb: float = 0.0
    # py-spy summaries when --profile: {"coordinator": ..., "agent": ...} (the first agent's
    # own process; its task processes show in cpu_ms_per_task)
    profile: dict[str, Any] | None = None
    prefetch: int = 0  # tasks queued on each agent beyond its concurrency (`dockercomp agent run --prefetch`)
    # Tasks (results) per message the agents take (`agent run --batch`, broker/batches.py); 0: one per message.
    batch: int = TASK_BATCH
    # With several measured jobs (bench/run.py), each one's tasks/s, raw baseline and ratio, in
    # order; this run's own figures are the median round's.
    rounds: list[dict[str, float]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def agent_env(workdir: Path, name: str) -> dict[str, str]:
    env = dict(os.environ)
    env[VOLUNTEER_ENV] = VOLUNTEER
    # One health file per agent: they would overwrite each other's in /tmp.
    env[HEALTH_FILE_ENV] = str(workdir / f"{name}.health.json")
    return env


def start_coordinator(url: str, db: Path, workdir: Path, name: str = "coordinator",
                      serve_args: Sequence[str] = ()) -> Child:
    return Child(name, [*console_script("coordinator"), "serve", "--broker", url, "--db", str(db), *serve_args],
                 workdir / f"{name}.log")


def agent_shape(in_flight: int) -> tuple[int, int]:
    """(concurrency, prefetch) of an agent that holds ``in_flight`` tasks."""
    processes = min(in_flight, AGENT_PROCESSES)
    return processes, in_flight - processes


def start_agents(url: str, workdir: Path, count: int, concurrency: int, prefix: str, prefetch: int = 0) -> list[Child]:
    agents = []
    for i in range(count):
        name = f"{prefix}{i}"
        agents.append(Child(name, [*console_script("agent"), "run", "--broker", url, "--worker-id", name,
                                   "--concurrency", str(concurrency), "--prefetch", str(prefetch)],
                            workdir / f"{name}.log", env=agent_env(workdir, name)))
    return agents


def check_all(children: list[Child]) -> None:
    for child in children:
        child.check_alive()


def online_workers(store: Any, names: set[str]) -> int:
    from dockercomp.coordinator.sqlstore import Worker
    from dockercomp.coordinator.store import WorkerState

    store.bind()
    rows = Worker.select(Worker.name).where((Worker.state == WorkerState.ONLINE.value)
                                            & (Worker.volunteer == VOLUNTEER)).tuples()
    return len(names & {name for (name,) in rows})


def job_finished(store: Any, job_id: int) -> bool:
    from dockercomp.coordinator.sqlstore import Job
    from dockercomp.coordinator.store import JobState

    store.bind()
    state = Job.select(Job.state).where(Job.id == job_id).scalar()
    return state != JobState.ACTIVE.value


def job_figures(store: Any, job_id: int) -> dict[str, Any]:
    """Timings and attribution of one finished job, read from the store."""
    import peewee as pw

    from dockercomp.coordinator.sqlstore import Attempt, Result, Task, Worker
    from dockercomp.coordinator.store import TaskState

    store.bind()
    rows = list(Result.select(Attempt.sent_at, Result.received_at, Worker.name)
                .join(Attempt, on=(Result.attempt == Attempt.id))
                .join_from(Result, Worker, on=(Result.worker == Worker.id))
                .join_from(Result, Task, on=(Result.task == Task.id))
                .where(Task.job == job_id).tuples())
    states = dict(Task.select(Task.state, pw.fn.COUNT(Task.id)).where(Task.job == job_id)
                  .group_by(Task.state).tuples())
    attempts = (Attempt.select(pw.fn.COUNT(Attempt.id)).join(Task).where(Task.job == job_id).scalar()) or 0
    first_sent = (Attempt.select(pw.fn.MIN(Attempt.sent_at)).join(Task).where(Task.job == job_id).scalar())
    per_worker: dict[str, int] = {}
    for _, _, name in rows:
        per_worker[name] = per_worker.get(name, 0) + 1
    done = states.get(TaskState.DONE.value, 0)
    return {
        "first_sent": first_sent,
        "last_received": max((r[1] for r in rows), default=None),
        "latencies": [received - sent for sent, received, _ in rows],
        "done": done,
        "failed": states.get(TaskState.FAILED.value, 0),
        "redispatched": max(0, attempts - sum(states.values())),
        "per_worker": dict(sorted(per_worker.items())),
    }


def run_job(client: Any, coordinator: Child, agents: list[Child], tasks: int, name: str,
            timeout: float = PHASE_TIMEOUT) -> tuple[int, float, float]:
    """Submit ``tasks`` no-op tasks and wait until done; (job id, submit seconds, submit end)."""
    started = time.perf_counter()
    job = client.submit(FUNCTION, ([] for _ in range(tasks)), name=name)
    submit_s = time.perf_counter() - started
    submitted_at = time.time()
    wait_for(lambda: job_finished(client.store, job.id), timeout, f"job {name} ({tasks} tasks) finishing",
             interval=_DONE_POLL, check=lambda: check_all([coordinator, *agents]))
    return job.id, submit_s, submitted_at


def measure(*, key: str, label: str, broker_name: str, url: str, workdir: Path, tasks: int, agents: int,
            concurrency: int, broker_pid: int | None = None, profile: bool = False,
            serve_args: Sequence[str] = ()) -> E2ERun:
    """One end-to-end run on the broker at ``url`` with ``concurrency`` tasks in flight per
    agent (``agent_shape``: task processes + prefetch); every process started here is stopped here."""
    return measure_rounds(key=key, label=label, broker_name=broker_name, url=url, workdir=workdir, tasks=tasks,
                          agents=agents, concurrency=concurrency, broker_pid=broker_pid, profile=profile,
                          serve_args=serve_args)[0]


def measure_rounds(*, key: str, label: str, broker_name: str, url: str, workdir: Path, tasks: int, agents: int,
                   concurrency: int, broker_pid: int | None = None, profile: bool = False,
                   serve_args: Sequence[str] = (), rounds: int = 1,
                   between: Callable[[], None] | None = None,
                   before: Callable[[], None] | None = None) -> list[E2ERun]:
    """``measure``, with ``rounds`` measured jobs on the same coordinator and agents, and
    ``between()`` (the raw baseline, bench/run.py) after each, and ``before()`` once before the
    first (after the warm-up), while they wait idle: one E2ERun per job."""
    from dockercomp.coordinator.api import Client

    in_flight = concurrency
    concurrency, prefetch = agent_shape(in_flight)
    if prefetch:
        # Said in every table: the window equals the raw baseline's, reached with prefetch.
        label = f"{label} ({agents}×[{concurrency} running + {prefetch} prefetch])"

    workdir.mkdir(parents=True, exist_ok=True)
    db = workdir / f"{key}.db"
    coordinator = start_coordinator(url, db, workdir, serve_args=serve_args)
    children: list[Child] = [coordinator]
    client: Any = None
    spies: list[subprocess.Popen[bytes]] = []
    profiles: dict[str, Path] = {}
    try:
        # The coordinator creates the tables; the client opens the same file once it exists.
        wait_for(lambda: db.exists(), START_TIMEOUT, "the coordinator creating its database",
                 check=coordinator.check_alive)
        fleet = start_agents(url, workdir, agents, concurrency, prefix=f"{key}-a", prefetch=prefetch)
        children += fleet
        client = Client(str(db))
        names = {agent.name for agent in fleet}
        wait_for(lambda: online_workers(client.store, names) == len(names), START_TIMEOUT * max(1, agents // 2),
                 f"{len(names)} agents registering at the coordinator",
                 check=lambda: check_all(children))
        run_job(client, coordinator, fleet, agents * in_flight * WARMUP_PER_SLOT, f"{key}-warmup")
        if profile:
            profiles = {"coordinator": workdir / f"{key}.coordinator.pyspy.txt",
                        "agent": workdir / f"{key}.agent.pyspy.txt"}
            spies = [start_profiler(coordinator.pid, profiles["coordinator"]),
                     start_profiler(fleet[0].pid, profiles["agent"])]
            time.sleep(0.5)  # py-spy attaches asynchronously; the first samples would otherwise be lost
        groups = {"coordinator": [coordinator.pid], "agents": [agent.pid for agent in fleet],
                  "task processes": [pid for agent in fleet for pid in descendants(agent.pid)]}
        if broker_pid:
            groups["broker"] = [broker_pid]
        measured = []
        if before is not None:
            before()
        for number in range(rounds):
            meter = CpuMeter(groups, alone=["agents"])
            meter.start()
            name = key if rounds == 1 else f"{key}-{number + 1}"
            job_id, submit_s, submitted_at = run_job(client, coordinator, fleet, tasks, name)
            cpu = meter.stop()
            rss = proc_sample(coordinator.pid).peak_rss_mb
            if number == 0:
                for spy in spies:  # the first job's profile
                    stop_profiler(spy)
            measured.append((job_id, submit_s, submitted_at, cpu, rss, job_figures(client.store, job_id)))
            if between is not None:
                between()
    finally:
        for spy in spies:
            if spy.poll() is None:
                spy.kill()
        if client is not None:
            client.close()
        for child in reversed(children):
            child.stop()
    summary = {name: summarize(path).to_json() for name, path in profiles.items() if path.exists()} or None
    runs = []
    for job_id, submit_s, submitted_at, cpu, rss, figures in measured:
        if figures["first_sent"] is None or figures["last_received"] is None:
            raise BenchError(f"{label}: the store holds no dispatch or result for job {job_id} of {key}; "
                             f"see the logs in {workdir}")
        seconds = figures["last_received"] - figures["first_sent"]
        runs.append(E2ERun(
            key=key, label=label, broker=broker_name, tasks=tasks, agents=agents, concurrency=concurrency,
            window=agents * in_flight, submit_s=round(submit_s, 3),
            pickup_s=round(figures["first_sent"] - submitted_at, 3), seconds=round(seconds, 3),
            tasks_per_s=round(figures["done"] / seconds, 1) if seconds > 0 else 0.0,
            latency=Latency.of_seconds(figures["latencies"]), done=figures["done"], failed=figures["failed"],
            redispatched=figures["redispatched"], per_worker=figures["per_worker"],
            cpu_ms_per_task=cpu.per_task_ms(tasks), cpu_busy=cpu.busy, coordinator_rss_mb=round(rss, 1),
            profile=summary if not runs else None, prefetch=prefetch,
        ))
    return runs


# --------------------------------------------------------------------------- profiling
def start_profiler(pid: int, out: Path, *, subprocesses: bool = False) -> subprocess.Popen[bytes]:
    """py-spy sampling every thread of ``pid`` (and its children), as collapsed stacks; idle
    threads are left out, so shares are of the time the process was busy."""
    beside = Path(sys.executable).with_name("py-spy")
    binary = shutil.which("py-spy") or (str(beside) if beside.exists() else None)
    if binary is None:
        raise BenchError("--profile needs py-spy: pip install py-spy")
    argv = [binary, "record", "--pid", str(pid), "--format", "raw", "--rate", "250", "--threads",
            "--output", str(out)]
    if subprocesses:
        argv.append("--subprocesses")
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def stop_profiler(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(2)  # SIGINT: py-spy writes its output and exits
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
