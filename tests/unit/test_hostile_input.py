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
    Presence,
    Result,
    Task,
    decode_status,
    encode_status,
    load_object,
    peek_task_id,
)
from dockercomp.broker.topics import WORKER_TOPIC_KINDS, Topics
from dockercomp.coordinator.service import Coordinator, CoordinatorSettings
from dockercomp.coordinator.store import Store, TaskState
from tests.support.hostile import as_object, assert_sane, hostile_json, messages, near_payloads, wire

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
