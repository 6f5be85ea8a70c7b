"""Hostile input, in process: every decoder fuzzed, names and topics fuzzed, and the engine's
receive path (over the in-memory broker) fed garbage.

The contract everywhere a message is received: a payload is either a complete, valid message
or one DecodeError (InvalidTopic for topics); nothing else escapes, nothing half-valid gets
through, every rejection is counted and the state stays consistent. The agent fed garbage and a
live coordinator under a flood are in tests/system/test_fuzz.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dockercomp.broker.defaults import MAX_PAYLOAD_BYTES, PROTOCOL_VERSION
from dockercomp.broker.errors import DecodeError, InvalidTopic
from dockercomp.broker.memory import MemoryBroker
from dockercomp.broker.messages import (
    OfflineReason,
    Presence,
    PresenceState,
    Result,
    Task,
    decode_status,
    encode_status,
    load_object,
    peek_task_id,
)
from dockercomp.broker.topics import WORKER_TOPIC_KINDS, Topics, WorkerRef
from dockercomp.coordinator import defaults
from dockercomp.coordinator.errors import SettingsError
from dockercomp.coordinator.registry import Caps, WorkerRegistry
from dockercomp.coordinator.service import Coordinator, CoordinatorSettings
from dockercomp.coordinator.status import worker_status
from dockercomp.coordinator.store import Store, TaskState
from tests.support.hostile import as_object, assert_int64, assert_sane, hostile_json, messages, near_payloads, wire
from tests.support.rules import Rules

TOPICS = Topics()

DECODERS: list[Callable[[bytes], Any]] = [Presence.decode, Task.decode, Result.decode, decode_status,
                                           lambda p: load_object("fuzz", p)]


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


# "%d" stands for the current protocol version: these fail on their content, not their envelope.
HOSTILE = [payload.replace(b"%d", b"%d" % PROTOCOL_VERSION) for payload in [
    b"", b" ", b"\x00" * 64, b"\xff\xfe\xfd", "\ufeff{}".encode(), b"null", b"[]", b"0", b'"v"', b"{",
    b'{"v": 1}', b'{"v": "1"}', b'{"v": 2}', b'{"v": NaN}', b'{"v": %d, "seq": NaN}', b'{"v": %d, "seq": Infinity}',
    b'{"v": %d, "seq": -Infinity}', b'{"v": %d, "seq": 1e999}', b'{"v": %d, "attempt": ' + b"9" * 400 + b"}",
    b'{"v": %d, "attempt": ' + b"9" * 5000 + b"}", b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 40 + b"1" + b"}" * 40,
    b'{"v": %d, "v": 1}', b'{"v": %d, "worker": "a/+/#", "volunteer": "x"}', b'{"v": %d, "worker": "$SYS"}',
    b'{"v": %d, "task_id": "' + b"x" * (MAX_PAYLOAD_BYTES + 10) + b'"}', b"1" * (MAX_PAYLOAD_BYTES + 1),
    b'{"v":%d,"task_id":"1","attempt":true,"worker":"w","volunteer":"v","outcome":"ok"}',
    b'{"v":%d,"task_id":"1","attempt":1,"worker":"w","volunteer":"v","outcome":"ok","value":[NaN]}',
    b'{"v":%d,"task_id":"1","attempt":1,"worker":"w","volunteer":"v","outcome":"error"}',
    b'{"v":%d,"task_id":"","job_id":"1","attempt":1,"function":"f","worker":"w","volunteer":"v","outcome":"ok"}',
]]


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


# --------------------------------------------------------------------------- hostile presence: the caps
INT64_MAX = 2**63 - 1


def _online(worker: str, volunteer: str, seq: int = 1, **numbers: int) -> Presence:
    return Presence(worker=worker, volunteer=volunteer, state=PresenceState.ONLINE, seq=seq,
                    functions=("add",), **numbers)


def test_a_worker_gets_what_the_caps_grant_whatever_it_announces() -> None:
    rules = Rules()
    rules.workers.caps = Caps(capacity=8, prefetch=4, volunteer_capacity=12, volunteer_prefetch=5)
    apply = rules.workers.apply
    greedy, _ = apply(WorkerRef("mallory", "m1"), _online("m1", "mallory", capacity=INT64_MAX, prefetch=INT64_MAX,
                                                          cpus=INT64_MAX), rules.now)
    assert (greedy.capacity, greedy.prefetch, greedy.asked) == (8, 4, (INT64_MAX, INT64_MAX))
    # A second worker of the same volunteer gets what is left of the volunteer's share ...
    second, _ = apply(WorkerRef("mallory", "m2"), _online("m2", "mallory", capacity=2**62, prefetch=2**62), rules.now)
    assert (second.capacity, second.prefetch) == (4, 1)
    # ... a third nothing (it gets no work) ...
    third, _ = apply(WorkerRef("mallory", "m3"), _online("m3", "mallory", capacity=2**62), rules.now)
    assert third.capacity == 0 and third not in rules.workers.dispatchable()
    # ... and another volunteer is not affected.
    honest, _ = apply(WorkerRef("alice", "a1"), _online("a1", "alice", capacity=2, prefetch=1), rules.now)
    assert (honest.capacity, honest.prefetch) == (2, 1)
    # What is stored is what was granted (and fits every column).
    stored = {row.key: (row.capacity, row.prefetch, row.cpus) for row in rules.store.workers()}
    assert stored == {"mallory/m1": (8, 4, 65_536), "mallory/m2": (4, 1, 0), "mallory/m3": (0, 0, 0),
                      "alice/a1": (2, 1, 0)}
    # When the first one leaves, its share goes to the others, up to what they asked.
    apply(WorkerRef("mallory", "m1"), Presence("m1", "mallory", PresenceState.OFFLINE, 1, OfflineReason.LOST),
          rules.now)
    assert [(w.capacity, w.prefetch) for w in (second, third)] == [(8, 4), (4, 0)]
    assert sum(w.limit for w in rules.workers.dispatchable() if w.ref.volunteer == "mallory") <= 12 + 5


def test_caps_lowered_since_the_rows_were_written_apply_on_load() -> None:
    rules = Rules()
    for name in ("w1", "w2"):
        rules.workers.apply(WorkerRef("lab", name), _online(name, "lab", capacity=300, prefetch=300), rules.now)
    again = WorkerRegistry(rules.store, rules.topics, Caps(capacity=100, prefetch=10, volunteer_capacity=150))
    again.load()
    assert [(w.capacity, w.prefetch) for w in again] == [(100, 10), (50, 10)]


@pytest.mark.parametrize("capacities", [[INT64_MAX], [2**62, 2**62], [INT64_MAX, 1], [2**40] * 5])
def test_a_hostile_capacity_cannot_crash_the_engine_on_sqlite(memory_engine: tuple[Coordinator, MemoryBroker],
                                                              capacities: list[int]) -> None:
    # The field report: free capacity was summed and bound as a SQL LIMIT; SQLite raised
    # OverflowError and `serve` exited, at every restart, as the presence is retained.
    engine, broker = memory_engine
    job = engine.store.create_job("add", [[i, i] for i in range(20)])
    for i, capacity in enumerate(capacities):
        ref = WorkerRef("mallory", f"m{i}")
        broker.deliver(TOPICS.presence(ref), _online(ref.worker, "mallory", capacity=capacity, prefetch=INT64_MAX,
                                                     cpus=INT64_MAX, seq=INT64_MAX).encode(), True)
    engine.step()
    engine.step()  # the dispatch round after the presences
    assert engine.store.progress(job).assigned == 20
    summary = engine.summary()
    assert 0 < summary["capacity"] <= defaults.MAX_VOLUNTEER_CAPACITY
    # Every number the status publishes is one the decoders accept (64-bit).
    assert_int64(summary)
    for slot in engine.workers:
        assert_int64(worker_status(slot, engine.leases.count(slot.id), engine.clock()))


@pytest.mark.parametrize(("name", "value"), [("max_capacity", 0), ("max_capacity", 10**7), ("max_prefetch", -1),
                                             ("volunteer_max_capacity", 2**63), ("volunteer_max_prefetch", 1.5),
                                             ("max_capacity", True)])
def test_the_caps_are_whole_numbers_within_what_the_database_holds(name: str, value: Any) -> None:
    with pytest.raises(SettingsError, match=name.replace("_", "-")):
        CoordinatorSettings(**{name: value})


def test_serve_takes_the_caps_as_options() -> None:
    from click.testing import CliRunner

    from dockercomp.coordinator.cli import serve
    text = CliRunner().invoke(serve, ["--help"], terminal_width=200).output
    for option, default in (("--max-capacity", 512), ("--max-prefetch", 1000), ("--volunteer-max-capacity", 4096),
                            ("--volunteer-max-prefetch", 8192)):
        assert option in text and f"[default: {default}]" in text
    refused = CliRunner().invoke(serve, ["--max-capacity", "0", "--db", "unused.db"])
    assert refused.exit_code == 2 and "max-capacity must be a whole number" in refused.output
