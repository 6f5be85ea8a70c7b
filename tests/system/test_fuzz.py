"""Hostile input against running parts: the agent (with its task processes) fed garbage, and a
live coordinator flooded with 10,000 malformed messages while a real job runs beside them.

The contract everywhere a message is received: a payload is either a complete, valid message
or one DecodeError; nothing else escapes, every rejection is counted and the state stays
consistent. The decoders and the engine's receive path are fuzzed in process in
tests/unit/test_hostile_input.py.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dockercomp.agent.agent import Agent
from dockercomp.broker.acl import Role
from dockercomp.broker.defaults import MAX_PAYLOAD_BYTES, PROTOCOL_VERSION
from dockercomp.broker.errors import DecodeError
from dockercomp.broker.memory import MemoryBroker
from dockercomp.broker.messages import Outcome, Presence, PresenceState, Result, Task, decode_status
from dockercomp.coordinator.service import Coordinator
from dockercomp.coordinator.settings import CoordinatorSettings
from dockercomp.coordinator.store import Store
from dockercomp.broker.topics import Topics, WorkerRef
from tests.support import wait_until
from tests.support.agents import memory_agent_running
from tests.support.hostile import assert_int64, assert_sane, near_payloads, wire
from tests.support.processes import Processes
from tests.support.security import SecureBroker, connected

TOPICS = Topics()




# --------------------------------------------------------------------------- the agent's receive path
@pytest.fixture
def memory_agent(tmp_path: Path) -> Iterator[tuple[Agent, MemoryBroker, list[bytes]]]:
    with memory_agent_running(tmp_path, "f1", concurrency=1) as running:
        yield running


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(near_payloads, min_size=1, max_size=10))
def test_the_agent_survives_any_task_payload_and_still_works(
        memory_agent: tuple[Agent, MemoryBroker, list[bytes]], payloads: list[bytes]) -> None:
    _agent, broker, answers = memory_agent
    topic = TOPICS.tasks(WorkerRef("lab", "f1"))
    for payload in payloads:
        broker.deliver(topic, payload, False)
    # Still alive and working: a good task gets its result.
    marker = f"probe-{time.monotonic_ns()}"
    broker.deliver(topic, Task(marker, "1", 1, "add", [2, 3]).encode(), False)
    found = wait_until(lambda: [r for r in map(Result.decode, answers) if r.task_id == marker], timeout=10)
    assert found[0].ok and found[0].value == 5
    for answer in answers:
        assert_sane(Result.decode(answer))  # every answer the agent wrote is itself valid


# --------------------------------------------------------------------------- a live coordinator under fire
FLOOD = 10_000
JOB_TASKS = 200


def malformed(i: int, job_task_id: str) -> tuple[str, bytes]:
    """The i-th message of the flood: every one is something the coordinator must reject."""
    worker = WorkerRef("mallory", f"m{i % 7}")
    base = {"v": PROTOCOL_VERSION, "task_id": "999999999", "attempt": 1, "worker": worker.worker, "volunteer": "mallory",
            "outcome": "ok", "value": 1}
    kind = i % 16
    if i % 1000 == 999:  # a few oversized ones (each crosses the broker: keep the total sane)
        return TOPICS.results(worker), b'{"v":%d,"pad":"' % PROTOCOL_VERSION + b"x" * (MAX_PAYLOAD_BYTES + 1) + b'"}'
    bodies: dict[int, bytes | dict[str, Any]] = {
        0: b"not json at all",
        1: b"\xff\xfe\x00\x01",
        2: b"[" * 5000 + b"]" * 5000,
        3: wire({**base, "value": math.nan}),
        4: b'{"v":%d,"task_id":"1","attempt":1e999,"worker":"m0","volunteer":"mallory","outcome":"ok"}'
           % PROTOCOL_VERSION,
        5: {**base, "attempt": 10**30},
        6: {**base, "v": 99},
        7: {**base, "worker": "m+/#"},
        8: {**base, "worker": "w1", "volunteer": "alice"},  # names someone else: mismatch
        9: base,  # an unknown task, from a worker that never registered
        10: {**base, "task_id": job_task_id},  # a real task it was never sent
        11: {"v": PROTOCOL_VERSION},
        12: b"[1, 2, 3]",
        13: {**base, "outcome": "error"},  # a failure without its error object
        14: {**base, "value": {"deep": json.loads("[" * 40 + "]" * 40)}},
        15: b"presence",
    }
    body = bodies[kind]
    payload = body if isinstance(body, bytes) else wire(body)
    if kind == 15:  # presence garbage: bad state, bad seq, someone else's name
        payload = wire({"v": PROTOCOL_VERSION, "worker": worker.worker, "volunteer": "mallory", "state": "zombie", "seq": -1})
        return TOPICS.presence(worker), payload
    return TOPICS.results(worker), payload


@pytest.mark.timeout(180)
def test_a_live_coordinator_flooded_with_10000_malformed_messages_stays_responsive(
        secure_mosquitto: SecureBroker, tmp_path: Path) -> None:
    broker = secure_mosquitto
    alice, mallory, watcher = broker.add("alice"), broker.add("mallory"), broker.add("dash", Role.OBSERVER)
    db = str(tmp_path / "coordinator.db")
    # No --broker: the password travels in the environment, not on a command line others can read.
    procs = Processes(None, tmp_path / "logs")
    summaries: list[tuple[float, dict[str, Any]]] = []
    try:
        procs.start("serve", ["dockercomp.coordinator", "serve", "--db", db, "--lease-margin", "30"],
                    env={"DOCKERCOMP_BROKER": broker.url(broker.coordinator)})
        procs.start("agent", ["dockercomp.agent.cli", "run", "--worker-id", "w1", "--concurrency", "2", "--keepalive", "5",
                              "--health-file", str(tmp_path / "agent.health")], env={"DOCKERCOMP_BROKER": broker.url(alice)})
        inputs = tmp_path / "tasks.jsonl"
        inputs.write_text("".join(f"[{i}, {i}]\n" for i in range(JOB_TASKS)))
        with connected(broker.url(watcher), "dash", TOPICS.status_summary) as dash:
            dash.connection.on_message = lambda topic, payload, retained: summaries.append(
                (time.monotonic(), decode_status(payload)))
            wait_until(lambda: summaries and summaries[-1][1]["workers"]["online"] == 1, timeout=30)

            # When: a job is submitted, and mallory floods the coordinator at the same time.
            job = json.loads(procs.cli("submit", "add", str(inputs), "--db", db, "--json", "--job", "sums"))
            first_task = str(job["job_id"])  # ids start at 1 in a fresh database; any real id will do
            flood_started = time.monotonic()
            with connected(broker.url(mallory), "mallory/m0") as attacker:
                for i in range(FLOOD):
                    attacker.connection.publish(*malformed(i, first_task))
                assert attacker.connection.flush(60)
            flood_sent = time.monotonic()

            # Then: every malformed message is counted in the status summary ...
            def rejected() -> int:
                return sum(summaries[-1][1]["rejected"].values()) if summaries else 0
            wait_until(lambda: rejected() >= FLOOD, timeout=60)
            # ... the coordinator kept publishing status throughout (it was never stuck) ...
            during = [at for at, _ in summaries if flood_started <= at <= flood_sent + 2]
            gaps = [b - a for a, b in zip([flood_started, *during], [*during, flood_sent + 2])]
            assert max(gaps) < 5, gaps
            # ... and the job completes.
            wait_until(lambda: summaries[-1][1]["tasks"]["done"] == JOB_TASKS, timeout=60)
            final = summaries[-1][1]
        rows = [json.loads(line) for line in procs.cli("results", "sums", "--db", db, "--json").splitlines()]
        assert [row["value"] for row in rows] == [2 * i for i in range(JOB_TASKS)]
        assert {row["worker"] for row in rows} == {"alice/w1"}
        assert sum(final["rejected"].values()) == FLOOD, final["rejected"]
        assert final["rejected"]["malformed"] > FLOOD // 2 and final["rejected"]["mismatch"] > 0
        assert final["workers"]["online"] == 1  # mallory's garbage registered no worker
        # Rejections are logged, but rate-limited: not 10,000 lines.
        serve_log = procs.log("serve")
        assert serve_log.count("ignored ") < 200, serve_log[-3000:]
    finally:
        procs.stop_all()


def test_the_flood_mix_is_all_rejected_by_the_decoders() -> None:
    # The live test counts on each flood message being a rejection; the decoders agree.
    for i in range(64):
        topic, payload = malformed(i, "1")
        decoder = Presence.decode if topic.endswith("/presence") else Result.decode
        try:
            message = decoder(payload)
        except DecodeError:
            continue
        # Decodable ones are rejected by the engine for what they claim, not how they look.
        assert isinstance(message, Result) and (message.volunteer != "mallory" or message.task_id in ("1", "999999999"))


# --------------------------------------------------------------------------- the extremes of every number
# Integers a hostile client may write: JSON has no bounds; the decoders take 64-bit signed ones.
INT_EXTREMES = [0, 1, 2**31 - 1, 2**31, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 10**30, -1, -(2**63)]
FLOAT_EXTREMES = [0.0, 5e-324, 1e-300, 1.7976931348623157e308, -1.0, -1.7976931348623157e308, math.nan, math.inf,
                  -math.inf]
PRESENCE_NUMBERS = {"seq": INT_EXTREMES, "cpus": INT_EXTREMES, "capacity": INT_EXTREMES,
                    "prefetch": INT_EXTREMES, "started": FLOAT_EXTREMES + INT_EXTREMES}
EXTREME_JOB = 20


def extreme_presences() -> list[tuple[WorkerRef, bytes, bool]]:
    """(worker, payload, decodable) for each extreme of each numeric presence field, each for a
    worker of its own (no presence is stale against another); every one offers `add`."""
    base = Presence("x", "mallory", PresenceState.ONLINE, seq=1, capacity=2, prefetch=1, cpus=4, functions=("add",),
                    started=1.0)
    out = []
    for name, values in PRESENCE_NUMBERS.items():
        for i, value in enumerate(values):
            ref = WorkerRef("mallory", f"{name}-{i}")
            body = {**json.loads(base.encode()), "worker": ref.worker, name: value}
            try:
                Presence.decode(wire(body))
                decodable = True
            except DecodeError:
                decodable = False
            out.append((ref, wire(body), decodable))
    return out


def extreme_tasks() -> list[bytes]:
    """Tasks with the extremes of attempt and timeout (ids the coordinator never made): what a
    coordinator bug or a compromised coordinator account could send an agent."""
    base = json.loads(Task("x", "1", 1, "add", [1, 2], 60.0, nonce="n" * 22).encode())
    bodies = [{**base, "task_id": f"x-attempt-{i}", "attempt": value} for i, value in enumerate(INT_EXTREMES)]
    bodies += [{**base, "task_id": f"x-timeout-{i}", "timeout": value}
               for i, value in enumerate(FLOAT_EXTREMES + INT_EXTREMES)]
    return [wire(body) for body in bodies]


def extreme_results(task_ids: list[int]) -> list[bytes]:
    """Results no coordinator may accept: extremes of attempt, elapsed and task id, on real tasks."""
    first = str(task_ids[0])
    base = {"v": PROTOCOL_VERSION, "task_id": first, "attempt": 1, "worker": "capacity-0", "volunteer": "mallory",
            "outcome": "ok", "value": 1, "elapsed": 0.1, "nonce": "A" * 22}
    bodies = [{**base, "attempt": value} for value in INT_EXTREMES]
    bodies += [{**base, "elapsed": value} for value in FLOAT_EXTREMES + INT_EXTREMES]
    bodies += [{**base, "task_id": value} for value in ("0", "-1", "9" * 18, "9" * 19, "9" * 400, str(2**63))]
    bodies += [{**base, "task_id": str(task_id), "attempt": 2**63 - 1} for task_id in task_ids]
    return [wire(body) for body in bodies]


@pytest.mark.timeout(180)
def test_the_extremes_of_every_numeric_field_leave_the_coordinator_running_and_right(
        secure_mosquitto: SecureBroker, tmp_path: Path) -> None:
    broker = secure_mosquitto
    alice, mallory, watcher = broker.add("alice"), broker.add("mallory"), broker.add("dash", Role.OBSERVER)
    alice_ref = WorkerRef("alice", "w1")
    db = str(tmp_path / "coordinator.db")
    procs = Processes(None, tmp_path / "logs")
    serve_env = {"DOCKERCOMP_BROKER": broker.url(broker.coordinator)}
    summaries: list[dict[str, Any]] = []
    presences = extreme_presences()
    accepted = [ref for ref, _, ok in presences if ok]
    assert len(accepted) >= 20 and len(presences) - len(accepted) >= 15

    def serving() -> bool:
        if procs.running["serve"].poll() is not None:
            pytest.fail(f"coordinator serve exited:\n{procs.log('serve')[-2000:]}")
        return True

    try:
        procs.start("serve", ["dockercomp.coordinator", "serve", "--db", db], env=serve_env)
        procs.start("agent", ["dockercomp.agent.cli", "run", "--worker-id", "w1", "--concurrency", "2",
                              "--keepalive", "5", "--health-file", str(tmp_path / "agent.health")],
                    env={"DOCKERCOMP_BROKER": broker.url(alice)})
        with connected(broker.url(watcher), "dash", TOPICS.status_summary) as dash, \
                connected(broker.url(mallory), "mallory/x", "dockercomp/workers/mallory/+/tasks") as attacker:
            dash.connection.on_message = lambda topic, payload, retained: summaries.append(decode_status(payload))
            wait_until(lambda: serving() and summaries and summaries[-1]["workers"]["online"] == 1, timeout=30)

            # Given: mallory's presences, retained, with every extreme of every number ...
            for ref, payload, _ in presences:
                attacker.connection.publish(TOPICS.presence(ref), payload, qos=1, retain=True)
            assert attacker.connection.flush(10)
            # (her workers with capacity answer what they are sent: right value, right nonce, but
            # elapsed at its extremes; accepted, as nothing says how long a task really took)
            answered: set[bytes] = set()

            def answer_mallorys_tasks() -> None:
                for topic, payload in list(attacker.received):
                    if payload in answered:
                        continue
                    answered.add(payload)
                    task = Task.decode(payload)
                    ref = TOPICS.parse_worker_topic(topic).ref
                    elapsed = [0.0, 5e-324, 1.7976931348623157e308][len(answered) % 3]
                    attacker.connection.publish(TOPICS.results(ref), Result(
                        task.task_id, task.attempt, ref.worker, ref.volunteer, Outcome.OK, sum(task.args),
                        elapsed=elapsed, nonce=task.nonce).encode(), qos=1)

            wait_until(lambda: serving() and summaries[-1]["workers"]["online"] == 1 + len(accepted), timeout=30)
            # ... which no longer stop `serve`, not even at a restart, when they are read again.
            procs.running["serve"].terminate()
            assert procs.running["serve"].wait(30) == 0
            summaries.clear()
            procs.start("serve", ["dockercomp.coordinator", "serve", "--db", db], env=serve_env)
            wait_until(lambda: serving() and summaries and summaries[-1]["workers"]["online"] == 1 + len(accepted)
                       and summaries[-1]["rejected"]["malformed"] == len(presences) - len(accepted), timeout=30)

            # The agent, sent tasks with the extremes of attempt and timeout, answers what it can
            # read (each answer is rejected by the coordinator: no such task) and keeps serving.
            with connected(broker.url(broker.coordinator), "coordinator-probe", TOPICS.results(alice_ref)) as probe:
                for payload in extreme_tasks():
                    probe.connection.publish(TOPICS.tasks(alice_ref), payload, qos=1)
                def agent_answers() -> int:
                    return sum(b'"task_id":"x-' in payload for _, payload in probe.received)
                wait_until(lambda: agent_answers() >= 10, timeout=30)
                time.sleep(1.5)  # the tiny timeouts' answers, and nothing more, arrive
                answers = agent_answers()
            assert procs.running["agent"].poll() is None, procs.log("agent")[-3000:]

            # When: a job runs, and mallory sends results with the extremes of every number.
            inputs = tmp_path / "tasks.jsonl"
            inputs.write_text("".join(f"[{i}, {i}]\n" for i in range(EXTREME_JOB)))
            procs.cli("submit", "add", str(inputs), "--db", db, "--job", "extremes", env=serve_env)
            bad = extreme_results(list(range(1, EXTREME_JOB + 1)))
            for payload in bad:
                attacker.connection.publish(TOPICS.results(WorkerRef("mallory", "capacity-0")), payload, qos=1)

            def done() -> bool:
                serving()
                answer_mallorys_tasks()
                return bool(summaries) and summaries[-1]["tasks"]["done"] == EXTREME_JOB
            wait_until(done, timeout=60)
            assert procs.running["serve"].poll() is None, procs.log("serve")[-3000:]
            final = summaries[-1]

        # Then: every value is right, every bad message was counted, and everything the status
        # published is within what its decoders accept, capacity within the caps.
        rows = [json.loads(line) for line in procs.cli("results", "extremes", "--db", db, "--json").splitlines()]
        assert [row["value"] for row in rows] == [2 * i for i in range(EXTREME_JOB)]
        assert sum(final["rejected"].values()) == len(presences) - len(accepted) + len(bad) + answers, \
            final["rejected"]
        for summary in summaries:
            assert_int64(summary)
            assert summary["capacity"] <= 2 + CoordinatorSettings().volunteer_max_capacity
        workers = json.loads(procs.cli("workers", "--db", db, "--json"))
        assert max(w["capacity"] for w in workers) <= CoordinatorSettings().max_capacity
        assert sum(w["capacity"] for w in workers if w["volunteer"] == "mallory") \
            <= CoordinatorSettings().volunteer_max_capacity
        assert "Traceback" not in procs.log("serve")
    finally:
        procs.stop_all()


@pytest.mark.postgres
@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_every_decodable_extreme_presence_is_stored_on_each_database(kind: str, tmp_path: Path,
                                                                    request: pytest.FixtureRequest) -> None:
    # PostgreSQL's integer columns are 32-bit where SQLite's are 64: what the caps grant and the
    # cpus a presence reports must fit both, and a job still runs on what was granted.
    url = str(tmp_path / "c.db") if kind == "sqlite" else request.getfixturevalue("postgres_db")
    broker = MemoryBroker()
    engine = Coordinator(Store.open(url), broker.connect("coordinator"),
                         settings=CoordinatorSettings(connect_timeout=1, status_interval=0.01))
    engine.open()
    try:
        job = engine.store.create_job("add", [[i, i] for i in range(EXTREME_JOB)])
        decodable = [(ref, payload) for ref, payload, ok in extreme_presences() if ok]
        for ref, payload in decodable:
            broker.deliver(TOPICS.presence(ref), payload, True)
        engine.step()
        engine.step()
        assert len(engine.store.workers()) == len(decodable)  # (a step that failed would have raised)
        assert engine.store.progress(job).assigned == EXTREME_JOB
        assert_int64(engine.summary())
    finally:
        engine.close()
