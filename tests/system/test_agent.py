"""The worker agent as volunteers run it: real `dockercomp agent run` processes against real brokers.

The protocol contract (presence and wills, shutdown, broker restart, outcomes of bad tasks)
runs against Mosquitto and amqtt; behaviour that does not depend on the broker runs against
one of them. The last section drives an Agent in-process over the in-memory broker, for the
logic that is awkward to reach from outside (redeliveries, retained tasks, seq numbers).
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dockercomp.agent.agent import Agent, AgentState
from dockercomp.agent.errors import HealthError
from dockercomp.agent.health import check_health
from dockercomp.agent.settings import AgentSettings
from dockercomp.agent.tasks import Registry
from dockercomp.broker.defaults import PROTOCOL_VERSION
from dockercomp.broker.memory import MemoryBroker
from dockercomp.broker.messages import (
    OfflineReason,
    Outcome,
    Presence,
    PresenceState,
    Result,
    Task,
)
from dockercomp.broker.topics import Topics, WorkerRef
from tests.support import REPO_ROOT, Seen, Watcher, connect_client, free_port, wait_until
from tests.support.brokers import BrokerProcess

pytestmark = pytest.mark.timeout(90)

VOLUNTEER = "lab"
KEEPALIVE = 2  # seconds; a killed agent (socket closed) is reported at once, a frozen one later
WILL_MARGIN = 1.5  # seconds on top of 1.5 x keepalive: broker timer granularity, loaded CI
# Mosquitto 2.0.11 checks keepalives coarsely: a frozen client with keepalive 2 or 5 was
# dropped after 3.4-5.8 s and 6.6-11.3 s here; what dockercomp promises (docs/protocol.md,
# `agent run --help`) is 2 x keepalive + 5 s, and test_will_timing.py holds both brokers to it.
FROZEN_LIMIT = 2 * KEEPALIVE + 5.0
TOPICS = Topics()

# A scientist's task package, installed the way pip would: a module plus a dist-info
# directory whose entry_points.txt registers its functions under dockercomp.tasks.
PLUGIN_MODULE = textwrap.dedent('''
    import os

    def explode(message):
        raise RuntimeError(message)

    def die():
        os._exit(7)
''')
PLUGIN_ENTRY_POINTS = textwrap.dedent('''
    [dockercomp.tasks]
    explode = labtasks:explode
    die = labtasks:die
''')


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("site")
    (root / "labtasks.py").write_text(PLUGIN_MODULE)
    dist = root / "labtasks-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: labtasks\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(PLUGIN_ENTRY_POINTS)
    return root


def agent_command() -> list[str]:
    """The installed `agent` console script when there is one, else the module."""
    script = Path(sys.executable).with_name("agent")
    return [str(script)] if script.exists() else [sys.executable, "-m", "dockercomp.agent.cli"]


class AgentProcess:
    """`dockercomp agent run` in a child process, with its log and health file in the test's directory."""

    def __init__(self, url: str, worker: str, workdir: Path, plugin_dir: Path, *, args: list[str] | None = None) -> None:
        self.worker = worker
        self.ref = WorkerRef(VOLUNTEER, worker)
        self.health_file = workdir / f"{worker}.health.json"
        self.log_path = workdir / f"{worker}.log"
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", DOCKERCOMP_HEALTH_FILE=str(self.health_file),
                        PYTHONPATH=os.pathsep.join([str(plugin_dir), str(REPO_ROOT)]))
        self.command = [*agent_command(), "run", "--broker", url, "--worker-id", worker, "--volunteer", VOLUNTEER,
                        "--concurrency", "2", "--keepalive", str(KEEPALIVE), "--grace", "10", "-v", *(args or [])]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            env=self.env)
        return self

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def wait(self, timeout: float = 20) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def agents(request: pytest.FixtureRequest, tmp_path: Path, plugin_dir: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Factory: agents("w1", url) starts `dockercomp agent run`; all are killed after the test."""
    started: list[AgentProcess] = []

    def start(worker: str, url: str, *args: str) -> AgentProcess:
        agent = AgentProcess(url, worker, tmp_path, plugin_dir, args=list(args)).start()
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()
        if getattr(getattr(request.node, "report_call", None), "failed", False):
            print(f"\n--- agent {agent.worker} log ---\n{agent.log()[-4000:]}")


def connected(agent: AgentProcess) -> bool:
    """True once `dockercomp agent check` would pass. The agent writes the file just after it announces
    itself online, so a watcher can see the presence before the file says connected."""
    try:
        return check_health(agent.health_file).connected
    except HealthError:
        return False


def started(agent: AgentProcess, task_id: str, function: str) -> None:
    """Wait until the agent's log (-v) says the task is running in a task process."""
    wait_until(lambda: f"task {task_id} attempt 1 ({function}) started" in agent.log(), timeout=10)


def send_task(url: str, worker: str, payload: bytes | Task) -> None:
    body = payload.encode() if isinstance(payload, Task) else payload
    client = connect_client(url)
    try:
        client.publish(TOPICS.tasks(WorkerRef(VOLUNTEER, worker)), body, qos=1).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()


def task(task_id: str, function: str, *args: Any, timeout: float = 30.0, attempt: int = 1) -> Task:
    return Task(task_id=task_id, job_id="1", attempt=attempt, function=function, args=list(args), timeout=timeout)


def presence(message: Seen) -> Presence:
    return Presence.decode(message.payload)


def is_presence(state: PresenceState, reason: OfflineReason | None = None) -> Callable[[Seen], bool]:
    def match(message: Seen) -> bool:
        if not message.topic.endswith("/presence"):
            return False
        p = presence(message)
        return p.state is state and (reason is None or p.reason is reason)
    return match


def is_result(task_id: str) -> Callable[[Seen], bool]:
    return lambda m: m.topic.endswith("/results") and Result.decode(m.payload).task_id == task_id


def result_of(watcher: Watcher, task_id: str, timeout: float = 15) -> Result:
    return Result.decode(watcher.wait_for(is_result(task_id), timeout=timeout).payload)


def worker_filter(worker: str) -> str:
    return f"dockercomp/workers/{VOLUNTEER}/{worker}/#"


# --- presence and wills ------------------------------------------------------------------------------------


def test_a_killed_agent_is_reported_lost_at_once_and_its_restart_has_a_higher_seq(
    broker: BrokerProcess, agents: Callable[..., AgentProcess]
) -> None:
    with Watcher(broker.url, worker_filter("w1")) as watcher:
        first = agents("w1", broker.url)
        online = presence(watcher.wait_for(is_presence(PresenceState.ONLINE)))
        assert (online.worker, online.volunteer, online.capacity) == ("w1", VOLUNTEER, 2)
        assert {"add", "sleep", "mandelbrot_tile", "explode", "die"} <= set(online.functions)

        first.process.kill()  # type: ignore[union-attr]  # kill -9: the broker sees the socket close
        killed_at = time.monotonic()
        will = presence(watcher.wait_for(is_presence(PresenceState.OFFLINE), timeout=1.5 * KEEPALIVE + WILL_MARGIN))
        assert time.monotonic() - killed_at <= 1.5 * KEEPALIVE + WILL_MARGIN
        assert will.reason is OfflineReason.LOST and will.seq == online.seq

        watcher.clear()
        agents("w1", broker.url)  # the same worker comes back
        again = presence(watcher.wait_for(is_presence(PresenceState.ONLINE)))
    assert again.seq > will.seq
    # Late subscribers (the coordinator after a restart) see the current state: retained.
    with Watcher(broker.url, TOPICS.presence(WorkerRef(VOLUNTEER, "w1"))) as late:
        retained = late.wait_for(lambda m: True)
    assert retained.retain and presence(retained).seq == again.seq and presence(retained).state is PresenceState.ONLINE


def test_a_frozen_agent_is_reported_lost_within_the_promised_bound_then_outranks_its_will(
    mosquitto: BrokerProcess, agents: Callable[..., AgentProcess]
) -> None:
    # Mosquitto here, for its log line below; the embedded broker's enforced keepalive is held
    # to the same bound by test_will_timing.py.
    broker = mosquitto
    with Watcher(broker.url, worker_filter("w2")) as watcher:
        agent = agents("w2", broker.url)
        online = presence(watcher.wait_for(is_presence(PresenceState.ONLINE)))

        agent.signal(signal.SIGSTOP)  # hung or cut off: the socket stays open, only keepalive tells
        stopped_at = time.monotonic()
        limit = FROZEN_LIMIT
        will = presence(watcher.wait_for(is_presence(PresenceState.OFFLINE), timeout=limit))
        assert time.monotonic() - stopped_at <= limit
        assert will.reason is OfflineReason.LOST and will.seq == online.seq
        # The keepalive did it, not a closed socket (a stopped process closes nothing). No lower
        # bound on the time: the agent's last PINGREQ went out up to one keepalive before the
        # stop, so the broker's timer can run out after only half a keepalive.
        # (Mosquitto names the client by its id, lab/w2/TOKEN.)
        wait_until(lambda: re.search(r"Client lab/w2(/\S+)? has exceeded timeout", broker.log()), timeout=5)

        agent.signal(signal.SIGCONT)  # it wakes up, finds its connection gone, reconnects
        back = presence(watcher.wait_for(lambda m: is_presence(PresenceState.ONLINE)(m) and presence(m).seq > will.seq,
                                         timeout=15))
    assert back.seq > will.seq  # so a coordinator can tell the will was stale


# --- shutdown ---------------------------------------------------------------------------------------------------


def test_sigterm_lets_the_running_task_finish_then_says_goodbye(
    broker: BrokerProcess, agents: Callable[..., AgentProcess]
) -> None:
    with Watcher(broker.url, worker_filter("w3")) as watcher:
        agent = agents("w3", broker.url)
        watcher.wait_for(is_presence(PresenceState.ONLINE))
        wait_until(lambda: connected(agent))
        send_task(broker.url, "w3", task("10", "sleep", 1.0))
        started(agent, "10", "sleep")

        agent.signal(signal.SIGTERM)
        # It says it is draining (retained, same connection) before it turns any task away.
        draining = presence(watcher.wait_for(is_presence(PresenceState.DRAINING)))
        send_task(broker.url, "w3", task("11", "add", 1, 2))  # arrives while draining: handed back
        assert agent.wait(20) == 0
        goodbye = watcher.wait_for(is_presence(PresenceState.OFFLINE))
        outputs = [m for m in watcher.messages if m.topic.endswith(("/results", "/presence"))]

    assert presence(goodbye).reason is OfflineReason.SHUTDOWN
    assert draining.seq == presence(goodbye).seq
    finished = Result.decode(outputs[-2].payload)  # the result came right before the goodbye
    assert (finished.task_id, finished.outcome, finished.value) == ("10", Outcome.OK, 1.0)
    released = Result.decode(next(m for m in outputs if is_result("11")(m)).payload)
    assert released.outcome is Outcome.RELEASED and released.error is not None  # not run, no attempt used
    assert not agent.health_file.exists()  # `dockercomp agent check` now fails: nothing runs here


def test_a_second_signal_stops_at_once_and_reports_the_killed_task(
    mosquitto: BrokerProcess, agents: Callable[..., AgentProcess]
) -> None:
    with Watcher(mosquitto.url, worker_filter("w4")) as watcher:
        agent = agents("w4", mosquitto.url)
        watcher.wait_for(is_presence(PresenceState.ONLINE))
        send_task(mosquitto.url, "w4", task("20", "sleep", 60))
        started(agent, "20", "sleep")

        agent.signal(signal.SIGTERM)
        wait_until(lambda: "draining" in agent.log(), timeout=5)
        signalled_at = time.monotonic()
        agent.signal(signal.SIGINT)
        assert agent.wait(10) == 0
        assert time.monotonic() - signalled_at < 3
        killed = result_of(watcher, "20")
        goodbye = presence(watcher.wait_for(is_presence(PresenceState.OFFLINE)))
    assert killed.outcome is Outcome.RELEASED and killed.error is not None and killed.error.type == "Shutdown"
    assert goodbye.reason is OfflineReason.SHUTDOWN


def test_tasks_still_running_when_the_grace_period_ends_are_killed_and_reported(
    mosquitto: BrokerProcess, agents: Callable[..., AgentProcess]
) -> None:
    with Watcher(mosquitto.url, worker_filter("w5")) as watcher:
        agent = agents("w5", mosquitto.url, "--grace", "0.5")
        watcher.wait_for(is_presence(PresenceState.ONLINE))
        send_task(mosquitto.url, "w5", task("30", "sleep", 60))
        started(agent, "30", "sleep")
        agent.signal(signal.SIGTERM)
        assert agent.wait(10) == 0
        killed = result_of(watcher, "30")
        watcher.wait_for(is_presence(PresenceState.OFFLINE, OfflineReason.SHUTDOWN))
    assert killed.outcome is Outcome.RELEASED and "grace period" in killed.error.message  # type: ignore[union-attr]


# --- broker restart ---------------------------------------------------------------------------------------------


class Gate:
    """A TCP relay in front of the broker that the test can close, so the agent reconnects
    only once the test's own subscriber is back (clean sessions: a result sent before the
    subscriber returns would reach nobody, by design)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.open = threading.Event()
        self.open.set()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if not self.open.is_set():
                client.close()  # refused, as a broker still down would be
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                readable, _, _ = select.select([a, b], [], [], 1.0)
                for source in readable:
                    data = source.recv(65536)
                    if not data:
                        return
                    (b if source is a else a).sendall(data)
        except OSError:
            return
        finally:
            a.close()
            b.close()

    def close(self) -> None:
        self._closing = True
        self._server.close()


def test_after_a_broker_restart_the_agent_reannounces_and_delivers_a_result_made_meanwhile(
    broker: BrokerProcess, agents: Callable[..., AgentProcess]
) -> None:
    gate = Gate(broker.port)
    try:
        with Watcher(broker.url, worker_filter("w6")) as watcher:
            agent = agents("w6", gate.url)
            before = presence(watcher.wait_for(is_presence(PresenceState.ONLINE)))
            send_task(broker.url, "w6", task("40", "sleep", 1.0))
            started(agent, "40", "sleep")

        gate.open.clear()
        broker.kill()
        broker.start()
        # The task finishes while the agent is cut off from the broker.
        wait_until(lambda: "task 40 attempt 1 finished: ok" in agent.log(), timeout=10)
        # It noticed (the health file says so) and keeps trying: nothing to take the result yet.
        wait_until(lambda: not json.loads(agent.health_file.read_text())["connected"], timeout=10)
        with Watcher(broker.url, worker_filter("w6")) as watcher:
            gate.open.set()
            finished = result_of(watcher, "40", timeout=30)  # its reconnect backoff grew meanwhile
            again = presence(watcher.wait_for(
                lambda m: is_presence(PresenceState.ONLINE)(m) and presence(m).seq > before.seq))
    finally:
        gate.close()
    assert (finished.outcome, finished.value) == (Outcome.OK, 1.0)
    assert again.seq > before.seq


# --- outcomes ------------------------------------------------------------------------------------------------------


def test_every_kind_of_bad_task_gets_its_documented_answer_and_the_agent_keeps_serving(
    broker: BrokerProcess, agents: Callable[..., AgentProcess]
) -> None:
    with Watcher(broker.url, worker_filter("w7")) as watcher:
        agent = agents("w7", broker.url)
        watcher.wait_for(is_presence(PresenceState.ONLINE))
        for bad in (
            task("50", "explode", "lab notebook on fire"),
            task("51", "sleep", 30, timeout=0.5),
            task("52", "die"),
            task("53", "os.system", "rm -rf /"),  # never imported: only registered names exist
            task("54", "add", 1),
            b'{"v":%d,"task_id":"55","attempt":3,"function":"add","args":"not a list"}' % PROTOCOL_VERSION,
            b"\x00\xffnot even json",
        ):
            send_task(broker.url, "w7", bad)
        send_task(broker.url, "w7", task("56", "add", 2, 40))

        results = {tid: result_of(watcher, tid) for tid in ("50", "51", "52", "53", "54", "55", "56")}
        time.sleep(0.3)  # nothing more may come: the unreadable payload gets no answer
        answered = {Result.decode(m.payload).task_id for m in watcher.messages if m.topic.endswith("/results")}

    expected = {
        "50": (Outcome.ERROR, "RuntimeError"), "51": (Outcome.TIMEOUT, "Timeout"), "52": (Outcome.CRASHED, "ProcessDied"),
        "53": (Outcome.REJECTED, "UnknownFunction"), "54": (Outcome.REJECTED, "BadArguments"),
        "55": (Outcome.REJECTED, "MalformedTask"),
    }
    for tid, (outcome, error_type) in expected.items():
        assert results[tid].outcome is outcome, (tid, results[tid])
        assert results[tid].error is not None and results[tid].error.type == error_type, (tid, results[tid].error)
        assert (results[tid].worker, results[tid].volunteer) == ("w7", VOLUNTEER)
    assert "lab notebook on fire" in results["50"].error.message  # type: ignore[union-attr]
    assert "explode" in results["50"].error.traceback  # type: ignore[union-attr]
    assert "exited with code 7" in results["52"].error.message  # type: ignore[union-attr]
    assert results["55"].attempt == 3
    assert (results["56"].outcome, results["56"].value) == (Outcome.OK, 42)
    assert answered == set(results)
    assert "without a readable task id" in agent.log()
    assert agent.process is not None and agent.process.poll() is None


# --- command line -----------------------------------------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None, plugin_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ, **(env or {}))
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(plugin_dir or ""), str(REPO_ROOT)]))
    return subprocess.run([*agent_command(), *args], capture_output=True, text=True, env=full_env, timeout=30)


def test_agent_check_follows_the_agent(mosquitto: BrokerProcess, agents: Callable[..., AgentProcess], tmp_path: Path) -> None:
    agent = agents("w8", mosquitto.url)
    env = {"DOCKERCOMP_HEALTH_FILE": str(agent.health_file)}
    wait_until(lambda: agent.health_file.exists() and json.loads(agent.health_file.read_text())["connected"], timeout=15)
    healthy = run_cli("check", env=env)
    assert healthy.returncode == 0 and "healthy" in healthy.stdout and "lab/w8" in healthy.stdout

    mosquitto.kill()
    wait_until(lambda: not json.loads(agent.health_file.read_text())["connected"], timeout=10)
    # Unhealthy is exit 1 (Docker's HEALTHCHECK knows only 0 and 1), the reason on stderr.
    down = run_cli("check", "--json", env=env)
    error = json.loads(down.stderr)["error"]
    assert down.returncode == 1 and down.stdout == "" and error["code"] == 1
    assert error["kind"] == "HealthError" and "not been connected" in error["message"]

    agent.process.kill()  # type: ignore[union-attr]
    agent.wait()
    gone = run_cli("check", env=env)
    assert gone.returncode == 1 and "is not running" in gone.stderr
    missing = run_cli("check", env={"DOCKERCOMP_HEALTH_FILE": str(tmp_path / "nothing.json")})
    assert missing.returncode == 1 and "no health file" in missing.stderr and "dockercomp agent run" in missing.stderr


def test_agent_functions_lists_built_ins_and_installed_packages(plugin_dir: Path) -> None:
    listed = run_cli("functions", "--json", plugin_dir=plugin_dir)
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert {"add", "sum", "sleep", "sha256", "count_primes", "noop", "mandelbrot_tile", "explode", "die"} <= set(rows)
    assert rows["explode"]["source"] == "labtasks" and rows["add"]["source"] == "built-in"


@pytest.mark.parametrize("args, env, hint", [
    (["--worker-id", "a/b"], {}, "--worker-id"),
    # RabbitMQ's MQTT plugin turns '.' into a level separator: refused at start, naming what is allowed.
    (["--worker-id", "lab.1"], {}, "letters, digits, '_' and '-' only"),
    (["--volunteer", "ann.b"], {}, "letters, digits, '_' and '-' only"),
    (["--concurrency", "0"], {}, "--concurrency"),
    (["--prefetch", "-1"], {}, "--prefetch"),
    ([], {"DOCKERCOMP_PREFETCH": "lots"}, "lots"),
    (["--broker", "http://x"], {}, "mqtt://"),
    ([], {"DOCKERCOMP_CONCURRENCY": "many"}, "many"),
])
def test_bad_options_give_one_line_and_exit_2(args: list[str], env: dict[str, str], hint: str) -> None:
    done = run_cli("run", *args, env=env)
    assert done.returncode == 2
    assert hint in done.stderr and "Traceback" not in done.stderr


def test_an_unreachable_broker_is_retried_with_a_readable_reason(agents: Callable[..., AgentProcess]) -> None:
    agent = agents("w9", f"mqtt://127.0.0.1:{free_port()}")
    wait_until(lambda: "connection refused" in agent.log(), timeout=10)
    assert agent.process is not None and agent.process.poll() is None  # still trying
    agent.signal(signal.SIGTERM)
    assert agent.wait(15) == 0


# --- in-process logic over the memory broker ------------------------------------------------------------------


@pytest.fixture
def memory_agent(tmp_path: Path) -> Iterator[tuple[Agent, MemoryBroker, list[Result]]]:
    """An Agent on the in-memory broker, run in a thread, with the results it publishes."""
    broker = MemoryBroker()
    settings = AgentSettings.from_options("mqtt://memory", worker_id="m1", volunteer=VOLUNTEER, concurrency=1,
                                          health_file=str(tmp_path / "h.json"), host="test", container=None, environ={})
    ref = settings.worker
    results: list[Result] = []
    observer = broker.connect("observer")
    observer.on_message = lambda t, p, r: results.append(Result.decode(p)) if t == TOPICS.results(ref) else None
    observer.subscribe(TOPICS.results(ref))
    observer.start()
    agent = Agent(settings, Registry.load(), transport=broker.connect(settings.client_id),
                  now_ns=lambda: 1_000_000_000_000_000)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    wait_until(lambda: broker.retained.get(TOPICS.presence(ref)))
    yield agent, broker, results
    agent.stop(now=True)
    thread.join(10)


def publish_memory(broker: MemoryBroker, payload: bytes, retain: bool = False) -> None:
    broker.deliver(TOPICS.tasks(WorkerRef(VOLUNTEER, "m1")), payload, retain)


def test_a_redelivered_task_runs_once_and_is_answered_again(
    memory_agent: tuple[Agent, MemoryBroker, list[Result]],
) -> None:
    agent, broker, results = memory_agent
    same = task("1", "sleep", 0.3).encode()
    publish_memory(broker, same)
    publish_memory(broker, same)  # while held: ignored
    wait_until(lambda: results)
    publish_memory(broker, same)  # after it was answered (its result may have been lost): re-sent
    publish_memory(broker, task("1", "add", 1, 1, attempt=2).encode())  # a new attempt is new work
    wait_until(lambda: len(results) == 3)
    time.sleep(0.3)
    assert [(r.task_id, r.attempt) for r in results] == [("1", 1), ("1", 1), ("1", 2)]
    assert results[0] == results[1]
    assert agent.counts["duplicates"] == 1 and agent.counts["resent"] == 1
    assert agent.counts["ok"] == 2  # the sleep ran once


def test_a_reused_task_id_with_other_content_is_new_work(
    memory_agent: tuple[Agent, MemoryBroker, list[Result]],
) -> None:
    # A coordinator started on a fresh database numbers its tasks from 1 again.
    agent, broker, results = memory_agent
    publish_memory(broker, task("1", "add", 1, 1).encode())
    wait_until(lambda: results)
    publish_memory(broker, task("1", "add", 2, 2).encode())
    wait_until(lambda: len(results) == 2)
    assert [r.value for r in results] == [2, 4]


def test_retained_and_foreign_messages_are_not_tasks(memory_agent: tuple[Agent, MemoryBroker, list[Result]]) -> None:
    agent, broker, results = memory_agent
    agent._on_message("dockercomp/workers/lab/other/tasks", task("7", "noop").encode(), False)
    agent._on_message(TOPICS.tasks(agent.ref), task("8", "noop").encode(), True)
    publish_memory(broker, task("9", "noop").encode())
    wait_until(lambda: results)
    time.sleep(0.2)
    assert [r.task_id for r in results] == ["9"]


def test_presence_and_will_share_a_seq_that_grows_per_connection(
    memory_agent: tuple[Agent, MemoryBroker, list[Result]]
) -> None:
    agent, broker, _ = memory_agent
    online = Presence.decode(broker.retained[agent.presence_topic])
    will = Presence.decode(agent.transport._will.payload)  # type: ignore[attr-defined, union-attr]
    assert online.state is PresenceState.ONLINE and will.reason is OfflineReason.LOST
    assert online.seq == will.seq == 1_000_000_000_000  # max(previous + 1, now in microseconds)
    assert agent._make_will() and agent._seq == online.seq + 1  # the clock did not move: still grows


@pytest.fixture
def prefetching_agent(tmp_path: Path) -> Iterator[tuple[Agent, MemoryBroker, list[Result]]]:
    """Like memory_agent, with one task process that is sent up to two tasks ahead."""
    yield from serve_in_memory(tmp_path)


@pytest.fixture
def small_queue_agent(tmp_path: Path) -> Iterator[tuple[Agent, MemoryBroker, list[Result]]]:
    """One that takes at most two tasks beyond the one it runs."""
    yield from serve_in_memory(tmp_path, max_queued=2)


def serve_in_memory(tmp_path: Path, **agent_options: Any) -> Iterator[tuple[Agent, MemoryBroker, list[Result]]]:
    broker = MemoryBroker()
    settings = AgentSettings.from_options("mqtt://memory", worker_id="m1", volunteer=VOLUNTEER, concurrency=1,
                                          prefetch=2, health_file=str(tmp_path / "h.json"), host="test",
                                          container=None, environ={})
    results: list[Result] = []
    observer = broker.connect("observer")
    observer.on_message = lambda t, p, r: results.append(Result.decode(p)) if t.endswith("/results") else None
    observer.subscribe(TOPICS.results(settings.worker))
    observer.start()
    agent = Agent(settings, Registry.load(), transport=broker.connect(settings.client_id), **agent_options)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    wait_until(lambda: broker.retained.get(TOPICS.presence(settings.worker)))
    yield agent, broker, results
    agent.stop(now=True)
    thread.join(10)


def test_the_presence_announces_capacity_and_prefetch(
    memory_agent: tuple[Agent, MemoryBroker, list[Result]],
    prefetching_agent: tuple[Agent, MemoryBroker, list[Result]],
) -> None:
    by_default, default_broker, _ = memory_agent
    online = Presence.decode(default_broker.retained[by_default.presence_topic])
    assert (online.capacity, online.prefetch) == (1, 1)  # one waiting task per slot unless told otherwise
    told, broker, _ = prefetching_agent
    assert (Presence.decode(broker.retained[told.presence_topic]).prefetch, told.runner.prefetch) == (2, 2)


def test_draining_hands_back_the_tasks_sent_ahead_to_a_busy_process_unrun(
    prefetching_agent: tuple[Agent, MemoryBroker, list[Result]],
) -> None:
    agent, broker, results = prefetching_agent
    publish_memory(broker, task("1", "sleep", 0.5).encode())
    wait_until(lambda: agent.runner.running == [("1", 1)], timeout=30)
    for task_id in ("2", "3", "4"):  # two go ahead to the busy process, one waits in the agent
        publish_memory(broker, task(task_id, "add", 1, 1).encode())
    wait_until(lambda: agent.runner.queued == 3)

    agent.stop()  # the first signal: drain
    wait_until(lambda: agent.state is AgentState.STOPPED, timeout=10)
    goodbye = Presence.decode(broker.retained[agent.presence_topic])
    # Released (no attempt used) as soon as the drain begins, before the running one ends.
    assert [(r.task_id, r.outcome) for r in results] == [("2", Outcome.RELEASED), ("3", Outcome.RELEASED),
                                                         ("4", Outcome.RELEASED), ("1", Outcome.OK)]
    assert goodbye.reason is OfflineReason.SHUTDOWN


def test_a_flood_of_tasks_is_answered_once_each_with_prefetch(
    prefetching_agent: tuple[Agent, MemoryBroker, list[Result]],
) -> None:
    agent, broker, results = prefetching_agent
    for i in range(300):
        publish_memory(broker, task(str(i), "add", i, 1).encode())
    wait_until(lambda: len(results) == 300, timeout=30)
    time.sleep(0.2)  # nothing more may come
    assert sorted((int(r.task_id), r.value) for r in results) == [(i, i + 1) for i in range(300)]


def test_tasks_beyond_the_queue_limit_are_rejected_queue_full(
    small_queue_agent: tuple[Agent, MemoryBroker, list[Result]],
) -> None:
    agent, broker, results = small_queue_agent
    publish_memory(broker, task("1", "sleep", 0.5).encode())
    wait_until(lambda: agent.runner.running == [("1", 1)], timeout=30)
    for task_id in ("2", "3", "4"):  # "2" goes ahead to the busy process, "3" waits here, "4" is one too many
        publish_memory(broker, task(task_id, "add", 1, 1).encode())
    wait_until(lambda: len(results) == 4, timeout=10)
    outcomes = {r.task_id: (r.outcome, r.error.type if r.error else None) for r in results}
    assert outcomes == {"1": (Outcome.OK, None), "2": (Outcome.OK, None), "3": (Outcome.OK, None),
                        "4": (Outcome.REJECTED, "QueueFull")}
