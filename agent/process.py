"""The task process: the loop that runs in each of the runner's processes, and the framing of
the messages between it and the agent.

The process reads batches of ``(token, function, args)`` with ``Connection.recv`` and answers
each task with ``Connection.send`` as soon as it finishes, in order: ``(token, "ok", json text,
elapsed)``, ``(token, "error", type, message, traceback, elapsed)``, or ``(token, "skipped")``
for a task the agent took back (its token is at or above the shared ``skip_from`` number when
the process gets to it). The agent's side reads those replies without blocking, several per
system call, with ``parse``; it writes with ``frame``, the same framing as Connection.
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing.connection
import os
import pickle
import signal
import struct
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from dockercomp.agent.defaults import MAX_ERROR_TEXT
from dockercomp.broker.defaults import MAX_PAYLOAD_BYTES

# Error types of results the task process makes itself (a task's own exceptions keep their class name).
RESULT_ERROR = "UnserializableResult"
TOO_LARGE_ERROR = "ResultTooLarge"

# Value of a process's "skip from" number while nothing is being taken back.
SKIP_NOTHING = 2**62

# A task's value as JSON, with an encoder built once (json.dumps with options builds one per call).
_JSON = json.JSONEncoder(allow_nan=False, separators=(",", ":"))

# multiprocessing.connection's framing: a signed 4-byte length, or -1 and an 8-byte length.
_HEADER = struct.Struct("!i")
_LONG_HEADER = struct.Struct("!Q")


def frame(message: Any) -> bytes:
    """``message`` pickled and framed, as Connection.send would write it."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    size = len(data)
    header = _HEADER.pack(size) if size < 0x7FFFFFFF else _HEADER.pack(-1) + _LONG_HEADER.pack(size)
    return header + data


def parse(buffer: bytes) -> Iterator[tuple[Any, int]]:
    """Each complete message in ``buffer`` with the offset just past it; a partial message at
    the end is left for the next read."""
    view = memoryview(buffer)
    pos, end = 0, len(buffer)
    while end - pos >= 4:
        (size,) = _HEADER.unpack_from(buffer, pos)
        start = pos + 4
        if size == -1:
            if end - start < 8:
                return
            (size,) = _LONG_HEADER.unpack_from(buffer, start)
            start += 8
        if start + size > end:
            return
        pos = start + size
        yield pickle.loads(view[start:pos]), pos


def _sender(fd: int) -> Callable[[Any], None]:
    """``Connection.send`` on ``fd`` without its costs: pickle.dumps instead of a
    ForkingPickler and a BytesIO per message, one write of the framed bytes (1.6 instead of
    4.4 us a reply; the process sends one per task)."""
    write = os.write

    def send(message: Any) -> None:
        data = memoryview(frame(message))
        while data:
            data = data[write(fd, data):]

    return send


def _clip(text: str, limit: int = MAX_ERROR_TEXT, keep_tail: bool = False) -> str:
    if len(text) <= limit:
        return text
    marker = "...[truncated]..."
    return marker + text[-(limit - len(marker)):] if keep_tail else text[: limit - len(marker)] + marker


def error_type_name(exc: BaseException) -> str:
    cls = type(exc)
    module = cls.__module__
    return cls.__qualname__ if module in ("builtins", "__main__") else f"{module}.{cls.__qualname__}"


# --------------------------------------------------------------------------- child side
def _die_with_parent(parent_pid: int) -> None:
    """Linux: get SIGKILL when the agent dies, so a `kill -9` leaves no orphan computing."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)


def _run_one(name: str, args: list[Any], targets: Mapping[str, str], functions: dict[str, Callable[..., Any]],
             resolve: Callable[[str], Callable[..., Any]]) -> tuple[Any, ...]:
    """Run one task in the task process; the reply without its token."""
    started = time.perf_counter()
    try:
        func = functions.get(name)
        if func is None:
            func = functions[name] = resolve(targets[name])
        value = func(*args)
        elapsed = time.perf_counter() - started
        try:
            text = _JSON.encode(value)
        except (TypeError, ValueError, RecursionError) as exc:
            return ("error", RESULT_ERROR,
                    f"{name} returned a {type(value).__name__}, which cannot be sent as JSON: {exc}", "", elapsed)
        if len(text) > MAX_PAYLOAD_BYTES:
            return ("error", TOO_LARGE_ERROR,
                    f"{name} returned {len(text)} bytes of JSON; a result must fit {MAX_PAYLOAD_BYTES} bytes", "",
                    elapsed)
        return ("ok", text, elapsed)
    except BaseException as exc:  # noqa: BLE001 - SystemExit from a task is its error too
        elapsed = time.perf_counter() - started
        # Start at the task's own frame: this function is noise to the scientist reading it.
        tb = exc.__traceback__
        tb = tb.tb_next if tb is not None and tb.tb_next is not None else tb
        trace = "".join(traceback.format_exception(type(exc), exc, tb))
        return ("error", error_type_name(exc)[:200], _clip(str(exc)), _clip(trace, keep_tail=True), elapsed)


def task_process_main(conn: multiprocessing.connection.Connection, targets: Mapping[str, str], parent_pid: int,
                skip_from: Any) -> None:
    """Loop of a task process: receive batches of (token, function, args), answer each task
    in order as it finishes, skip those whose token the agent took back (``skip_from``)."""
    from dockercomp.agent.tasks import resolve  # imported here, before "ready": this runs in a fresh interpreter

    # Ctrl-C in a terminal reaches the whole process group: the agent decides what happens.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent(parent_pid)
    functions: dict[str, Callable[..., Any]] = {}
    send = _sender(conn.fileno())
    send(("ready", os.getpid()))
    while True:
        try:
            batch = conn.recv()
        except (EOFError, OSError):
            return
        if batch is None:
            return
        for token, name, args in batch:
            if token >= skip_from.value:
                send((token, "skipped"))
            else:
                send((token, *_run_one(name, args, targets, functions, resolve)))
