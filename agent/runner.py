"""A pool of long-lived task processes, one per slot, each fed through its own socket pair.

Why this shape:

- Processes, not threads: task functions are CPU-bound Python, and a task that segfaults or
  calls ``os._exit`` must take down only its own process.
- ``spawn``, never plain ``fork``: the agent runs paho's network thread, and forking a
  process with threads can copy a held lock into the child.
- One process per slot that lives across tasks: a tiny task costs two messages, not a
  process start (~100 ms with spawn).
- A slot is only given work after its process said "ready", so module imports never eat
  into a task's time limit.
- With ``prefetch``, a busy process is sent up to that many more tasks, in one write, which it
  runs one after the other without waiting for the agent: a process that is computing is not
  woken by each write, and one that finishes starts the next task at once. It answers every
  task as it finishes, in order, so the answer to one task marks the start of the next: each
  time limit runs from then. When a process dies or is killed, the task it was running is
  the first unanswered one; the tasks behind it never started and go back to the queue.
- Tasks taken back by ``drop_queued`` (draining) are skipped by the process: it checks a
  number shared with the agent before it starts each task, and answers "skipped".

The runner has no threads of its own: the agent's main loop calls ``poll()``, which waits on
one selector (sockets, process sentinels, and the agent's wake-up pipe, registered once),
then reports what finished, what timed out (killed) and what crashed (the process is
replaced and the pool carries on).
"""

from __future__ import annotations

import collections
import ctypes
import enum
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dockercomp.agent.defaults import PROCESS_RESTART_DELAY, PROCESS_START_TIMEOUT, SEND_AHEAD_BYTES
from dockercomp.agent.process import RESULT_ERROR, SKIP_NOTHING, TOO_LARGE_ERROR, frame, parse, task_process_main
from dockercomp.broker.messages import Outcome, TaskError

__all__ = ["CRASH_ERROR", "RESULT_ERROR", "SHUTDOWN_ERROR", "TIMEOUT_ERROR", "TOO_LARGE_ERROR", "Finished", "Job",
           "Runner", "SlotState", "describe_exit"]

log = logging.getLogger(__name__)

# Error types the runner itself reports (a task's own exceptions keep their class name;
# RESULT_ERROR and TOO_LARGE_ERROR come from the task process).
TIMEOUT_ERROR = "Timeout"
CRASH_ERROR = "ProcessDied"
SHUTDOWN_ERROR = "Shutdown"

# Bytes asked of the socket per read: a batch of replies, or a large result in a few reads
# (a buffer over 128 KiB would be mapped and unmapped by malloc on every read).
_READ_SIZE = 64 * 1024


@dataclass(frozen=True)
class Job:
    """One function call to run in a task process."""

    key: Hashable  # the caller's identity for the job, e.g. (task_id, attempt)
    function: str
    args: list[Any] = field(default_factory=list)
    timeout: float = 60.0
    label: str = ""  # how logs name it, e.g. "task 42 attempt 1"

    @property
    def name(self) -> str:
        return f"{self.label or self.key} ({self.function})"


@dataclass(frozen=True)
class Finished:
    """The outcome of one Job."""

    key: Hashable
    outcome: Outcome
    value: Any = None
    error: TaskError | None = None
    elapsed: float = 0.0


def describe_exit(exitcode: int | None) -> str:
    """'killed by signal SIGSEGV' or 'exited with code 3', for a crashed result."""
    if exitcode is None:
        return "stopped responding"
    if exitcode < 0:
        try:
            return f"was killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


# --------------------------------------------------------------------------- parent side
class SlotState(str, enum.Enum):
    STARTING = "starting"  # process started, not yet ready
    IDLE = "idle"  # ready for a job
    BUSY = "busy"  # running a job (and maybe holding more), or finishing one taken back
    DEAD = "dead"  # process gone; restarted after a short delay


