"""Batches: several tasks, or several results, in one message (docs/protocol.md, "Batches").

A batch is only a wire envelope: ``{"v": 2, "tasks": [TASK, ...]}`` on a worker's task topic,
``{"v": 2, "results": [RESULT, ...]}`` on its result topic, each item exactly the object a
single Task or Result message would carry (``v`` included), so each keeps its own attempt,
nonce and timeout and is checked on its own. Every side pays MQTT's per-message cost (paho's
Python code, the broker, the system calls) once per batch instead of once per task.

Negotiation: a worker announces in its presence how many tasks it takes per message
(``Presence.batch``; 0 or absent: single Task messages, as before batches existed). A
coordinator that knows batches sends such a worker TaskBatch messages only; a worker answers
with ResultBatch messages only while the last task message it received was a batch, so a
coordinator that predates batches (it sends single tasks) gets single results.

Decoding is strict about the envelope (size, JSON, version, a list of 1 to MAX_BATCH_ITEMS
objects: else one DecodeError for the whole message) and lenient about the items: each
item that does not decode is returned as a ``BadItem`` beside the good ones, which the
receiver handles as it would the same single message.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from dockercomp.broker.defaults import MAX_BATCH_ITEMS, MAX_JSON_DEPTH, MAX_PAYLOAD_BYTES, PROTOCOL_VERSION
from dockercomp.broker.errors import DecodeError
from dockercomp.broker.messages import Result, Task, check_depth, load_object, peek_object_id

TASKS_KEY = "tasks"
RESULTS_KEY = "results"

# The envelope's object and list put each item two levels deeper than as a single message.
_ENVELOPE_DEPTH = MAX_JSON_DEPTH + 2

_Item = TypeVar("_Item", Task, Result)


@dataclass(frozen=True)
class BadItem:
    """An item of a batch that does not decode: why, and (tasks) its readable id, if any."""

    index: int
    error: DecodeError
    peeked: tuple[str, int] | None = None


@dataclass(frozen=True)
class Batch(Generic[_Item]):
    """A decoded batch: the items in order, each a message or a BadItem."""

    items: tuple[_Item | BadItem, ...]

    @property
    def good(self) -> list[_Item]:
        return [item for item in self.items if not isinstance(item, BadItem)]

    @property
    def bad(self) -> list[BadItem]:
        return [item for item in self.items if isinstance(item, BadItem)]


TaskBatch = Batch[Task]
ResultBatch = Batch[Result]


# --------------------------------------------------------------------------- encoding
def wrap(key: str, payloads: Sequence[bytes]) -> bytes:
    """The batch message of already encoded items (``Task.encode()`` / ``Result.encode()``
    payloads), without decoding or encoding them again."""
    return b'{"v":%d,"%s":[%s]}' % (PROTOCOL_VERSION, key.encode(), b",".join(payloads))


def pack(key: str, payloads: Sequence[bytes], most: int, limit: int = MAX_PAYLOAD_BYTES) -> list[bytes]:
    """Encoded items joined into as few batch messages as fit, in order: each at most ``most``
    items (capped at MAX_BATCH_ITEMS) and ``limit`` bytes. An item too big to share an
    envelope goes as the single message it is."""
    most = max(1, min(most, MAX_BATCH_ITEMS))
    envelope = len(wrap(key, []))
    messages: list[bytes] = []
    group: list[bytes] = []
    size = envelope
    for payload in payloads:
        if envelope + len(payload) > limit:
            if group:
                messages.append(wrap(key, group))
                group, size = [], envelope
            messages.append(payload)
            continue
        if group and (len(group) >= most or size + 1 + len(payload) > limit):
            messages.append(wrap(key, group))
            group, size = [], envelope
        size += len(payload) + (1 if group else 0)  # and a comma before all but the first
        group.append(payload)
    if group:
        messages.append(wrap(key, group))
    return messages


def encode_tasks(tasks: Iterable[Task]) -> bytes:
    """One TaskBatch message of ``tasks`` (at most MAX_BATCH_ITEMS; the caller keeps it small)."""
    return wrap(TASKS_KEY, [task.encode() for task in tasks])


def encode_results(results: Iterable[Result]) -> bytes:
    return wrap(RESULTS_KEY, [result.encode() for result in results])


# --------------------------------------------------------------------------- decoding
def read_tasks(payload: bytes | str) -> Task | TaskBatch:
    """What came on a task topic: a single Task or a TaskBatch; DecodeError for a malformed
    message or envelope (a bad item is a BadItem in the batch)."""
    obj = load_object(Task.KIND, payload, _ENVELOPE_DEPTH)
    if TASKS_KEY not in obj:
        check_depth(Task.KIND, obj, payload)
        return Task.from_object(obj, payload)
    return Batch(_items("task batch", obj, TASKS_KEY, payload, Task.from_object, peek_object_id))


def read_results(payload: bytes | str) -> Result | ResultBatch:
    """What came on a result topic: a single Result or a ResultBatch (see ``read_tasks``)."""
    obj = load_object(Result.KIND, payload, _ENVELOPE_DEPTH)
    if RESULTS_KEY not in obj:
        check_depth(Result.KIND, obj, payload)
        return Result.from_object(obj, payload)
    return Batch(_items("result batch", obj, RESULTS_KEY, payload, Result.from_object, lambda item: None))


def _items(kind: str, obj: dict[str, Any], key: str, payload: bytes | str,
           decode: Callable[[dict[str, Any], bytes | str], _Item],
           peek: Callable[[Any], tuple[str, int] | None]) -> tuple[_Item | BadItem, ...]:
    items = obj[key]
    if not isinstance(items, list):
        raise DecodeError(kind, f"field {key!r} must be a list, got {type(items).__name__}", payload)
    if not items:
        raise DecodeError(kind, "a batch needs at least one item", payload)
    if len(items) > MAX_BATCH_ITEMS:
        raise DecodeError(kind, f"{len(items)} items; a batch carries at most {MAX_BATCH_ITEMS}", payload)
    out: list[_Item | BadItem] = []
    for index, item in enumerate(items):
        try:
            if not isinstance(item, dict):
                raise DecodeError(kind, f"item {index} must be an object, got {type(item).__name__}", payload)
            version = item.get("v", PROTOCOL_VERSION)
            if version != PROTOCOL_VERSION:
                raise DecodeError(kind, f"item {index}: unsupported protocol version {version!r}", payload)
            out.append(decode(item, payload))
        except DecodeError as exc:
            out.append(BadItem(index, exc, peek(item)))
    return tuple(out)
