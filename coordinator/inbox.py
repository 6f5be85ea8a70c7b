"""The engine's inbox: what the broker connection delivers, and the engine's one wait.

The engine adopts its connection (``Transport.adopt``, broker/lending.py). While it is up, the
engine thread reads it in this wait: a result reaches the step that handles it without a
hand-over from the network thread (a wake-up and a switch of the GIL, which the network thread
also held while the engine's SQLite statements released it), and the acknowledgements of what
a step read leave with its publishes, after its commit. While it is not lent (connecting,
reconnecting, or a transport that lends nothing, like the in-memory broker), the thread that
delivers posts here, and a byte on a pipe ends the wait.
"""

from __future__ import annotations

import collections
import os
import select
import time
from typing import Any, Generic, TypeVar

from dockercomp.broker.connection import Transport

T = TypeVar("T")


class Inbox(Generic[T]):
    """Items from any thread; ``wait`` and ``take`` from the engine's thread only."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self._items: collections.deque[T] = collections.deque()  # append and popleft are atomic
        self._r = self._w = -1
        # Up while the engine waits: a poster writes a wake-up byte only then (one per wait,
        # not one per message). Set before the engine looks at the items, read after a poster
        # appended: one of the two sees the other.
        self._sleeping = False

    def open(self) -> None:
        """The wake-up pipe, made by the first wait: an engine never run holds no descriptor."""
        if self._r < 0:
            self._r, self._w = os.pipe()
            os.set_blocking(self._r, False)
            os.set_blocking(self._w, False)

    def close(self) -> None:
        r, w, self._r, self._w = self._r, self._w, -1, -1
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)

    def put(self, item: T) -> None:
        """Any thread (the reading one, the network thread, a memory broker's publisher)."""
        self._items.append(item)
        if self._sleeping:
            self.wake()

    def wake(self) -> None:
        """End the engine's wait (a stop request, the connection lent to it); signal-safe."""
        if self._w >= 0:
            try:
                os.write(self._w, b"\0")
            except OSError:  # full: the engine is awake anyway; closed: it has stopped
                pass

    def __len__(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def wait(self, timeout: float, *, until_item: bool = True) -> None:
        """Wait up to ``timeout`` s, reading the connection when it is lent (what it reads is
        put here), until a wake-up (a stop request, the connection lent or lost) or the end
        of ``timeout``. A read that brought only acknowledgements waits on: at window 1 the
        PUBACK of each task sent would otherwise cost a whole empty step, on a core the agent
        needs. ``until_item``: something waiting to be taken ends it too; False: items are not
        being taken (the engine's retry after a database error), only a wake-up ends it."""
        deadline = time.monotonic() + max(0.0, timeout)
        while not self._wait_once(timeout, until_item) and not (until_item and self._items):
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                return

    def _wait_once(self, timeout: float, until_item: bool) -> bool:
        """One poll and the reading of what it found; True when a wake-up (or a closed socket)
        ended it: the caller looks at its state again."""
        transport = self.transport
        transport.write_pending()  # acknowledgements queued by the last read, if any went unsent
        self.open()
        watched = (*transport.waitables(), self._r)
        self._sleeping = True
        try:
            if until_item and self._items:
                timeout = 0.0
            try:
                # poll, not select: no FD_SETSIZE limit on the descriptor numbers of a process
                # that holds many (a test run, a coordinator beside other services).
                poller = select.poll()
                by_fd: dict[int, Any] = {}
                for waitable in watched:
                    fd = waitable if isinstance(waitable, int) else waitable.fileno()
                    by_fd[fd] = waitable
                    poller.register(fd, select.POLLIN)
                ready = [by_fd[fd] for fd, _ in poller.poll(max(0.0, timeout) * 1000)]
            except (OSError, ValueError):
                # The socket was closed under us (a dropped connection): reading it finds that,
                # and hands the connection back to the network thread, which reconnects.
                ready = list(watched)
        finally:
            self._sleeping = False
        woken = self._r in ready
        if woken:
            try:
                while os.read(self._r, 4096):
                    pass
            except OSError:  # drained (EAGAIN)
                pass
        transport.pump(ready)
        return woken

    def take(self, limit: int) -> list[T]:
        """Up to ``limit`` items, oldest first, without waiting."""
        items: list[T] = []
        pop = self._items.popleft
        try:
            while len(items) < limit:
                items.append(pop())
        except IndexError:
            pass
        return items