# One job sent to a process: (token, job, bytes of its batch still unread by the process).
_Sent = tuple[int, Job, int]


@dataclass
class _Slot:
    index: int
    state: SlotState = SlotState.DEAD
    process: Any = None  # multiprocessing.Process of the context in use
    sock: socket.socket | None = None  # agent's end; None once the process closed its end
    skip_from: Any = None  # shared c_longlong: the process skips tokens from this one on
    sent: collections.deque[_Sent] = field(default_factory=collections.deque)  # head runs when BUSY
    dropped: dict[int, Job] = field(default_factory=dict)  # taken back, not yet answered (token order)
    pending: bytes = b""  # a partly received message
    ahead: int = 0  # bytes written for jobs the process has not read yet
    since: float = 0.0  # when the current state or job began (runner clock)
    deadline: float = 0.0  # STARTING: start timeout; BUSY: task timeout; DEAD: restart time


class Runner:
    """``concurrency`` task processes running Jobs from a FIFO queue; each process may hold
    ``prefetch`` more jobs beyond the one it runs."""

    def __init__(
        self,
        targets: Mapping[str, str],
        concurrency: int,
        *,
        prefetch: int = 0,
        start_method: str = "spawn",
        clock: Callable[[], float] = time.monotonic,
        start_timeout: float = PROCESS_START_TIMEOUT,
        restart_delay: float = PROCESS_RESTART_DELAY,
        send_ahead_bytes: int = SEND_AHEAD_BYTES,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if prefetch < 0:
            raise ValueError("prefetch must not be negative")
        if start_method == "fork":
            raise ValueError("plain fork is unsafe next to the MQTT network thread; use spawn or forkserver")
        self._targets = dict(targets)
        self._ctx: Any = multiprocessing.get_context(start_method)  # the stubs lack .Process
        self._clock = clock
        self._start_timeout = start_timeout
        self._restart_delay = restart_delay
        self._prefetch = prefetch
        self._send_ahead_bytes = send_ahead_bytes
        self._slots = [_Slot(i) for i in range(concurrency)]
        self._queue: collections.deque[Job] = collections.deque()
        self._tokens = 0
        self._started = False
        # Registered once per process (and per wake-up descriptor), not rebuilt per poll.
        self._selector = selectors.DefaultSelector()
        self._wake: tuple[Any, ...] = ()
        self.woken: list[Any] = []  # the wake-up descriptors (``wake``) readable in the last poll
        self.crashes = 0  # task processes that died, for logs and tests

    # -- state -----------------------------------------------------------------------------
    @property
    def concurrency(self) -> int:
        return len(self._slots)

    @property
    def prefetch(self) -> int:
        return self._prefetch

    @property
    def queued(self) -> int:
        """Jobs not started yet: waiting here or sent ahead to a busy process."""
        return len(self._queue) + sum(len(s.sent) - 1 for s in self._slots if s.sent)

    @property
    def running(self) -> list[Hashable]:
        return [s.sent[0][1].key for s in self._slots if s.sent]

    @property
    def idle(self) -> bool:
        """True when no job is queued or running."""
        return not self._queue and not any(s.sent or s.dropped for s in self._slots)

    @property
    def ready_processes(self) -> int:
        return sum(1 for s in self._slots if s.state in (SlotState.IDLE, SlotState.BUSY))

    def pids(self) -> list[int]:
        return [s.process.pid for s in self._slots if s.process is not None and s.process.pid is not None]

    # -- control -----------------------------------------------------------------------------
    def start(self) -> None:
        if self._started:
            return
        self._started = True
        for slot in self._slots:
            self._spawn(slot)

    def submit(self, job: Job) -> None:
        """Queue a job; the next ``poll`` hands it to a process (several submitted in a row go
        out together). Unknown names are the caller's job to refuse (Registry.check): here
        they come back as an error."""
        self._queue.append(job)

    def drop_queued(self) -> list[Job]:
        """Remove and return the jobs not started yet (draining), those waiting here and those
        sent ahead to a process, which skips them. One that a process started just before it
        heard of this is answered like any other."""
        taken: list[tuple[int, Job]] = []
        for slot in self._slots:
            if len(slot.sent) < 2:
                continue
            head = slot.sent.popleft()
            for token, job, _ in slot.sent:
                slot.dropped[token] = job
                taken.append((token, job))
            slot.skip_from.value = min(slot.skip_from.value, slot.sent[0][0])
            slot.sent.clear()
            slot.sent.append(head)
            slot.ahead = 0
        jobs = [job for _, job in sorted(taken, key=lambda pair: pair[0])] + list(self._queue)
        self._queue.clear()
        return jobs

    def poll(self, timeout: float, wake: Iterable[Any] = (),
             before_wait: Callable[[], None] | None = None) -> list[Finished]:
        """Wait up to ``timeout`` seconds for something to happen (a job finishing, a process
        dying, a deadline, or a readable ``wake`` descriptor or socket); return the jobs that
        ended. ``before_wait`` is called once queued jobs went to their processes, right
        before the wait: what it sends costs those jobs no time."""
        finished: list[Finished] = []
        # Watch first: a descriptor given up (the broker's socket, closed when the connection
        # was lost) leaves the selector before a process spawned below may reuse its number.
        self._watch(tuple(wake))
        self._dispatch(finished)
        now = self._clock()
        wait_for = timeout
        for slot in self._slots:
            wait_for = min(wait_for, slot.deadline - now)
        if finished:
            wait_for = 0.0
        if before_wait is not None:
            before_wait()
        events = self._selector.select(None if wait_for == float("inf") else max(0.0, wait_for))
        woken: list[Any] = []
        exited: list[_Slot] = []
        for key, _ in events:
            kind, slot = key.data
            if kind == "sock":
                self._read(slot, finished)
            elif kind == "exit":
                exited.append(slot)
            else:
                woken.append(key.fileobj)
        self.woken = woken
        for slot in exited:
            if slot.process is not None:
                self._on_death(slot, finished)
        self._check_deadlines(finished)
        self._dispatch(finished)
        return finished

    def kill_running(self, reason: str) -> list[Finished]:
        """Kill every running job (grace period over); each is reported ``released`` (handed
        back to the coordinator without using an attempt) with error type Shutdown. Jobs not
        started are not reported. The pool is left stopped."""
        finished: list[Finished] = []
        self._started = False  # nothing is restarted from here on
        for slot in self._slots:
            if slot.sock is not None:
                self._read(slot, finished)  # answers already given are reported as they are
            now = self._clock()
            if slot.sent:
                job = slot.sent[0][1]
                finished.append(Finished(job.key, Outcome.RELEASED,
                                         error=TaskError(SHUTDOWN_ERROR, reason), elapsed=now - slot.since))
            self._kill(slot)
            self._set(slot, SlotState.DEAD, None)
        return finished

    def stop(self, timeout: float = 2.0) -> None:
        """Stop every process: idle ones are asked to exit, the rest are killed."""
        self._started = False
        deadline = time.monotonic() + timeout
        for slot in self._slots:
            if slot.state is SlotState.IDLE and slot.sock is not None:
                try:
                    self._write(slot, frame(None))
                except OSError:
                    pass
        for slot in self._slots:
            if slot.process is not None and slot.state is SlotState.IDLE:
                slot.process.join(max(0.0, deadline - time.monotonic()))
            self._kill(slot)
            self._set(slot, SlotState.DEAD, None)
        self._queue.clear()
        self._watch(())  # the caller may close those descriptors now

    # -- processes -----------------------------------------------------------------------------
    def _spawn(self, slot: _Slot) -> None:
        parent_sock, child_sock = socket.socketpair()
        child_conn = multiprocessing.connection.Connection(child_sock.detach())
        skip_from = self._ctx.RawValue(ctypes.c_longlong, SKIP_NOTHING)
        process = self._ctx.Process(
            target=task_process_main, args=(child_conn, self._targets, os.getpid(), skip_from),
            name=f"dockercomp-task-{slot.index}", daemon=True,
        )
        try:
            process.start()
        except OSError as exc:
            parent_sock.close()
            child_conn.close()
            log.error("cannot start task process %d: %s; retrying in %.0f s", slot.index, exc, self._restart_delay)
            self._set(slot, SlotState.DEAD, self._restart_delay)
            return
        child_conn.close()
        slot.process, slot.sock, slot.skip_from = process, parent_sock, skip_from
        slot.pending, slot.ahead = b"", 0
        self._selector.register(parent_sock, selectors.EVENT_READ, ("sock", slot))
        self._selector.register(process.sentinel, selectors.EVENT_READ, ("exit", slot))
        self._set(slot, SlotState.STARTING, self._start_timeout)

    def _kill(self, slot: _Slot) -> None:
        """Stop the slot's process and forget what it held (callers take what they need first)."""
        process, sock = slot.process, slot.sock
        slot.process, slot.sock, slot.skip_from = None, None, None
        slot.sent.clear()
        slot.dropped.clear()
        slot.pending, slot.ahead = b"", 0
        if sock is not None:
            self._unregister(sock)
            sock.close()
        if process is not None:
            self._unregister(process.sentinel)
            if process.exitcode is None:
                process.kill()
            process.join(5.0)
            try:
                process.close()
            except ValueError:
                pass

    def _unregister(self, fileobj: Any) -> None:
        try:
            self._selector.unregister(fileobj)
        except (KeyError, ValueError):
            pass

    def _watch(self, wake: tuple[Any, ...]) -> None:
        if wake == self._wake:
            return
        for fd in self._wake:
            self._unregister(fd)
        for fd in wake:
            self._selector.register(fd, selectors.EVENT_READ, ("wake", None))
        self._wake = wake

    def _set(self, slot: _Slot, state: SlotState, timeout: float | None = None) -> None:
        """Enter ``state``; its deadline is ``timeout`` seconds away (None: no deadline)."""
        slot.state = state
        slot.since = self._clock()
        slot.deadline = slot.since + timeout if timeout is not None else float("inf")

    # -- sending -----------------------------------------------------------------------------------
    @staticmethod
    def _write(slot: _Slot, data: bytes) -> None:
        """Send one framed message (``process.frame``)."""
        if slot.sock is None:
            raise OSError("the process closed its end")
        slot.sock.sendall(data)

    def _dispatch(self, finished: list[Finished]) -> None:
        if not self._started:
            return
        now = self._clock()
        for slot in self._slots:
            if slot.state is SlotState.DEAD and now >= slot.deadline:
                self._spawn(slot)
        if not self._queue:
            return
        # Idle processes first. Only when every process is running something are more sent
        # ahead, to the least loaded first, up to 1 + prefetch each: a task written ahead to a
        # busy process while another is idle or starting would wait for nothing.
        ready = [s for s in self._slots if s.sock is not None and not s.dropped
                 and (s.state is SlotState.IDLE or (s.state is SlotState.BUSY and len(s.sent) <= self._prefetch))]
        batches: dict[int, list[Job]] = {}
        for slot in ready:
            if not self._queue:
                break
            if slot.state is SlotState.IDLE:
                batches[slot.index] = [self._queue.popleft()]
        all_busy = all(s.state is SlotState.BUSY or s.index in batches for s in self._slots)
        for level in range(1, 1 + self._prefetch if all_busy else 1):
            for slot in ready:
                if not self._queue:
                    break
                batch = batches.setdefault(slot.index, [])
                if len(slot.sent) + len(batch) <= level:
                    batch.append(self._queue.popleft())
        for slot in ready:
            jobs = batches.get(slot.index)
            if jobs:
                self._send(slot, jobs, finished)

    def _send(self, slot: _Slot, batch: list[Job], finished: list[Finished]) -> None:
        busy = bool(slot.sent)
        first = self._tokens + 1
        message = [(first + i, job.function, job.args) for i, job in enumerate(batch)]
        data = frame(message)
        # Written to a busy process, a batch waits in the socket until the process is done with
        # what it holds. Keep that small, or a full socket would block this loop.
        while busy and slot.ahead + len(data) > self._send_ahead_bytes:
            keep = len(message) // 2
            self._queue.extendleft(reversed(batch[keep:]))
            if keep == 0:
                return
            del batch[keep:], message[keep:]
            data = frame(message)
        try:
            self._write(slot, data)
        except OSError as exc:
            # Broken pipe: the process died after saying ready. Give the jobs back.
            self._queue.extendleft(reversed(batch))
            log.warning("task process %d is gone (%s); starting a new one", slot.index, exc)
            self._on_death(slot, finished)
            return
        self._tokens += len(batch)
        debug = log.isEnabledFor(logging.DEBUG)
        for i, job in enumerate(batch):
            # The first job of a batch written ahead carries its size until the process reads it.
            slot.sent.append((first + i, job, len(data) if busy and i == 0 else 0))
            if debug and (busy or i > 0):
                log.debug("%s queued in task process %d", job.name, slot.index)
        if busy:
            slot.ahead += len(data)
        else:
            self._started_next(slot)

    # -- receiving ---------------------------------------------------------------------------------
    def _read(self, slot: _Slot, finished: list[Finished], to_end: bool = False) -> None:
        """Read what the process wrote (all of it with ``to_end``: it is dead) and handle it."""
        sock = slot.sock
        if sock is None:
            return
        chunks = [slot.pending] if slot.pending else []
        eof = False
        while True:
            try:
                data = sock.recv(_READ_SIZE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                eof = True
                break
            chunks.append(data)
            if len(data) < _READ_SIZE and not to_end:
                break  # most likely all there was; the selector reports the rest
        if eof:
            # The process closed its end: it is exiting, and its sentinel says how.
            self._unregister(sock)
            sock.close()
            slot.sock = None
        buffer = b"".join(chunks) if len(chunks) != 1 else chunks[0]
        pos = 0
        for message, pos in parse(buffer):
            self._on_message(slot, message, finished)
        slot.pending = buffer[pos:] if pos < len(buffer) else b""

    def _on_message(self, slot: _Slot, message: tuple[Any, ...], finished: list[Finished]) -> None:
        token = message[0]
        if token == "ready":
            if slot.state is SlotState.STARTING:
                self._set(slot, SlotState.IDLE)
            return
        if slot.sent and slot.sent[0][0] == token:
            job = slot.sent.popleft()[1]
            finished.append(self._outcome(job, message))
            self._started_next(slot)
        elif token in slot.dropped:
            job = slot.dropped.pop(token)
            if message[1] != "skipped":  # it had started before the process heard it was taken back
                finished.append(self._outcome(job, message))
            if not slot.sent:
                self._started_next(slot)
        else:
            log.warning("task process %d sent a reply for no running job; ignored", slot.index)

    @staticmethod
    def _outcome(job: Job, message: tuple[Any, ...]) -> Finished:
        if message[1] == "ok":
            _, _, text, elapsed = message
            return Finished(job.key, Outcome.OK, value=json.loads(text), elapsed=elapsed)
        _, _, type_name, text, trace, elapsed = message
        return Finished(job.key, Outcome.ERROR, error=TaskError(type_name, text, trace), elapsed=elapsed)

    def _started_next(self, slot: _Slot) -> None:
        """The process just finished something (or was given its first job): the next job it
        holds starts now, and so does its time limit."""
        if slot.sent:
            _, job, charge = slot.sent[0]
            slot.ahead -= charge  # the process read that batch when it started this job
            self._set(slot, SlotState.BUSY, job.timeout)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s started in task process %d", job.name, slot.index)
        elif slot.dropped:
            # The next one was taken back; the process may have started it before it knew.
            self._set(slot, SlotState.BUSY, next(iter(slot.dropped.values())).timeout)
        else:
            if slot.skip_from is not None and slot.skip_from.value != SKIP_NOTHING:
                slot.skip_from.value = SKIP_NOTHING  # before any new job is written
            self._set(slot, SlotState.IDLE)

    # -- deadlines, timeouts and deaths ------------------------------------------------------------
    def _check_deadlines(self, finished: list[Finished]) -> None:
        now = self._clock()
        for slot in self._slots:
            if now < slot.deadline:
                continue
            if slot.state is SlotState.BUSY:
                self._on_timeout(slot, finished)
            elif slot.state is SlotState.STARTING:
                log.error("task process %d did not start within %.0f s; starting another", slot.index,
                          self._start_timeout)
                self._kill(slot)
                self._set(slot, SlotState.DEAD, self._restart_delay)

    def _on_timeout(self, slot: _Slot, finished: list[Finished]) -> None:
        self._read(slot, finished)  # it may have answered since the selector looked
        if slot.state is not SlotState.BUSY or self._clock() < slot.deadline:
            return
        victim = slot.sent[0] if slot.sent else None
        process = slot.process
        if process is not None:
            if process.exitcode is None:
                process.kill()
            process.join(5.0)
        self._read(slot, finished, to_end=True)  # answers written right before the kill
        now = self._clock()
        if victim is not None and slot.sent and slot.sent[0] is victim:
            slot.sent.popleft()
            job = victim[1]
            log.info("%s ran past its %g s limit; killed", job.name, job.timeout)
            finished.append(Finished(job.key, Outcome.TIMEOUT, elapsed=now - slot.since, error=TaskError(
                TIMEOUT_ERROR, f"{job.function} ran longer than its {job.timeout:g} s time limit and was killed")))
        elif victim is None:
            log.info("task process %d ran a task taken back past its time limit; killed", slot.index)
        # Whatever it held behind that job never ran (or was cut short by this kill): again.
        self._requeue(slot, [job for _, job, _ in slot.sent])
        self._kill(slot)
        self._set(slot, SlotState.DEAD, 0.0)

    def _on_death(self, slot: _Slot, finished: list[Finished]) -> None:
        process = slot.process
        if process is not None and process.exitcode is None:
            process.join(1.0)  # its sentinel fired: it is exiting
        exitcode = process.exitcode if process is not None else None
        self._read(slot, finished, to_end=True)  # it may have answered and died right after
        now = self._clock()
        how = describe_exit(exitcode)
        self.crashes += 1
        if slot.sent:
            job = slot.sent.popleft()[1]
            log.warning("%s: its process %s; starting a new one", job.name, how)
            finished.append(Finished(job.key, Outcome.CRASHED, elapsed=now - slot.since, error=TaskError(
                CRASH_ERROR, f"the process running {job.function} {how}")))
            self._requeue(slot, [job for _, job, _ in slot.sent])
            self._kill(slot)
            self._set(slot, SlotState.DEAD, 0.0)
        else:
            # Died between tasks or while starting: wait a little, so a process that cannot
            # even start (broken install) is retried at a calm pace.
            log.error("task process %d %s while %s; restarting in %.3g s", slot.index, how, slot.state.value,
                      self._restart_delay)
            self._kill(slot)
            self._set(slot, SlotState.DEAD, self._restart_delay)

    def _requeue(self, slot: _Slot, jobs: list[Job]) -> None:
        if jobs:
            log.info("%d task(s) waiting in task process %d go back to the queue", len(jobs), slot.index)
            self._queue.extendleft(reversed(jobs))
