"""`dockercomp installer logs`: one worker's output, or all of them interleaved with a name prefix."""

from __future__ import annotations

import queue
import threading
from typing import Any, TextIO

import docker.errors

_DONE = object()


def show(containers: list[Any], out: TextIO, *, follow: bool = False, tail: int | None = None) -> None:
    """Writes the containers' logs to `out`; prefixes lines with the name when there are several."""
    prefix = len(containers) > 1
    if not follow:
        for container in containers:
            _copy(container, out, follow=False, tail=tail, prefix=prefix)
        return
    # Following several containers means reading several endless streams at once.
    lines: queue.Queue[object] = queue.Queue()
    threads = [
        threading.Thread(target=_pump, args=(c, lines, tail, prefix), daemon=True) for c in containers
    ]
    for thread in threads:
        thread.start()
    finished = 0
    while finished < len(threads):
        item = lines.get()
        if item is _DONE:
            finished += 1
        else:
            out.write(str(item))
            out.flush()


def _stream(container: Any, follow: bool, tail: int | None) -> Any:
    return container.logs(stream=True, follow=follow, tail=tail if tail is not None else "all")


def _copy(container: Any, out: TextIO, *, follow: bool, tail: int | None, prefix: bool) -> None:
    try:
        out.writelines(f"{container.name} | {line}" if prefix else line for line in _lines(_stream(container, follow, tail)))
    except docker.errors.NotFound:
        pass  # removed while we were reading


def _pump(container: Any, lines: queue.Queue[object], tail: int | None, prefix: bool) -> None:
    try:
        for line in _lines(_stream(container, True, tail)):
            lines.put(f"{container.name} | {line}" if prefix else line)
    except docker.errors.DockerException:
        pass
    finally:
        lines.put(_DONE)


def _lines(chunks: Any) -> Any:
    """Whole text lines from docker's byte chunks, which may split a line anywhere."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            yield line.decode("utf-8", "replace") + "\n"
    if pending:
        yield pending.decode("utf-8", "replace") + "\n"
