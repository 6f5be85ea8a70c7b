"""The scientist's task arguments: one JSON array per line, checked before anything is stored.

``dockercomp coordinator submit FUNCTION FILE`` reads its input through here: every non-blank line is a
JSON array (the positional arguments of one call), finite numbers only (no NaN/Infinity),
nested no deeper and encoded no larger than a task message may be (broker/defaults.py). The
first bad line stops the whole submission and is named by its number in the file, counted
from 1 with blank lines included: nothing half-submitted. (The store checks the same limits
again, but can only count argument lists, not file lines.)
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from typing import IO, Any

from dockercomp.broker.defaults import MAX_JSON_DEPTH, MAX_PAYLOAD_BYTES
from dockercomp.broker.messages import json_depth
from dockercomp.coordinator.errors import InvalidInput

# Bytes a task message adds around its arguments (ids, function name, field names); the
# arguments must leave this much room below MAX_PAYLOAD_BYTES.
TASK_ENVELOPE_BYTES = 1024

# The task message is an object (depth 1) holding the argument list (depth 2).
MAX_ARGS_DEPTH = MAX_JSON_DEPTH - 1

# How much of a bad line an error message quotes.
_QUOTE_CHARS = 60


def _bad(source: str, unit: str, number: int, reason: str) -> InvalidInput:
    """InvalidInput for the 1-based line ``number`` (``InvalidInput.line`` counts from 0)."""
    return InvalidInput(f"{source}, {unit} {number}: {reason}", "nothing was submitted; fix it and submit again",
                        line=number - 1)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed (JSON has no NaN or Infinity)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is too large")
    return value


def _quote(text: str) -> str:
    text = text.strip()
    return repr(text if len(text) <= _QUOTE_CHARS else text[:_QUOTE_CHARS] + "…")


def check_arguments(args: Any) -> str | None:
    """Why ``args`` cannot be one task's arguments, or None when it can."""
    if not isinstance(args, list):
        kind = {dict: "an object", str: "a string", bool: "a boolean", type(None): "null"}.get(
            type(args), "a number"
        )
        return f"expected a JSON array of arguments such as [1, 2], got {kind}"
    if json_depth(args) > MAX_ARGS_DEPTH:
        return f"arguments are nested deeper than {MAX_ARGS_DEPTH} levels"
    try:
        size = len(json.dumps(args, separators=(",", ":"), allow_nan=False))
    except (TypeError, ValueError) as exc:
        return f"arguments are not JSON data ({exc})"
    if size + TASK_ENVELOPE_BYTES > MAX_PAYLOAD_BYTES:
        return (f"arguments take {size} bytes as JSON; a task may carry at most "
                f"{MAX_PAYLOAD_BYTES - TASK_ENVELOPE_BYTES}")
    return None


def parse_line(text: str) -> list[Any]:
    """One input line as an argument list; ValueError saying why not."""
    try:
        value = json.loads(text.strip(), parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno}): {_quote(text)}") from None
    problem = check_arguments(value)
    if problem:
        raise ValueError(f"{problem}: {_quote(text)}")
    return value


def iter_lines(stream: IO[bytes], source: str) -> Iterator[tuple[int, list[Any]]]:
    """(line number, arguments) for each non-blank line; InvalidInput at the first bad one."""
    for number, raw in enumerate(stream, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _bad(source, "line", number, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        if number == 1:
            text = text.removeprefix("\ufeff")  # a byte-order mark some editors write
        if not text.strip():
            continue
        try:
            yield number, parse_line(text)
        except ValueError as exc:
            raise _bad(source, "line", number, str(exc)) from None


def read_arguments(
    stream: IO[bytes], source: str = "input", on_line: Callable[[int], None] | None = None
) -> list[list[Any]]:
    """Every argument list of an input stream, checked; blank lines skipped.

    ``on_line(bytes_read_so_far)`` is called now and then for a progress bar.
    Raises InvalidInput naming the first bad line, or when there is no line at all.
    """
    args_list: list[list[Any]] = []
    for _number, args in iter_lines(stream, source):
        args_list.append(args)
        if on_line is not None and len(args_list) % 1000 == 0:
            on_line(stream.tell() if stream.seekable() else 0)
    if not args_list:
        raise InvalidInput(f"{source}: no arguments found",
                           "give one JSON array of arguments per line, such as [1, 2]")
    return args_list


def open_input(path: str) -> tuple[IO[bytes], str, int]:
    """(binary stream, name for messages, size in bytes or 0 when unknown) of FILE or ``-``
    (stdin, which must not be a terminal: a forgotten FILE would wait for typing)."""
    if path == "-":
        if sys.stdin.isatty():
            raise InvalidInput("no input", "give a FILE, or pipe lines in "
                               "(`... | dockercomp coordinator submit FUNCTION -`)")
        return sys.stdin.buffer, "<stdin>", 0
    try:
        stream = open(path, "rb")  # noqa: SIM115 - closed by the caller
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror or exc}", "check the path") from None
    return stream, path, os.fstat(stream.fileno()).st_size
