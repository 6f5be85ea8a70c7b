"""Wire messages: small frozen dataclasses with ``encode()`` and strict ``decode()``.

Every payload is a JSON object with a version field ``v``. Decoding checks size, JSON
validity (no NaN/Infinity, bounded nesting), required fields and their types, and raises a
single DecodeError; nothing downstream ever sees half-valid data. docs/protocol.md shows
an example of each message.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Mapping, TypeVar

from dockercomp.broker.defaults import MAX_HEARTBEAT_SECONDS, MAX_JSON_DEPTH, MAX_PAYLOAD_BYTES, PROTOCOL_VERSION
from dockercomp.broker.errors import DecodeError, InvalidName
from dockercomp.broker.topics import validate_name


class PresenceState(str, Enum):
    ONLINE = "online"  # connected and taking work
    # Connected, finishing what it runs, taking no new work (shutting down): published before
    # it stops taking tasks, so the coordinator stops sending before any task is turned away.
    DRAINING = "draining"
    # Connected, taking no work until it announces online again (the volunteer paused it, or
    # idle-only mode saw the host busy): not lost, so its connection and will stay as they are.
    PAUSED = "paused"
    OFFLINE = "offline"  # gone; see OfflineReason


class OfflineReason(str, Enum):
    LOST = "lost"  # connection dropped without goodbye: published by the broker from the will
    SHUTDOWN = "shutdown"  # the worker drained and left on purpose
    PURGED = "purged"  # the coordinator gave up on a lost worker and cleared it


# Longest attempt nonce accepted: the coordinator sends 22 characters (16 random bytes).
MAX_NONCE_LENGTH = 64


class Outcome(str, Enum):
    OK = "ok"  # the function returned; value holds its result
    ERROR = "error"  # the function raised; error holds type, message, traceback
    TIMEOUT = "timeout"  # the function ran past the task's time limit and was killed
    CRASHED = "crashed"  # the process running the function died (os._exit, segfault, OOM)
    REJECTED = "rejected"  # the worker refused the task: unknown function or malformed task
    # The worker hands the task back unrun or cut short by its own shutdown (queued, arriving
    # while draining, killed at the end of the grace period): it does not use an attempt.
    RELEASED = "released"


# Failures that come from the task itself, not the worker: the same task fails the same way on
# every worker (its arguments do not fit the function; its value cannot be sent back). The
# coordinator fails such a task at once, without retrying it or charging the worker.
DETERMINISTIC_ERRORS: frozenset[tuple[Outcome, str]] = frozenset({
    (Outcome.REJECTED, "BadArguments"),  # agent.errors.BadArguments
    (Outcome.ERROR, "ResultTooLarge"),  # agent.process.TOO_LARGE_ERROR: over MAX_PAYLOAD_BYTES
    (Outcome.ERROR, "UnserializableResult"),  # agent.process.RESULT_ERROR: not JSON
})

_T = TypeVar("_T")


# --------------------------------------------------------------------------- helpers
def json_depth(value: Any) -> int:
    """Nesting depth of JSON lists/objects (a flat list is 1; a scalar 0), without recursion."""
    # Level by level: one list of the containers at each depth, no tuple per child.
    depth = 0
    level = [value] if isinstance(value, (list, dict)) else []
    while level:
        depth += 1
        below: list[Any] = []
        for item in level:
            below += [child for child in (item.values() if isinstance(item, dict) else item)
                      if isinstance(child, (list, dict))]
        level = below
    return depth


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


# Built once: json.loads() with hooks builds a new decoder for every call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)
# Likewise for encoding: json.dumps() with options builds a new encoder for every call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def _loads(payload: bytes | str) -> Any:
    """``json.loads(payload, parse_constant=..., parse_float=...)`` with a prebuilt decoder:
    the same text decoding (UTF-8/16/32 detection for bytes, a BOM refused in str), the
    same results and errors."""
    if isinstance(payload, str):
        if payload.startswith("\ufeff"):
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", payload, 0)
        text = payload
    else:
        text = payload.decode(json.detect_encoding(payload), "surrogatepass")
    return _DECODER.decode(text)


def load_object(kind: str, payload: bytes | str, depth: int = MAX_JSON_DEPTH) -> dict[str, Any]:
    """Parse a payload into a JSON object of the current protocol version, or DecodeError.
    ``depth``: the deepest nesting allowed (a batch's envelope adds two levels to its items')."""
    size = len(payload)
    if size > MAX_PAYLOAD_BYTES:
        raise DecodeError(kind, f"payload of {size} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit", payload[:200])
    if not payload:
        raise DecodeError(kind, "empty payload", payload)
    try:
        obj = _loads(payload)
    except RecursionError:
        raise DecodeError(kind, "JSON nested too deeply", payload) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise DecodeError(kind, f"not valid JSON ({exc})", payload) from None
    if not isinstance(obj, dict):
        raise DecodeError(kind, f"expected a JSON object, got {type(obj).__name__}", payload)
    check_depth(kind, obj, payload, depth)
    version = obj.get("v")
    if version != PROTOCOL_VERSION:
        raise DecodeError(kind, f"unsupported protocol version {version!r} (this side speaks {PROTOCOL_VERSION})", payload)
    return obj


def check_depth(kind: str, obj: Any, payload: bytes | str, depth: int = MAX_JSON_DEPTH) -> None:
    """DecodeError when ``obj`` (parsed from ``payload``) nests deeper than ``depth``."""
    # Nesting deeper than the limit needs more containers than the limit; every container
    # opens with a '[' or '{' character, which in UTF-8, -16 and -32 alike contains that
    # byte. Fewer such bytes than the limit: no need to walk the object.
    brackets = payload.count("[" if isinstance(payload, str) else b"[") + payload.count(
        "{" if isinstance(payload, str) else b"{")
    if brackets > depth and json_depth(obj) > depth:
        raise DecodeError(kind, f"JSON nested deeper than {depth} levels", payload)


class _Fields:
    """Typed access to a decoded object; each failure names the field."""

    def __init__(self, kind: str, obj: Mapping[str, Any], raw: bytes | str) -> None:
        self.kind, self.obj, self.raw = kind, obj, raw

    def fail(self, reason: str) -> DecodeError:
        return DecodeError(self.kind, reason, self.raw)

    def get(self, name: str, types: type | tuple[type, ...], default: Any = ..., check: Callable[[Any], str | None] | None = None) -> Any:
        if name not in self.obj or self.obj[name] is None:
            if default is ...:
                raise self.fail(f"missing field {name!r}")
            return default
        value = self.obj[name]
        # bool is an int in Python; a flag is never a count and a count is never a flag.
        if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            raise self.fail(f"field {name!r} must be {_type_names(types)}, got a boolean")
        if not isinstance(value, types):
            raise self.fail(f"field {name!r} must be {_type_names(types)}, got {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(f"field {name!r} must be finite")
        # A 400-digit integer is valid JSON, but overflows float() and every database column.
        if isinstance(value, int) and not -(2**63) <= value < 2**63:
            raise self.fail(f"field {name!r} is out of range")
        if check is not None:
            problem = check(value)
            if problem:
                raise self.fail(f"field {name!r} {problem}")
        return value

    def strings(self, name: str, most: int, what: str) -> list[str]:
        """An optional list of at most ``most`` non-empty strings of up to 200 characters."""
        values = self.get(name, list, [])
        if len(values) > most or not all(isinstance(x, str) and 0 < len(x) <= 200 for x in values):
            raise self.fail(f"field {name!r} must be a list of at most {most} {what}")
        return values

    def name(self, field_name: str, what: str) -> str:
        value = self.get(field_name, str)
        try:
            return validate_name(value, what)
        except InvalidName as exc:
            raise self.fail(str(exc)) from None

    def enum(self, name: str, enum: type[_T], default: Any = ...) -> _T:
        value = self.get(name, str, default)
        if value is default and default is not ...:
            return value
        try:
            return enum(value)  # type: ignore[call-arg]
        except ValueError:
            allowed = ", ".join(m.value for m in enum)  # type: ignore[attr-defined]
            raise self.fail(f"field {name!r} must be one of {allowed}, got {value!r}") from None


def _type_names(types: type | tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "a list", dict: "an object"}
    seq = types if isinstance(types, tuple) else (types,)
    return " or ".join(names.get(t, t.__name__) for t in seq)


def _non_negative(value: float) -> str | None:
    return None if value >= 0 else "must not be negative"


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be positive"


def _heartbeat(value: float) -> str | None:
    if not 0 <= value <= MAX_HEARTBEAT_SECONDS:
        return f"must be from 0 to {MAX_HEARTBEAT_SECONDS} seconds"
    return None


def _short(limit: int) -> Callable[[str], str | None]:
    return lambda value: None if len(value) <= limit else f"is longer than {limit} characters"


def _identifier(limit: int) -> Callable[[str], str | None]:
    """An id: not empty (an empty task id cannot be answered: peek_task_id and the agent's
    bookkeeping need one), at most ``limit`` characters."""
    return lambda value: "must not be empty" if not value else _short(limit)(value)


def _dump(obj: dict[str, Any]) -> bytes:
    return _ENCODER.encode(obj).encode()


# --------------------------------------------------------------------------- messages
@dataclass(frozen=True)
class Presence:
    """A worker's retained presence: its online birth or its offline death (will or goodbye).

    ``seq`` numbers the worker's connections; the will of a connection carries that
    connection's number, so a will arriving after a newer online presence is known stale.
    """

    worker: str
    volunteer: str
    state: PresenceState
    seq: int
    reason: OfflineReason | None = None
    host: str = ""
    container: str | None = None
    image: str | None = None
    version: str = ""
    cpus: int = 0
    capacity: int = 0
    functions: tuple[str, ...] = ()
    started: float = 0.0
    # Tasks the worker wants queued beyond its capacity, so a slot that frees up starts the
    # next task at once instead of waiting a round trip to the coordinator.
    prefetch: int = 0
    # Most tasks the worker takes in one message (a TaskBatch, broker/batches.py); 0: single
    # Task messages only, what a worker that predates batches gets (it does not send the field).
    batch: int = 0
    # Seconds between the worker's heartbeats (this presence again, not retained, QoS 0); the
    # coordinator marks it lost after missing a few. 0: it sends none (agents before issue 15),
    # so only its will, a goodbye or an unanswered rebirth request say it is gone.
    heartbeat: float = 0.0
    v: int = PROTOCOL_VERSION

    KIND = "presence"

    def encode(self) -> bytes:
        return _dump({
            "v": self.v, "worker": self.worker, "volunteer": self.volunteer, "state": self.state.value,
            "seq": self.seq, "reason": self.reason.value if self.reason else None, "host": self.host,
            "container": self.container, "image": self.image, "version": self.version, "cpus": self.cpus,
            "capacity": self.capacity, "functions": list(self.functions), "started": self.started,
            "prefetch": self.prefetch, "batch": self.batch, "heartbeat": self.heartbeat,
        })

    @classmethod
    def decode(cls, payload: bytes | str) -> "Presence":
        f = _Fields(cls.KIND, load_object(cls.KIND, payload), payload)
        functions = f.strings("functions", 1000, "short strings")
        state = f.enum("state", PresenceState)
        return cls(
            worker=f.name("worker", "worker id"),
            volunteer=f.name("volunteer", "volunteer name"),
            state=state,
            seq=f.get("seq", int, check=_non_negative),
            reason=f.enum("reason", OfflineReason, None),
            host=f.get("host", str, "", check=_short(255)),
            container=f.get("container", str, None, check=_short(128)),
            image=f.get("image", str, None, check=_short(255)),
            version=f.get("version", str, "", check=_short(64)),
            cpus=f.get("cpus", int, 0, check=_non_negative),
            capacity=f.get("capacity", int, 0, check=_non_negative),
            functions=tuple(functions),
            started=float(f.get("started", (int, float), 0.0)),
            prefetch=f.get("prefetch", int, 0, check=_non_negative),
            batch=f.get("batch", int, 0, check=_non_negative),
            heartbeat=float(f.get("heartbeat", (int, float), 0.0, check=_heartbeat)),
        )


@dataclass(frozen=True)
class Rebirth:
    """The coordinator asks workers to publish their presence again (Sparkplug B's rebirth):
    a retained presence replayed by the broker is no proof of life, a fresh one is. Not
    retained. ``workers`` names the ``volunteer/worker`` keys asked; empty asks every worker."""

    workers: tuple[str, ...] = ()
    v: int = PROTOCOL_VERSION

    KIND = "rebirth"

    def encode(self) -> bytes:
        return _dump({"v": self.v, "workers": list(self.workers)})

    def asks(self, key: str) -> bool:
        return not self.workers or key in self.workers

    @classmethod
    def decode(cls, payload: bytes | str) -> "Rebirth":
        f = _Fields(cls.KIND, load_object(cls.KIND, payload), payload)
        return cls(workers=tuple(f.strings("workers", 10_000, "worker keys")))


@dataclass(frozen=True)
class Task:
    """One attempt at one task, sent to one worker's task topic."""

    task_id: str
    job_id: str
    attempt: int
    function: str
    args: list[Any] = field(default_factory=list)
    timeout: float = 60.0
    # Secret of this attempt, drawn at random by the coordinator: the result must echo it, so
    # nobody who was not sent the task can answer it (task ids and attempt numbers are guessable).
    nonce: str = ""
    v: int = PROTOCOL_VERSION

    KIND = "task"

    def encode(self) -> bytes:
        # Key order is the one coordinator.leases.PayloadBuilder writes byte for byte.
        return _dump({"v": self.v, "task_id": self.task_id, "job_id": self.job_id, "attempt": self.attempt,
                      "nonce": self.nonce, "function": self.function, "args": self.args, "timeout": self.timeout})

    @classmethod
    def decode(cls, payload: bytes | str) -> "Task":
        return cls.from_object(load_object(cls.KIND, payload), payload)

    @classmethod
    def from_object(cls, obj: Mapping[str, Any], raw: bytes | str = b"") -> "Task":
        """A Task from an already parsed object (one item of a TaskBatch), or DecodeError."""
        return cls._decode_ok(obj) or cls._decode_checked(obj, raw)

    @classmethod
    def _decode_ok(cls, obj: Mapping[str, Any]) -> "Task | None":
        """The common case, a well-formed task as the coordinator writes it, checked field by
        field without the generic machinery (a third of the cost); None for anything else,
        which ``_decode_checked`` then accepts or rejects with its reason. Accepts only what
        ``_decode_checked`` accepts, and builds the same Task."""
        get = obj.get
        task_id, job_id, attempt, function = get("task_id"), get("job_id"), get("attempt"), get("function")
        args, timeout, nonce = get("args"), get("timeout"), get("nonce")
        if type(task_id) is not str or not 0 < len(task_id) <= 128:
            return None
        if type(job_id) is not str or not 0 < len(job_id) <= 128:
            return None
        if type(attempt) is not int or not 0 < attempt < 2**63:
            return None
        if type(function) is not str or len(function) > 200:
            return None
        if args is None:
            args = []
        elif type(args) is not list:
            return None
        if timeout is None:
            timeout = 60.0
        elif type(timeout) is int and 0 < timeout < 2**63:
            timeout = float(timeout)
        elif type(timeout) is not float or not 0.0 < timeout < math.inf:
            return None
        if nonce is None:
            nonce = ""
        elif type(nonce) is not str or len(nonce) > MAX_NONCE_LENGTH:
            return None
        return cls(task_id=task_id, job_id=job_id, attempt=attempt, function=function, args=args,
                   timeout=timeout, nonce=nonce)

    @classmethod
    def _decode_checked(cls, obj: Mapping[str, Any], raw: bytes | str) -> "Task":
        f = _Fields(cls.KIND, obj, raw)
        return cls(
            task_id=f.get("task_id", str, check=_identifier(128)),
            job_id=f.get("job_id", str, check=_identifier(128)),
            attempt=f.get("attempt", int, check=_positive),
            function=f.get("function", str, check=_short(200)),
            args=f.get("args", list, []),
            timeout=float(f.get("timeout", (int, float), 60.0, check=_positive)),
            nonce=f.get("nonce", str, "", check=_short(MAX_NONCE_LENGTH)),
        )


def peek_task_id(payload: bytes | str) -> tuple[str, int] | None:
    """Best effort (task_id, attempt) of a malformed task, so the worker can answer it."""
    try:
        obj = load_object(Task.KIND, payload)
    except DecodeError:
        return None
    return peek_object_id(obj)


def peek_object_id(obj: Any) -> tuple[str, int] | None:
    """``peek_task_id`` of an already parsed object (an item of a TaskBatch)."""
    if not isinstance(obj, dict):
        return None
    task_id, attempt = obj.get("task_id"), obj.get("attempt", 1)
    if isinstance(task_id, str) and 0 < len(task_id) <= 128 and isinstance(attempt, int) and not isinstance(attempt, bool):
        return task_id, attempt
    return None


@dataclass(frozen=True)
class TaskError:
    """Why a task did not produce a value."""

    type: str
    message: str
    traceback: str = ""

    def to_object(self) -> dict[str, str]:
        return {"type": self.type, "message": self.message, "traceback": self.traceback}


_ERROR_TEXT_LIMIT = 16 * 1024

# Result.encode of a result without an error: the keys, order and separators of _dump's.
_RESULT_NO_ERROR = ('{"v":%d,"task_id":%s,"attempt":%d,"worker":%s,"volunteer":%s,"outcome":%s,"value":%s,'
                    '"error":null,"elapsed":%s,"nonce":%s}')
_quote = json.encoder.encode_basestring_ascii  # what _ENCODER (ensure_ascii) writes for a str


@dataclass(frozen=True)
class Result:
    """What a worker reports for one task attempt."""

    task_id: str
    attempt: int
    worker: str
    volunteer: str
    outcome: Outcome
    value: Any = None
    error: TaskError | None = None
    elapsed: float = 0.0
    nonce: str = ""  # the nonce of the task message it answers (Task.nonce)
    v: int = PROTOCOL_VERSION

    KIND = "result"

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK

    @property
    def deterministic(self) -> bool:
        """A failure any worker would report for this task (DETERMINISTIC_ERRORS)."""
        return self.error is not None and (self.outcome, self.error.type) in DETERMINISTIC_ERRORS

    def encode(self) -> bytes:
        if self.error is None and type(self.elapsed) is float and math.isfinite(self.elapsed) and \
                type(self.attempt) is int and type(self.v) is int and \
                type(self.task_id) is type(self.worker) is type(self.volunteer) is type(self.nonce) is str:
            # Every result the agent sends for a task that returned: the same bytes as the
            # dict below, written by one format instead of the encoder walking a dict.
            return (_RESULT_NO_ERROR % (
                self.v, _quote(self.task_id), self.attempt, _quote(self.worker), _quote(self.volunteer),
                _quote(self.outcome.value), "null" if self.value is None else _ENCODER.encode(self.value),
                float.__repr__(self.elapsed), _quote(self.nonce))).encode()
        return _dump(self.to_object())

    def to_object(self) -> dict[str, Any]:
        """The JSON object this result is on the wire."""
        return {"v": self.v, "task_id": self.task_id, "attempt": self.attempt, "worker": self.worker,
                "volunteer": self.volunteer, "outcome": self.outcome.value, "value": self.value,
                "error": self.error.to_object() if self.error else None, "elapsed": self.elapsed, "nonce": self.nonce}

    @classmethod
    def decode(cls, payload: bytes | str) -> "Result":
        return cls.from_object(load_object(cls.KIND, payload), payload)

    @classmethod
    def from_object(cls, obj: dict[str, Any], raw: bytes | str = b"") -> "Result":
        """A Result from an already parsed object (one item of a ResultBatch), or DecodeError."""
        return cls._decode_ok(obj) or cls._decode_checked(obj, raw)

    @classmethod
    def _decode_ok(cls, obj: dict[str, Any]) -> "Result | None":
        """The common case, a well-formed successful result, checked field by field without
        the generic machinery; None for anything else, which ``_decode_checked`` then
        accepts or rejects with its reason. Accepts only what ``_decode_checked`` accepts,
        and builds the same Result."""
        if obj.get("outcome") != "ok" or obj.get("error") is not None:
            return None
        task_id, attempt, elapsed = obj.get("task_id"), obj.get("attempt"), obj.get("elapsed")
        worker, volunteer, value = obj.get("worker"), obj.get("volunteer"), obj.get("value")
        nonce = obj.get("nonce")
        if nonce is None:
            nonce = ""
        elif type(nonce) is not str or len(nonce) > MAX_NONCE_LENGTH:
            return None
        if type(task_id) is not str or not 0 < len(task_id) <= 128:
            return None
        if type(attempt) is not int or not 0 < attempt < 2**63:
            return None
        if elapsed is None:
            elapsed = 0.0
        elif type(elapsed) is int and 0 <= elapsed < 2**63:
            elapsed = float(elapsed)
        elif type(elapsed) is not float or not 0.0 <= elapsed < math.inf:
            return None
        if type(value) is float and not math.isfinite(value):
            return None
        if type(worker) is not str or type(volunteer) is not str:
            return None
        try:
            validate_name(worker, "worker id")
            validate_name(volunteer, "volunteer name")
        except InvalidName:
            return None
        return cls(task_id=task_id, attempt=attempt, worker=worker, volunteer=volunteer, outcome=Outcome.OK,
                   value=value, error=None, elapsed=elapsed, nonce=nonce)

    @classmethod
    def _decode_checked(cls, obj: dict[str, Any], payload: bytes | str) -> "Result":
        f = _Fields(cls.KIND, obj, payload)
        outcome = f.enum("outcome", Outcome)
        error_obj = f.get("error", dict, None)
        error = None
        if error_obj is not None:
            e = _Fields(cls.KIND, error_obj, payload)
            error = TaskError(
                type=e.get("type", str, check=_short(200)),
                message=e.get("message", str, "", check=_short(_ERROR_TEXT_LIMIT)),
                traceback=e.get("traceback", str, "", check=_short(_ERROR_TEXT_LIMIT)),
            )
        if outcome is not Outcome.OK and error is None:
            raise f.fail(f"outcome {outcome.value!r} needs an 'error' object")
        value = f.obj.get("value")
        if isinstance(value, float) and not math.isfinite(value):
            raise f.fail("field 'value' must be finite")
        return cls(
            task_id=f.get("task_id", str, check=_identifier(128)),
            attempt=f.get("attempt", int, check=_positive),
            worker=f.name("worker", "worker id"),
            volunteer=f.name("volunteer", "volunteer name"),
            outcome=outcome,
            value=value,
            error=error,
            elapsed=float(f.get("elapsed", (int, float), 0.0, check=_non_negative)),
            nonce=f.get("nonce", str, "", check=_short(MAX_NONCE_LENGTH)),
        )


def decode_status(payload: bytes | str) -> dict[str, Any]:
    """Status topics are for people and dashboards: a versioned JSON object, fields documented
    in docs/protocol.md. Decoding only checks the envelope."""
    return load_object("status", payload)


def encode_status(fields: Mapping[str, Any]) -> bytes:
    return _dump({"v": PROTOCOL_VERSION, **fields})
