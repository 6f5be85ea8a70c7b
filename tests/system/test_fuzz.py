"""Hostile input: every decoder fuzzed, the engine and the agent fed garbage, and a live
coordinator flooded with 10,000 malformed messages while a real job runs beside them.

The contract everywhere a message is received: a payload is either a complete, valid message
or one DecodeError (InvalidTopic for topics); nothing else escapes, nothing half-valid gets
through, every rejection is counted and the state stays consistent.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dockercomp.agent.agent import Agent
from dockercomp.agent.settings import AgentSettings
from dockercomp.agent.tasks import Registry
from dockercomp.broker.acl import Role
from dockercomp.broker.defaults import MAX_JSON_DEPTH, MAX_PAYLOAD_BYTES, PROTOCOL_VERSION
from dockercomp.broker.errors import DecodeError, InvalidName, InvalidTopic
from dockercomp.broker.memory import MemoryBroker
from dockercomp.broker.messages import (
    OfflineReason,
    Outcome,
    Presence,
    PresenceState,
    Result,
    Task,
    TaskError,
    decode_status,
    encode_status,
    load_object,
    peek_task_id,
)
from dockercomp.broker.topics import WORKER_TOPIC_KINDS, Topics, WorkerRef, validate_name
from dockercomp.coordinator.service import Coordinator, CoordinatorSettings
from dockercomp.coordinator.store import Store, TaskState
from tests.support import wait_until
from tests.support.processes import Processes
from tests.support.security import SecureBroker, connected

TOPICS = Topics()
INT64 = range(-(2**63), 2**63)

# --------------------------------------------------------------------------- strategies
names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}", fullmatch=True)
finite = st.floats(allow_nan=False, allow_infinity=False)
# Any JSON value Python's json module can write, including the NaN/Infinity tokens and
# numbers no 64-bit column holds: what a hostile client can put on the wire.
hostile_scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=2**63, max_value=2**200)
                   | st.floats() | st.text(max_size=40))
hostile_json = st.recursive(hostile_scalars, lambda inner: st.lists(inner, max_size=4)
                            | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=25)
clean_json = st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | finite | st.text(max_size=40),
                          lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                       max_size=4), max_leaves=25)

presences = st.builds(
    Presence, worker=names, volunteer=names, state=st.sampled_from(PresenceState),
    seq=st.integers(0, 2**63 - 1), reason=st.none() | st.sampled_from(OfflineReason),
    host=st.text(max_size=255), container=st.none() | st.text(max_size=128), image=st.none() | st.text(max_size=255),
    version=st.text(max_size=64), cpus=st.integers(0, 2**63 - 1), capacity=st.integers(0, 2**63 - 1),
    functions=st.lists(st.text(min_size=1, max_size=200), max_size=8).map(tuple),
    started=finite)
tasks = st.builds(
    Task, task_id=st.text(min_size=1, max_size=128), job_id=st.text(min_size=1, max_size=128),
    attempt=st.integers(1, 2**63 - 1), function=st.text(min_size=1, max_size=200),
    args=st.lists(clean_json, max_size=5), timeout=st.floats(min_value=1e-6, allow_infinity=False))
errors = st.builds(TaskError, type=st.text(min_size=1, max_size=200), message=st.text(max_size=300),
                   traceback=st.text(max_size=300))
results = st.one_of(
    st.builds(Result, task_id=st.text(min_size=1, max_size=128), attempt=st.integers(1, 2**63 - 1), worker=names,
              volunteer=names, outcome=st.just(Outcome.OK), value=clean_json, error=st.none() | errors,
              elapsed=st.floats(min_value=0, allow_infinity=False)),
    st.builds(Result, task_id=st.text(min_size=1, max_size=128), attempt=st.integers(1, 2**63 - 1), worker=names,
              volunteer=names, outcome=st.sampled_from([o for o in Outcome if o is not Outcome.OK]),
              value=st.none(), error=errors, elapsed=st.floats(min_value=0, allow_infinity=False)))
messages = st.one_of(presences, tasks, results)
DECODERS: list[Callable[[bytes], Any]] = [Presence.decode, Task.decode, Result.decode, decode_status,
                                           lambda p: load_object("fuzz", p)]


def wire(value: Any) -> bytes:
    """JSON as a hostile client may write it: NaN and Infinity tokens included."""
    return json.dumps(value, allow_nan=True).encode()


def as_object(message: Presence | Task | Result) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(message.encode())
    return decoded


# --------------------------------------------------------------------------- what "valid" guarantees
def _json_sane(value: Any, depth: int = 1) -> None:
    assert depth <= MAX_JSON_DEPTH + 1
    if isinstance(value, float):
        assert math.isfinite(value)
    elif isinstance(value, list):
        for item in value:
            _json_sane(item, depth + 1)
    elif isinstance(value, dict):
        for item in value.values():
            _json_sane(item, depth + 1)


def assert_sane(message: Any) -> None:
    """What every component may rely on once decode() returned."""
    assert message.v == PROTOCOL_VERSION
    if isinstance(message, Presence):
        WorkerRef(message.volunteer, message.worker)  # topic-safe names
        assert isinstance(message.state, PresenceState) and message.seq in INT64 and message.seq >= 0
        assert message.reason is None or isinstance(message.reason, OfflineReason)
        assert message.cpus in INT64 and message.capacity in INT64 and min(message.cpus, message.capacity) >= 0
        assert all(isinstance(f, str) and f for f in message.functions)
        assert math.isfinite(message.started)
    elif isinstance(message, Task):
        assert isinstance(message.task_id, str) and 0 < len(message.task_id) <= 128
        assert message.attempt in INT64 and message.attempt >= 1
        assert isinstance(message.args, list)
        _json_sane(message.args)
        assert math.isfinite(message.timeout) and message.timeout > 0
    elif isinstance(message, Result):
        WorkerRef(message.volunteer, message.worker)
        assert message.attempt in INT64 and message.attempt >= 1
        assert isinstance(message.outcome, Outcome)
        assert message.ok or message.error is not None
        _json_sane(message.value)
        assert math.isfinite(message.elapsed) and message.elapsed >= 0
    # Whatever was accepted can be written out again (to the store, to status) as strict JSON.
    if hasattr(message, "encode"):
        message.encode()


def decode_or_reject(decoder: Callable[[bytes], Any], payload: bytes) -> Any:
    try:
        decoded = decoder(payload)
    except DecodeError as exc:
        assert exc.reason and (exc.data is None or len(exc.data) <= 200)
        return None
    assert_sane(decoded) if not isinstance(decoded, dict) else None
    return decoded


# --------------------------------------------------------------------------- the decoders
@settings(max_examples=400)
@given(st.binary(max_size=2048))
def test_any_bytes_are_a_message_or_one_decode_error(payload: bytes) -> None:
    for decoder in DECODERS:
        decode_or_reject(decoder, payload)
    peeked = peek_task_id(payload)
    assert peeked is None or (isinstance(peeked[0], str) and isinstance(peeked[1], int))


@settings(max_examples=400)
@given(hostile_json)
def test_any_json_document_is_a_message_or_one_decode_error(value: Any) -> None:
    for payload in (wire(value), wire({"v": PROTOCOL_VERSION, "x": value})):
        for decoder in DECODERS:
            decode_or_reject(decoder, payload)
        peek_task_id(payload)


@settings(max_examples=300)
@given(messages)
def test_every_valid_message_survives_the_round_trip(message: Presence | Task | Result) -> None:
    decoded = type(message).decode(message.encode())
    assert decoded == message
    assert_sane(decoded)


@settings(max_examples=600)
@given(messages, st.data())
def test_a_valid_message_with_any_field_changed_is_valid_or_rejected(message: Any, data: st.DataObject) -> None:
    obj = as_object(message)
    field = data.draw(st.sampled_from(sorted(obj) + ["extra"]), label="field")
    action = data.draw(st.sampled_from(["replace", "delete"]), label="action")
    if action == "delete":
        obj.pop(field, None)
    else:
        obj[field] = data.draw(hostile_json, label="value")
    decoded = decode_or_reject(type(message).decode, wire(obj))
    if decoded is not None and field not in ("extra", "value", "args"):
        # Accepted: then the field holds a value of the declared kind, never a stray type.
        assert_sane(decoded)


@settings(max_examples=200)
@given(messages, st.sampled_from([Presence, Task, Result]))
def test_a_message_of_one_kind_never_decodes_as_a_wrong_but_valid_other(message: Any, kind: Any) -> None:
    decoded = decode_or_reject(kind.decode, message.encode())
    if decoded is not None:
        assert_sane(decoded)


HOSTILE = [
    b"", b" ", b"\x00" * 64, b"\xff\xfe\xfd", "\ufeff{}".encode(), b"null", b"[]", b"0", b'"v"', b"{",
    b'{"v": 1}', b'{"v": "1"}', b'{"v": 2}', b'{"v": NaN}', b'{"v": 1, "seq": NaN}', b'{"v": 1, "seq": Infinity}',
    b'{"v": 1, "seq": -Infinity}', b'{"v": 1, "seq": 1e999}', b'{"v": 1, "attempt": ' + b"9" * 400 + b"}",
    b'{"v": 1, "attempt": ' + b"9" * 5000 + b"}", b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 40 + b"1" + b"}" * 40,
    b'{"v": 1, "v": 2}', b'{"v": 1, "worker": "a/+/#", "volunteer": "x"}', b'{"v": 1, "worker": "$SYS"}',
    b'{"v": 1, "task_id": "' + b"x" * (MAX_PAYLOAD_BYTES + 10) + b'"}', b"1" * (MAX_PAYLOAD_BYTES + 1),
    b'{"v":1,"task_id":"1","attempt":true,"worker":"w","volunteer":"v","outcome":"ok"}',
    b'{"v":1,"task_id":"1","attempt":1,"worker":"w","volunteer":"v","outcome":"ok","value":[NaN]}',
    b'{"v":1,"task_id":"1","attempt":1,"worker":"w","volunteer":"v","outcome":"error"}',
]


@pytest.mark.parametrize("payload", HOSTILE, ids=lambda p: repr(p[:30]))
def test_known_hostile_payloads_are_rejected_quickly(payload: bytes) -> None:
    started = time.monotonic()
    for decoder in (Presence.decode, Task.decode, Result.decode):
        with pytest.raises(DecodeError):
            decoder(payload)
    peek_task_id(payload)
    assert time.monotonic() - started < 1.0


def test_status_decoding_checks_the_envelope_only() -> None:
    assert decode_status(encode_status({"anything": [1, {"x": None}]}))["anything"] == [1, {"x": None}]
    with pytest.raises(DecodeError):
        decode_status(b'{"v": 1, "rate": NaN}')


# --------------------------------------------------------------------------- names and topics
@settings(max_examples=400)
@given(st.text(max_size=120) | st.lists(st.sampled_from(["dockercomp", "workers", "+", "#", "", "$SYS", "a", "w1",
                                                          *WORKER_TOPIC_KINDS]), max_size=7).map("/".join))
def test_any_topic_is_a_worker_topic_or_invalid_topic(topic: str) -> None:
    try:
        parsed = TOPICS.parse_worker_topic(topic)
    except InvalidTopic:
        return
    assert parsed.kind in WORKER_TOPIC_KINDS
    assert TOPICS.presence(parsed.ref).rsplit("/", 1)[0] == topic.rsplit("/", 1)[0]
    assert not any(c in parsed.ref.key for c in "+#$")


@given(st.text(max_size=80))
def test_any_name_is_topic_safe_or_invalid_name(name: str) -> None:
    try:
        validate_name(name)
    except InvalidName:
        return
    assert "/" not in name and "+" not in name and "#" not in name and not name.startswith("$")


# --------------------------------------------------------------------------- the engine's receive path
@pytest.fixture
def memory_engine(tmp_path: Path) -> Iterator[tuple[Coordinator, MemoryBroker]]:
    broker = MemoryBroker()
    engine = Coordinator(Store.open(str(tmp_path / "fuzz.db")), broker.connect("coordinator"),
                         settings=CoordinatorSettings(connect_timeout=1, status_interval=0.01))
    engine.open()
    yield engine, broker
    engine.close()


worker_topics = st.builds(lambda v, w, kind: f"dockercomp/workers/{v}/{w}/{kind}",
                          st.sampled_from(["lab", "mallory"]), st.sampled_from(["w1", "w2"]),
                          st.sampled_from(["presence", "results"]))
near_payloads = st.one_of(st.binary(max_size=300), hostile_json.map(wire), messages.map(lambda m: m.encode()),
                          st.builds(lambda m, d: wire({**as_object(m), **d}), messages,
                                    st.dictionaries(st.sampled_from(["task_id", "attempt", "worker", "volunteer",
                                                                     "state", "seq", "outcome", "value"]),
                                                    hostile_json, max_size=3)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(worker_topics, near_payloads), min_size=1, max_size=30))
def test_the_engine_survives_any_message_sequence_and_stays_consistent(
        memory_engine: tuple[Coordinator, MemoryBroker], batch: list[tuple[str, bytes]]) -> None:
    engine, broker = memory_engine
    if not engine.store.jobs():
        engine.store.create_job("add", [[1, 2], [3, 4]])
    for topic, payload in batch:
        broker.deliver(topic, payload, False)
    engine.step()  # raises if any message escaped its handler
    # Consistency: the store's task states add up, and done tasks have a value.
    for job in engine.store.jobs():
        progress = engine.store.progress(job)
        assert progress.done + progress.failed + progress.pending + progress.assigned + progress.cancelled \
            == progress.total
        for row in engine.store.results(job):
            assert row.state in {s.value for s in TaskState}


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
    base = {"v": 1, "task_id": "999999999", "attempt": 1, "worker": worker.worker, "volunteer": "mallory",
            "outcome": "ok", "value": 1}
    kind = i % 16
    if i % 1000 == 999:  # a few oversized ones (each crosses the broker: keep the total sane)
        return TOPICS.results(worker), b'{"v":1,"pad":"' + b"x" * (MAX_PAYLOAD_BYTES + 1) + b'"}'
    bodies: dict[int, bytes | dict[str, Any]] = {
        0: b"not json at all",
        1: b"\xff\xfe\x00\x01",
        2: b"[" * 5000 + b"]" * 5000,
        3: wire({**base, "value": math.nan}),
        4: b'{"v":1,"task_id":"1","attempt":1e999,"worker":"m0","volunteer":"mallory","outcome":"ok"}',
        5: {**base, "attempt": 10**30},
        6: {**base, "v": 99},
        7: {**base, "worker": "m+/#"},
        8: {**base, "worker": "w1", "volunteer": "alice"},  # names someone else: mismatch
        9: base,  # an unknown task, from a worker that never registered
        10: {**base, "task_id": job_task_id},  # a real task it was never sent
        11: {"v": 1},
        12: b"[1, 2, 3]",
        13: {**base, "outcome": "error"},  # a failure without its error object
        14: {**base, "value": {"deep": json.loads("[" * 40 + "]" * 40)}},
        15: b"presence",
    }
    body = bodies[kind]
    payload = body if isinstance(body, bytes) else wire(body)
    if kind == 15:  # presence garbage: bad state, bad seq, someone else's name
        payload = wire({"v": 1, "worker": worker.worker, "volunteer": "mallory", "state": "zombie", "seq": -1})
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
