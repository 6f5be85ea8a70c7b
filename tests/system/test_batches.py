"""Batches on the wire over real brokers (Mosquitto and amqtt), a real SQLite file and real
agent processes: a batching agent and a single-task one share a job, a forged nonce or a
duplicate inside a batch costs only that item, and a killed agent's whole batch is reissued."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dockercomp.agent.agent import Agent
from dockercomp.agent.defaults import TASK_BATCH
from dockercomp.broker.batches import RESULTS_KEY, TASKS_KEY, read_results, wrap
from dockercomp.broker.connection import MqttConnection
from dockercomp.broker.memory import MemoryBroker
from dockercomp.broker.messages import Presence, Result, Task
from dockercomp.broker.settings import BrokerSettings
from dockercomp.broker.topics import Topics, WorkerRef
from dockercomp.coordinator.service import Coordinator, CoordinatorSettings
from dockercomp.coordinator.status import Rejection
from dockercomp.coordinator.store import Store
from tests.support import Watcher, wait_until
from tests.support.agents import FakeAgent, closing_fakes, memory_agent_running
from tests.support.brokers import BrokerProcess
from tests.support.processes import Processes, finished, online

TOPICS = Topics()
pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def coordinator_settings() -> CoordinatorSettings:
    """For the `engine` fixture: leases end 1 s after their timeout."""
    return CoordinatorSettings(lease_margin=1, lease_check=0.1, purge_after=30, purge_check=0.2,
                               poll_interval=0.2, status_interval=0.2, connect_timeout=10)


@pytest.fixture
def fakes(broker: BrokerProcess) -> Iterator[list[FakeAgent]]:
    yield from closing_fakes()


def fake(fakes: list[FakeAgent], broker: BrokerProcess, worker: str, **kwargs: object) -> FakeAgent:
    transport = MqttConnection(BrokerSettings.from_url(broker.url), f"fake-{worker}")
    agent = FakeAgent(transport, worker, **kwargs).start()  # type: ignore[arg-type]
    fakes.append(agent)
    return agent


def items(payload: bytes, key: str) -> int:
    """How many tasks/results a message carries (1 for a single one)."""
    data = json.loads(payload)
    return len(data[key]) if key in data else 1


def accepted_per_task(store: Store, job) -> dict[int, tuple[int, int, str]]:  # noqa: ANN001
    """task id -> (results stored, attempts accepted, worker of the result)."""
    store.bind()
    rows = store.db.execute_sql(
        "SELECT t.id, (SELECT count(*) FROM result r WHERE r.task_id = t.id),"
        " (SELECT count(*) FROM attempt a WHERE a.task_id = t.id AND a.outcome = 'ok'),"
        " (SELECT w.name FROM result r JOIN worker w ON w.id = r.worker_id WHERE r.task_id = t.id)"
        " FROM task t WHERE t.job_id = ?", (job.id,)).fetchall()
    return {task: (results, ok, worker) for task, results, ok, worker in rows}


def test_a_batching_agent_and_a_single_task_agent_complete_one_job(
        engine: Coordinator, procs: Processes, broker: BrokerProcess) -> None:
    store = engine.store
    with Watcher(broker.url, "dockercomp/workers/+/+/tasks") as tasks, \
            Watcher(broker.url, "dockercomp/workers/+/+/results") as results:
        procs.agent("batcher", concurrency=2, prefetch=10)  # batches by default
        procs.agent("single", concurrency=2, prefetch=10, batch=0)  # as an agent before batches
        online(store, 2)
        job = store.create_job("add", [[i, 1000] for i in range(300)])
        assert finished(store, job).done == 300
        per_task = accepted_per_task(store, job)
        # Every task answered once, by the worker it was sent to, with its own value; every
        # result carried its attempt's nonce (a wrong one is rejected, and none was).
        assert all(results == 1 and ok == 1 for results, ok, _ in per_task.values())
        assert all(row.value == row.args[0] + row.args[1] for row in store.results(job))
        assert {worker for _, _, worker in per_task.values()} == {"batcher", "single"}
        assert not engine.rejections.counts
        sent = {name: [items(m.payload, TASKS_KEY) for m in tasks.messages if f"/{name}/" in m.topic]
                for name in ("batcher", "single")}
        answered = {name: [items(m.payload, RESULTS_KEY) for m in results.messages if f"/{name}/" in m.topic]
                    for name in ("batcher", "single")}
    assert max(sent["batcher"]) > 1 and max(answered["batcher"]) > 1  # batches both ways
    assert set(sent["single"]) == {1} and set(answered["single"]) == {1}  # single messages only
    assert engine.workers.get("local/batcher").batch > 0 and engine.workers.get("local/single").batch == 0


def test_a_worker_whose_presence_predates_batches_gets_single_tasks(
        engine: Coordinator, procs: Processes, broker: BrokerProcess, fakes: list[FakeAgent]) -> None:
    store = engine.store
    old = FakeAgent(MqttConnection(BrokerSettings.from_url(broker.url), "fake-old"), "old", capacity=2, prefetch=8,
                    old_style=True)
    fakes.append(old.start())
    procs.agent("batcher", concurrency=2, prefetch=8)
    online(store, 2)
    job = store.create_job("add", [[i, i] for i in range(200)])
    assert finished(store, job).done == 200
    assert old.received and not old.batches  # every task it got came alone, as before batches
    assert {row.worker for row in store.results(job)} == {"local/old", "local/batcher"}
    assert all(results == 1 and ok == 1 for results, ok, _ in accepted_per_task(store, job).values())


def test_a_forged_nonce_or_a_duplicate_inside_a_batch_costs_only_that_item(
        engine: Coordinator, broker: BrokerProcess, fakes: list[FakeAgent]) -> None:
    store = engine.store
    agent = fake(fakes, broker, "w1", capacity=4, batch=10, auto=False)
    online(store, 1)
    job = store.create_job("add", [[i, i] for i in range(4)])
    wait_until(lambda: len(agent.held) == 4)
    assert [len(b) for b in agent.batches] == [4]  # one message for the four
    a, b, c, d = agent.held
    forged = agent.result(b).encode().replace(b.nonce.encode(), b"a-guess")
    agent.send(wrap(RESULTS_KEY, [agent.result(a).encode(), forged, agent.result(c).encode(),
                                  agent.result(c).encode()]))
    wait_until(lambda: store.progress(job).done == 2 and engine.rejections.counts.get("duplicate"))
    assert engine.rejections.counts == {Rejection.FORGED.value: 1, Rejection.DUPLICATE.value: 1}
    agent.answer(b)
    agent.answer(d)
    assert finished(store, job, timeout=20).done == 4
    assert all(results == 1 and ok == 1 for results, ok, _ in accepted_per_task(store, job).values())


def test_a_killed_agent_holding_a_batch_gets_every_task_of_it_reissued(
        engine: Coordinator, procs: Processes, broker: BrokerProcess) -> None:
    store = engine.store
    victim_topic = TOPICS.tasks(WorkerRef("local", "victim"))
    with Watcher(broker.url, victim_topic) as watcher:
        procs.agent("victim", concurrency=1, prefetch=5)
        online(store, 1)
        # A long timeout: a lease would take 31 s to run out, so a quick reissue means the will did it.
        job = store.create_job("sleep", [[0.5]] * 6, timeout=30)
        watcher.wait_for(lambda m: items(m.payload, TASKS_KEY) == 6)  # all six in one message
        wait_until(lambda: store.inflight().get("local/victim", 0) == 6)
        procs.kill("victim")
        killed_at = time.time()
    procs.agent("heir", concurrency=2, prefetch=4)
    assert finished(store, job, timeout=30).done == 6
    assert time.time() - killed_at < 20
    reissued = [r for r in store.results(job) if r.errors]
    # Every task of the batch, the one running and the five queued behind it, went elsewhere.
    assert len(reissued) == 6
    assert all(r.worker == "local/heir" and r.errors[0]["worker"] == "local/victim"
               and r.errors[0]["outcome"] == "lost" for r in reissued)


# --------------------------------------------------------------------------- the agent, in process
@pytest.fixture
def memory_agent(tmp_path: Path) -> Iterator[tuple[Agent, MemoryBroker, list[bytes]]]:
    """A real Agent (its task processes too) on the in-memory broker, with the results it publishes."""
    with memory_agent_running(tmp_path, "m1", concurrency=1, prefetch=20) as running:
        yield running


def answers(sent: list[bytes]) -> list[Result]:
    out: list[Result] = []
    for payload in list(sent):
        message = read_results(payload)
        out += [message] if isinstance(message, Result) else message.good
    return out


def test_the_agent_runs_a_batch_task_by_task_and_answers_in_batches(
        memory_agent: tuple[Agent, MemoryBroker, list[bytes]]) -> None:
    agent, broker, sent = memory_agent
    presence = Presence.decode(broker.retained[TOPICS.presence(agent.ref)])
    assert presence.batch == TASK_BATCH
    tasks = [Task(str(i), "1", 1, "add", [i, i], 30.0, f"n{i}") for i in range(6)]
    items = [t.encode() for t in tasks]
    duplicate = tasks[2].encode()
    malformed = b'{"v":2,"task_id":"77","attempt":2,"function":"add","args":"no list"}'
    unreadable = b'{"v":2,"attempt":"x"}'
    broker.deliver(TOPICS.tasks(agent.ref), wrap(TASKS_KEY, [*items[:3], duplicate, malformed, unreadable,
                                                             *items[3:]]), False)
    wait_until(lambda: len(answers(sent)) == 7)
    time.sleep(0.2)  # nothing more may come: the duplicate runs once, the unreadable item gets no answer
    results = answers(sent)
    assert sorted((r.task_id, r.outcome.value) for r in results) == sorted(
        [(str(i), "ok") for i in range(6)] + [("77", "rejected")])
    assert all(r.value == 2 * int(r.task_id) and r.nonce == f"n{r.task_id}" for r in results if r.ok)
    rejected = next(r for r in results if r.task_id == "77")
    assert (rejected.attempt, rejected.error.type) == (2, "MalformedTask")  # type: ignore[union-attr]
    assert agent.counts["duplicates"] == 1 and agent.counts["ok"] == 6 and agent.counts["malformed"] == 2
    assert any(RESULTS_KEY.encode() in payload for payload in sent)  # several results in one message


def test_the_agent_answers_single_tasks_with_single_results(
        memory_agent: tuple[Agent, MemoryBroker, list[bytes]]) -> None:
    # A coordinator that predates batches sends single tasks: it must get single results.
    agent, broker, sent = memory_agent
    for i in range(5):
        broker.deliver(TOPICS.tasks(agent.ref), Task(str(i), "1", 1, "add", [i, 1], 30.0, "n").encode(), False)
    wait_until(lambda: len(sent) == 5)
    assert all(isinstance(read_results(payload), Result) for payload in sent)
