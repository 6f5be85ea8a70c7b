"""Wire messages: what goes out comes back equal, and bad payloads only ever raise DecodeError."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dockercomp.broker.defaults import MAX_JSON_DEPTH, MAX_PAYLOAD_BYTES, PROTOCOL_VERSION
from dockercomp.broker.errors import DecodeError
from dockercomp.broker.messages import (
    OfflineReason,
    Outcome,
    Presence,
    PresenceState,
    Result,
    Task,
    TaskError,
    _dump,
    decode_status,
    encode_status,
    json_depth,
    peek_task_id,
)
from dockercomp.coordinator.leases import PayloadBuilder, new_nonces

pytestmark = pytest.mark.timeout(120)

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ONLINE = Presence(
    worker="w1", volunteer="alice", state=PresenceState.ONLINE, seq=1_700_000_000_000_001, host="laptop",
    container="3f2a9c1b7d0e", image="dockercomp/worker:0.1", version="0.1.0", cpus=8, capacity=4,
    functions=("add", "sleep"), started=1_700_000_000.5,
)
TASK = Task(task_id="42", job_id="7", attempt=2, function="count_primes", args=[0, 1000], timeout=30.0)
ERROR_RESULT = Result(
    task_id="42", attempt=2, worker="w1", volunteer="alice", outcome=Outcome.ERROR,
    error=TaskError("ZeroDivisionError", "division by zero", "Traceback ..."), elapsed=0.25,
)


def obj(message: Any) -> dict[str, Any]:
    return json.loads(message.encode())


def payload(base: Any, **changes: Any) -> bytes:
    """``base`` encoded, with fields changed (a value of ... deletes the field)."""
    data = obj(base)
    for key, value in changes.items():
        if value is ...:
            data.pop(key, None)
        else:
            data[key] = value
    return json.dumps(data).encode()


# --- round trips -----------------------------------------------------------------------------


def test_presence_round_trip_keeps_every_field() -> None:
    assert Presence.decode(ONLINE.encode()) == ONLINE
    offline = Presence("w1", "alice", PresenceState.OFFLINE, 9, reason=OfflineReason.LOST)
    assert Presence.decode(offline.encode()) == offline


def test_the_heartbeat_interval_is_optional_and_round_trips() -> None:
    beating = Presence("w1", "alice", PresenceState.ONLINE, 9, capacity=2, heartbeat=2.5)
    assert Presence.decode(beating.encode()) == beating
    older = json.loads(beating.encode())
    del older["heartbeat"]  # an agent from before the heartbeat: it announces none
    assert Presence.decode(json.dumps(older).encode()).heartbeat == 0.0
    assert Presence.decode(payload(ONLINE, heartbeat=3600)).heartbeat == 3600.0


def test_task_round_trip() -> None:
    assert Task.decode(TASK.encode()) == TASK


# --- attempt nonces ---------------------------------------------------------------------------------
def test_the_nonce_travels_in_the_task_and_back_in_its_result() -> None:
    task = Task(task_id="42", job_id="7", attempt=2, function="add", args=[1, 2], nonce="s3cr3t-nonce_AAAAAAAAAA")
    assert Task.decode(task.encode()).nonce == "s3cr3t-nonce_AAAAAAAAAA"
    for outcome, error in ((Outcome.OK, None), (Outcome.ERROR, TaskError("E", "m"))):
        result = Result("42", 2, "w1", "alice", outcome, value=3 if error is None else None, error=error,
                        nonce=task.nonce)
        assert Result.decode(result.encode()) == result


def test_a_missing_nonce_decodes_as_empty_and_matches_no_attempt() -> None:
    assert Task.decode(payload(TASK, nonce=...)).nonce == ""
    assert Result.decode(payload(ERROR_RESULT, nonce=...)).nonce == ""
    ok = Result("42", 1, "w1", "alice", Outcome.OK, value=1)
    assert Result.decode(payload(ok, nonce=...)).nonce == ""


@pytest.mark.parametrize("bad", [7, True, ["x"], {"n": 1}, "x" * 65])
def test_a_nonce_that_is_not_a_short_string_is_rejected(bad: Any) -> None:
    ok = Result("42", 1, "w1", "alice", Outcome.OK, value=1)
    for message in (TASK, ERROR_RESULT, ok):
        with pytest.raises(DecodeError, match="nonce"):
            type(message).decode(payload(message, nonce=bad))


def test_the_coordinators_task_payload_is_what_task_encode_writes() -> None:
    # The engine writes task messages from stored JSON without encoding (PayloadBuilder): the
    # bytes must be exactly a Task's, nonce included, or agents would decode something else.
    nonce = new_nonces(1)[0]
    built = PayloadBuilder(PROTOCOL_VERSION).build(42, 7, 3, "count_primes", "[0, 1000]", 30.0, nonce)
    assert built == Task("42", "7", 3, "count_primes", [0, 1000], 30.0, nonce=nonce).encode().replace(
        b"[0,1000]", b"[0, 1000]")
    assert Task.decode(built).nonce == nonce and len(nonce) >= 22


def test_deterministic_failures_are_the_tasks_own() -> None:
    def result(outcome: Outcome, kind: str) -> Result:
        return Result("1", 1, "w", "v", outcome, error=TaskError(kind, "m"))
    assert result(Outcome.REJECTED, "BadArguments").deterministic
    assert result(Outcome.ERROR, "ResultTooLarge").deterministic
    assert result(Outcome.ERROR, "UnserializableResult").deterministic
    assert not result(Outcome.REJECTED, "UnknownFunction").deterministic
    assert not result(Outcome.ERROR, "BadArguments").deterministic
    assert not result(Outcome.CRASHED, "ResultTooLarge").deterministic


def test_results_round_trip_for_a_value_and_for_an_error() -> None:
    ok = Result("42", 1, "w1", "alice", Outcome.OK, value={"data": [1, 2.5, None, "x"]}, elapsed=1.5)
    assert Result.decode(ok.encode()) == ok
    assert Result.decode(ERROR_RESULT.encode()) == ERROR_RESULT
    assert ok.ok and not ERROR_RESULT.ok


def test_every_payload_carries_the_protocol_version() -> None:
    for message in (ONLINE, TASK, ERROR_RESULT):
        assert obj(message)["v"] == PROTOCOL_VERSION
    assert json.loads(encode_status({"done": 3}))["v"] == PROTOCOL_VERSION


def test_status_round_trip_checks_only_the_envelope() -> None:
    assert decode_status(encode_status({"done": 3, "jobs": {"7": "active"}})) == {
        "v": PROTOCOL_VERSION, "done": 3, "jobs": {"7": "active"}}


def test_optional_task_fields_have_documented_defaults() -> None:
    task = Task.decode(b'{"v":%d,"task_id":"1","job_id":"1","attempt":1,"function":"noop"}' % PROTOCOL_VERSION)
    assert task.args == [] and task.timeout == 60.0


def test_decode_accepts_str_as_well_as_bytes() -> None:
    assert Task.decode(TASK.encode().decode()) == TASK


# --- strict rejections -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, reason",
    [
        (b"", "empty payload"),
        (b"not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"v": 1, "x": NaN}', "not valid JSON"),
        (b'{"v": 1, "x": 1e999}', "not valid JSON"),
        (b'{"task_id": "1"}', "unsupported protocol version None"),
        (b'{"v": 1, "task_id": "1"}', "unsupported protocol version 1"),
        (b'{"v": 3, "task_id": "1"}', "unsupported protocol version 3"),
        (b"{" * 5000, "not valid JSON"),
        (json.dumps({"v": 1, "x": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}).encode(),
         "nested deeper"),
    ],
)
def test_envelope_problems_are_rejected_with_a_reason(bad: bytes, reason: str) -> None:
    for decode in (Task.decode, Result.decode, Presence.decode, decode_status):
        with pytest.raises(DecodeError) as caught:
            decode(bad)
        assert reason in str(caught.value)


def test_oversized_payload_is_rejected_before_parsing_and_keeps_only_a_sample() -> None:
    big = b'{"v":1,"pad":"' + b"x" * MAX_PAYLOAD_BYTES + b'"}'
    with pytest.raises(DecodeError) as caught:
        Task.decode(big)
    assert "exceeds" in caught.value.reason
    assert caught.value.data is not None and len(caught.value.data) <= 200


def test_nesting_exactly_at_the_limit_is_accepted() -> None:
    nested: Any = 1
    for _ in range(MAX_JSON_DEPTH - 2):  # the args list and the object itself are two levels
        nested = [nested]
    task = Task.decode(payload(TASK, args=[nested]))
    assert task.args == [nested]


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"task_id": ...}, "missing field 'task_id'"),
        ({"task_id": 42}, "'task_id' must be a string"),
        ({"task_id": "x" * 129}, "longer than 128"),
        ({"attempt": 0}, "'attempt' must be positive"),
        ({"attempt": True}, "got a boolean"),
        ({"attempt": 1.5}, "'attempt' must be an integer"),
        ({"attempt": 10**30}, "out of range"),
        ({"function": ...}, "missing field 'function'"),
        ({"args": {"a": 1}}, "'args' must be a list"),
        ({"timeout": -1}, "'timeout' must be positive"),
        ({"timeout": "soon"}, "'timeout' must be an integer or a number"),
        ({"timeout": 10**400}, "out of range"),
    ],
)
def test_task_field_problems_name_the_field(changes: dict[str, Any], reason: str) -> None:
    with pytest.raises(DecodeError) as caught:
        Task.decode(payload(TASK, **changes))
    assert reason in str(caught.value)
    assert caught.value.kind == "task"


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"state": "sleeping"}, "'state' must be one of online, draining, paused, offline"),
        ({"reason": "bored"}, "'reason' must be one of lost, shutdown, purged"),
        ({"worker": "a/b"}, "invalid worker id"),
        ({"worker": "+"}, "invalid worker id"),
        ({"volunteer": ""}, "invalid volunteer name"),
        ({"seq": -1}, "'seq' must not be negative"),
        ({"seq": ...}, "missing field 'seq'"),
        ({"functions": ["add", 3]}, "'functions' must be a list"),
        ({"cpus": "8"}, "'cpus' must be an integer"),
        ({"worker": "lab.1"}, "invalid worker id"),  # RabbitMQ would split that topic level
        ({"heartbeat": -1}, "'heartbeat' must be from 0 to 3600 seconds"),
        ({"heartbeat": 1e300}, "'heartbeat' must be from 0 to 3600 seconds"),
        ({"heartbeat": 10**30}, "'heartbeat' is out of range"),
        ({"heartbeat": "30"}, "'heartbeat' must be an integer or a number"),
        ({"heartbeat": True}, "'heartbeat' must be an integer or a number, got a boolean"),
    ],
)
def test_presence_field_problems_name_the_field(changes: dict[str, Any], reason: str) -> None:
    with pytest.raises(DecodeError) as caught:
        Presence.decode(payload(ONLINE, **changes))
    assert reason in str(caught.value)


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"outcome": "maybe"}, "'outcome' must be one of ok, error, timeout, crashed, rejected, released"),
        ({"error": ...}, "outcome 'error' needs an 'error' object"),
        ({"error": {"message": "no type"}}, "missing field 'type'"),
        ({"error": "boom"}, "'error' must be an object"),
        ({"elapsed": -0.1}, "'elapsed' must not be negative"),
        ({"worker": "w#1"}, "invalid worker id"),
    ],
)
def test_result_field_problems_name_the_field(changes: dict[str, Any], reason: str) -> None:
    with pytest.raises(DecodeError) as caught:
        Result.decode(payload(ERROR_RESULT, **changes))
    assert reason in str(caught.value)


def test_decode_error_carries_the_offending_data() -> None:
    with pytest.raises(DecodeError) as caught:
        Task.decode(b'{"v":1,"task_id":7}')
    assert caught.value.data == b'{"v":1,"task_id":7}'


# --- peek_task_id: answering a malformed task -----------------------------------------------------


def test_peek_reads_the_id_of_a_task_that_is_otherwise_malformed() -> None:
    assert peek_task_id(payload(TASK, function=...)) == ("42", 2)
    assert peek_task_id(b'{"v":%d,"task_id":"9"}' % PROTOCOL_VERSION) == ("9", 1)  # attempt defaults to 1


@pytest.mark.parametrize("bad", [b"garbage", b'{"v":1}', b'{"v":1,"task_id":9}', b'{"v":1,"task_id":""}',
                                 b'{"v":1,"task_id":"9","attempt":"2"}', b'{"v":1,"task_id":"9"}',
                                 b'{"v":3,"task_id":"9"}'])
def test_peek_gives_up_when_no_usable_id_is_there(bad: bytes) -> None:
    assert peek_task_id(bad) is None


# --- fuzzing: any input is a valid message or a DecodeError, never anything else --------------------

DECODERS: list[Callable[[bytes | str], Any]] = [Task.decode, Result.decode, Presence.decode, decode_status]

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
FIELD_NAMES = sorted({*obj(ONLINE), *obj(TASK), *obj(ERROR_RESULT), "type", "message", "traceback"})
near_messages = st.dictionaries(st.sampled_from(FIELD_NAMES), json_values, max_size=len(FIELD_NAMES)).map(
    lambda d: {"v": PROTOCOL_VERSION, **d})


def _decodes_or_rejects(data: bytes | str) -> None:
    for decode in DECODERS:
        try:
            decode(data)
        except DecodeError:
            pass
    result = peek_task_id(data)  # never raises at all
    assert result is None or isinstance(result[0], str)


@FUZZ
@given(st.binary(max_size=512))
def test_fuzz_any_bytes(data: bytes) -> None:
    _decodes_or_rejects(data)


@FUZZ
@given(st.text(max_size=256))
def test_fuzz_any_text(data: str) -> None:
    _decodes_or_rejects(data)


@FUZZ
@given(near_messages)
def test_fuzz_objects_with_the_right_field_names_and_wrong_values(data: dict[str, Any]) -> None:
    _decodes_or_rejects(json.dumps(data))


@FUZZ
@given(near_messages, st.sampled_from([TASK, ONLINE, ERROR_RESULT]))
def test_fuzz_one_valid_message_with_fields_overwritten(changes: dict[str, Any], base: Any) -> None:
    _decodes_or_rejects(json.dumps({**obj(base), **changes}))


names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,20}", fullmatch=True)


@FUZZ
@given(st.builds(Task, task_id=st.text(min_size=1, max_size=128), job_id=st.text(min_size=1, max_size=128),
                 attempt=st.integers(1, 2**31), function=st.text(min_size=1, max_size=200),
                 args=st.lists(json_values, max_size=5), timeout=st.floats(0.001, 1e6)))
def test_fuzz_any_valid_task_survives_the_round_trip(task: Task) -> None:
    assert Task.decode(task.encode()) == task


@FUZZ
@given(st.builds(Result, task_id=st.text(min_size=1, max_size=128), attempt=st.integers(1, 2**31),
                 worker=names, volunteer=names, outcome=st.just(Outcome.OK), value=json_values,
                 elapsed=st.floats(0, 1e6)))
def test_fuzz_any_valid_result_survives_the_round_trip(result: Result) -> None:
    assert Result.decode(result.encode()) == result


_RESULT_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=5), st.lists(st.integers(), max_size=3),
    st.sampled_from(["ok", "error", "w-1", "", "a/b", "x" * 65, "x" * 129]),
)
_RESULT_KEYS = st.sampled_from(["v", "task_id", "attempt", "worker", "volunteer", "outcome", "value", "error", "elapsed",
                                "nonce"])
_GOOD_RESULT = {"v": PROTOCOL_VERSION, "task_id": "12", "attempt": 1, "worker": "w1", "volunteer": "vol",
                "outcome": "ok", "elapsed": 0.5, "nonce": "Zm9vYmFyYmF6cXV4cXV1eA"}


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_RESULT_KEYS, _RESULT_VALUES), st.sets(st.sampled_from(sorted(_GOOD_RESULT))))
def test_the_fast_result_decoder_accepts_only_what_the_full_one_accepts(
    changes: dict[str, Any], dropped: set[str],
) -> None:
    # Given a result that is mostly well formed, with a few fields changed or missing,
    _fast_path_agrees(Result, {k: v for k, v in _GOOD_RESULT.items() if k not in dropped} | changes)


def _fast_path_agrees(cls: type[Result] | type[Task], obj: dict[str, Any]) -> None:
    payload = json.dumps(obj).encode()
    try:
        checked: Result | Task | None = cls._decode_checked(json.loads(payload), payload)
    except DecodeError:
        checked = None
    # when the fast path for well-formed messages decides,
    fast = cls._decode_ok(json.loads(payload))
    # then it never accepts what the full decoder rejects, and builds the same message
    # (types included: a timeout of 30 is the float 30.0 either way).
    if fast is not None:
        assert checked is not None and repr(fast) == repr(checked)


_TASK_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
    st.floats(allow_infinity=False, allow_nan=False), st.just(1e308), st.text(max_size=5),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    st.sampled_from(["", "noop", "x" * 64, "x" * 65, "x" * 128, "x" * 129, "x" * 200, "x" * 201, 0, 2**63 - 1, 2**63]),
)
_TASK_KEYS = st.sampled_from(["v", "task_id", "job_id", "attempt", "nonce", "function", "args", "timeout"])
_GOOD_TASK = {"v": PROTOCOL_VERSION, "task_id": "12", "job_id": "3", "attempt": 1, "nonce": "Zm9vYmFyYmF6cXV4cXV1eA",
              "function": "noop", "args": [1, "a", [2.5]], "timeout": 30.0}


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_TASK_KEYS, _TASK_VALUES), st.sets(st.sampled_from(sorted(_GOOD_TASK))))
def test_the_fast_task_decoder_accepts_only_what_the_full_one_accepts(changes: dict[str, Any], dropped: set[str]) -> None:
    # Given a task that is mostly well formed, with a few fields changed or missing,
    _fast_path_agrees(Task, {k: v for k, v in _GOOD_TASK.items() if k not in dropped} | changes)


def test_the_coordinators_tasks_take_the_fast_path() -> None:
    # The fast path only pays if what the coordinator writes goes through it (and the full
    # decoder is left for the odd message).
    raw = PayloadBuilder(PROTOCOL_VERSION).build(42, 7, 3, "count_primes", "[0, 1000]", 30.0, new_nonces(1)[0])
    fast = Task._decode_ok(json.loads(raw))
    assert fast is not None and repr(fast) == repr(Task._decode_checked(json.loads(raw), raw))


def _depth_by_recursion(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth_by_recursion(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth_by_recursion(v) for v in value), default=0)
    return 0


_NESTED = st.recursive(st.none() | st.integers() | st.text(max_size=2),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=2), inner, max_size=3),
                       max_leaves=30)


@FUZZ
@given(_NESTED)
def test_json_depth_is_the_nesting_depth(value: Any) -> None:
    assert json_depth(value) == _depth_by_recursion(value)


_ANY_TEXT = st.text(max_size=8) | st.sampled_from(["w-1", "\u00e9t\u00e9", "\U0001f600", 'a"b\\c', "\x00\n"])


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.builds(Result, task_id=_ANY_TEXT, attempt=st.integers(-2, 2**70), worker=_ANY_TEXT, volunteer=_ANY_TEXT,
                 outcome=st.sampled_from(Outcome), value=json_values | st.floats(),
                 error=st.none() | st.just(TaskError("E", "m")), elapsed=st.floats() | st.integers(0, 5),
                 nonce=_ANY_TEXT))
def test_a_result_encodes_to_the_bytes_of_its_json_object(result: Result) -> None:
    # Result.encode writes a result without an error by a format, not the JSON encoder: the
    # bytes must be the encoder's for every value (escapes, non-ASCII, floats), and what the
    # encoder refuses (NaN, infinity) is refused the same way.
    try:
        expected: bytes | None = _dump(result.to_object())
    except ValueError:
        expected = None
    try:
        encoded: bytes | None = result.encode()
    except ValueError:
        encoded = None
    assert encoded == expected
