"""Hostile input for the fuzz tests: hypothesis strategies of messages and of what a hostile
client can put on the wire, and what every decoded message must satisfy (assert_sane)."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import strategies as st

from dockercomp.broker.defaults import MAX_JSON_DEPTH, PROTOCOL_VERSION
from dockercomp.broker.messages import OfflineReason, Outcome, Presence, PresenceState, Result, Task, TaskError
from dockercomp.broker.topics import WorkerRef

INT64 = range(-(2**63), 2**63)

# --------------------------------------------------------------------------- strategies
names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,63}", fullmatch=True)
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
    seq=st.integers(0, 2**63 - 1), reason=st.none() | st.sampled_from(OfflineReason), prefetch=st.integers(0, 2**63 - 1),
    host=st.text(max_size=255), container=st.none() | st.text(max_size=128), image=st.none() | st.text(max_size=255),
    version=st.text(max_size=64), cpus=st.integers(0, 2**63 - 1), capacity=st.integers(0, 2**63 - 1),
    functions=st.lists(st.text(min_size=1, max_size=200), max_size=8).map(tuple),
    started=finite)
tasks = st.builds(
    Task, task_id=st.text(min_size=1, max_size=128), job_id=st.text(min_size=1, max_size=128),
    attempt=st.integers(1, 2**63 - 1), function=st.text(min_size=1, max_size=200),
    args=st.lists(clean_json, max_size=5), timeout=st.floats(min_value=1e-6, allow_infinity=False),
    nonce=st.text(max_size=64))
errors = st.builds(TaskError, type=st.text(min_size=1, max_size=200), message=st.text(max_size=300),
                   traceback=st.text(max_size=300))
results = st.one_of(
    st.builds(Result, task_id=st.text(min_size=1, max_size=128), attempt=st.integers(1, 2**63 - 1), worker=names,
              volunteer=names, outcome=st.just(Outcome.OK), value=clean_json, error=st.none() | errors,
              elapsed=st.floats(min_value=0, allow_infinity=False), nonce=st.text(max_size=64)),
    st.builds(Result, task_id=st.text(min_size=1, max_size=128), attempt=st.integers(1, 2**63 - 1), worker=names,
              volunteer=names, outcome=st.sampled_from([o for o in Outcome if o is not Outcome.OK]),
              value=st.none(), error=errors, elapsed=st.floats(min_value=0, allow_infinity=False),
              nonce=st.text(max_size=64)))
messages = st.one_of(presences, tasks, results)


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
        assert isinstance(message.args, list) and isinstance(message.nonce, str) and len(message.nonce) <= 64
        _json_sane(message.args)
        assert math.isfinite(message.timeout) and message.timeout > 0
    elif isinstance(message, Result):
        WorkerRef(message.volunteer, message.worker)
        assert message.attempt in INT64 and message.attempt >= 1
        assert isinstance(message.outcome, Outcome)
        assert message.ok or message.error is not None
        assert isinstance(message.nonce, str) and len(message.nonce) <= 64
        _json_sane(message.value)
        assert math.isfinite(message.elapsed) and message.elapsed >= 0
    # Whatever was accepted can be written out again (to the store, to status) as strict JSON.
    if hasattr(message, "encode"):
        message.encode()


near_payloads = st.one_of(st.binary(max_size=300), hostile_json.map(wire), messages.map(lambda m: m.encode()),
                          st.builds(lambda m, d: wire({**as_object(m), **d}), messages,
                                    st.dictionaries(st.sampled_from(["task_id", "attempt", "worker", "volunteer",
                                                                     "state", "seq", "outcome", "value"]),
                                                    hostile_json, max_size=3)))


def assert_int64(value: Any) -> None:
    """Every integer in a decoded JSON document (a status payload) is one the decoders accept."""
    if isinstance(value, dict):
        for item in value.values():
            assert_int64(item)
    elif isinstance(value, list):
        for item in value:
            assert_int64(item)
    elif isinstance(value, int) and not isinstance(value, bool):
        assert -(2**63) <= value < 2**63, value

