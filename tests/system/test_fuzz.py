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
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dockercomp.agent.agent import Agent
from dockercomp.agent.settings import AgentSettings
from dockercomp.agent.tasks import Registry
from dockercomp.broker.acl import Role
from dockercomp.broker.defaults import MAX_PAYLOAD_BYTES, PROTOCOL_VERSION
from dockercomp.broker.errors import DecodeError
from dockercomp.broker.memory import MemoryBroker
from dockercomp.broker.messages import Presence, Result, Task, decode_status
from dockercomp.broker.topics import Topics, WorkerRef
from tests.support import wait_until
from tests.support.hostile import assert_sane, near_payloads, wire
from tests.support.processes import Processes
from tests.support.security import SecureBroker, connected

TOPICS = Topics()




# --------------------------------------------------------------------------- the agent's receive path
@pytest.fixture
def memory_agent(tmp_path: Path) -> Iterator[tuple[Agent, MemoryBroker, list[bytes]]]:
    broker = MemoryBroker()
    agent_settings = AgentSettings.from_options("mqtt://memory", worker_id="f1", volunteer="lab", concurrency=1,
                                                health_file=str(tmp_path / "h.json"), host="t", container=None,
                                                environ={})
    answers: list[bytes] = []
    observer = broker.connect("observer")
    observer.on_message = lambda topic, payload, retained: answers.append(payload)
    observer.subscribe(TOPICS.results(agent_settings.worker))
    observer.start()
    agent = Agent(agent_settings, Registry.load(), transport=broker.connect(agent_settings.client_id))
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    wait_until(lambda: broker.retained.get(TOPICS.presence(agent_settings.worker)))
    yield agent, broker, answers
    agent.stop(now=True)
    thread.join(10)


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
