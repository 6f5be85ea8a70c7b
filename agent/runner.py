"""A pool of long-lived task processes, one per slot, each fed through its own pipe.

Why this shape:

- Processes, not threads: task functions are CPU-bound Python, and a task that segfaults or
  calls ``os._exit`` must take down only its own process.
- ``spawn``, never plain ``fork``: the agent runs paho's network thread, and forking a
  process with threads can copy a held lock into the child.
- One process per slot that lives across tasks, with a pipe: a tiny task costs two pipe
  messages, not a process start (~100 ms with spawn).
- A slot is only given work after its process said "ready", so module imports never eat
  into a task's time limit.

The runner has no threads of its own: the agent's main loop calls ``poll()``, which waits on
the pipes, the processes' sentinels and any extra file descriptors (the agent's wake-up
pipe), then reports what finished, what timed out (killed) and what crashed (the process is
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
import signal
import time
import traceback
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.defaults import MAX_ERROR_TEXT, PROCESS_RESTART_DELAY, PROCESS_START_TIMEOUT
from broker.defaults import MAX_PAYLOAD_BYTES
from broker.messages import Outcome, TaskError

log = logging.getLogger(__name__)

# Error types the runner itself reports (a task's own exceptions keep their class name).
TIMEOUT_ERROR = "Timeout"
CRASH_ERROR = "ProcessDied"
SHUTDOWN_ERROR = "Shutdown"
RESULT_ERROR = "UnserializableResult"
TOO_LARGE_ERROR = "ResultTooLarge"


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


def _clip(text: str, limit: int = MAX_ERROR_TEXT, keep_tail: bool = False) -> str:
    if len(text) <= limit:
        return text
    marker = "...[truncated]..."
    return marker + text[-(limit - len(marker)):] if keep_tail else text[: limit - len(marker)] + marker


def error_type_name(exc: BaseException) -> str:
    cls = type(exc)
    module = cls.__module__
    return cls.__qualname__ if module in ("builtins", "__main__") else f"{module}.{cls.__qualname__}"


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


def _child_main(conn: multiprocessing.connection.Connection, targets: Mapping[str, str], parent_pid: int) -> None:
    """Loop of a task process: receive (token, function, args), reply with the outcome."""
    from agent.tasks import resolve  # imported here: this runs in a fresh interpreter

    # Ctrl-C in a terminal reaches the whole process group: the agent decides what happens.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent(parent_pid)
    functions: dict[str, Callable[..., Any]] = {}
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        token, name, args = message
        started = time.perf_counter()
        try:
            func = functions.get(name)
            if func is None:
                func = functions[name] = resolve(targets[name])
            value = func(*args)
            elapsed = time.perf_counter() - started
            try:
                text = json.dumps(value, allow_nan=False, separators=(",", ":"))
            except (TypeError, ValueError, RecursionError) as exc:
                conn.send((token, "error", RESULT_ERROR,
                           f"{name} returned a {type(value).__name__}, which cannot be sent as JSON: {exc}", "", elapsed))
                continue
            if len(text) > MAX_PAYLOAD_BYTES:
                conn.send((token, "error", TOO_LARGE_ERROR,
                           f"{name} returned {len(text)} bytes of JSON; a result must fit {MAX_PAYLOAD_BYTES} bytes", "",
                           elapsed))
                continue
            conn.send((token, "ok", text, elapsed))
        except BaseException as exc:  # noqa: BLE001 - SystemExit from a task is its error too
            elapsed = time.perf_counter() - started
            # Start at the task's own frame: this loop is noise to the scientist reading it.
            tb = exc.__traceback__
            tb = tb.tb_next if tb is not None and tb.tb_next is not None else tb
            trace = "".join(traceback.format_exception(type(exc), exc, tb))
            conn.send((token, "error", error_type_name(exc)[:200], _clip(str(exc)), _clip(trace, keep_tail=True), elapsed))


# --------------------------------------------------------------------------- parent side
class SlotState(str, enum.Enum):
    STARTING = "starting"  # process started, not yet ready
    IDLE = "idle"  # ready for a job
    BUSY = "busy"  # running a job
    DEAD = "dead"  # process gone; restarted after a short delay


@dataclass
class _Slot:
    index: int
    state: SlotState = SlotState.DEAD
    process: Any = None  # multiprocessing.Process of the context in use
    conn: multiprocessing.connection.Connection | None = None
    job: Job | None = None
    token: int = 0
    since: float = 0.0  # when the current state began (runner clock)
    deadline: float = 0.0  # STARTING: start timeout; BUSY: task timeout; DEAD: restart time


class Runner:
    """``concurrency`` task processes running Jobs from a FIFO queue."""

    def __init__(
        self,
        targets: Mapping[str, str],
        concurrency: int,
        *,
        start_method: str = "spawn",
        clock: Callable[[], float] = time.monotonic,
        start_timeout: float = PROCESS_START_TIMEOUT,
        restart_delay: float = PROCESS_RESTART_DELAY,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if start_method == "fork":
            raise ValueError("plain fork is unsafe next to the MQTT network thread; use spawn or forkserver")
        self._targets = dict(targets)
        self._ctx: Any = multiprocessing.get_context(start_method)  # the stubs lack .Process
        self._clock = clock
        self._start_timeout = start_timeout
        self._restart_delay = restart_delay
        self._slots = [_Slot(i) for i in range(concurrency)]
        self._queue: collections.deque[Job] = collections.deque()
        self._tokens = 0
        self._started = False
        self.crashes = 0  # task processes that died, for logs and tests

    # -- state -----------------------------------------------------------------------------
    @property
    def concurrency(self) -> int:
        return len(self._slots)

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> list[Hashable]:
        return [s.job.key for s in self._slots if s.state is SlotState.BUSY and s.job is not None]

    @property
    def idle(self) -> bool:
        """True when no job is queued or running."""
        return not self._queue and not any(s.state is SlotState.BUSY for s in self._slots)

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
        """Queue a job; it runs as soon as a process is free. Unknown names are the caller's
        job to refuse (Registry.check): here they come back as an error."""
        self._queue.append(job)
        self._dispatch()

    def drop_queued(self) -> list[Job]:
        """Remove and return the jobs not started yet (draining)."""
        jobs = list(self._queue)
        self._queue.clear()
        return jobs

    def poll(self, timeout: float, wake: Iterable[int] = ()) -> list[Finished]:
        """Wait up to ``timeout`` seconds for something to happen (a job finishing, a process
        dying, a deadline, or a readable ``wake`` descriptor); return the jobs that ended."""
        finished: list[Finished] = []
        self._dispatch()
        now = self._clock()
        deadlines = [s.deadline for s in self._slots if s.state is not SlotState.IDLE]
        wait_for = max(0.0, min([timeout, *(d - now for d in deadlines)]))
        objects: list[Any] = list(wake)
        for slot in self._slots:
            if slot.conn is not None:
                objects.append(slot.conn)
            if slot.process is not None and slot.state is not SlotState.DEAD:
                objects.append(slot.process.sentinel)
        if objects:
            multiprocessing.connection.wait(objects, wait_for)
        elif wait_for > 0:
            time.sleep(wait_for)
        for slot in self._slots:
            self._service(slot, finished)
        self._dispatch()
        return finished

    def kill_running(self, reason: str) -> list[Finished]:
        """Kill every running job (grace period over); each is reported ``crashed`` with
        error type Shutdown. The pool is left stopped."""
        finished: list[Finished] = []
        now = self._clock()
        for slot in self._slots:
            if slot.state is SlotState.BUSY and slot.job is not None:
                finished.append(Finished(slot.job.key, Outcome.CRASHED,
                                         error=TaskError(SHUTDOWN_ERROR, reason), elapsed=now - slot.since))
            self._kill(slot)
        return finished

    def stop(self, timeout: float = 2.0) -> None:
        """Stop every process: idle ones are asked to exit, the rest are killed."""
        deadline = time.monotonic() + timeout
        for slot in self._slots:
            if slot.state is SlotState.IDLE and slot.conn is not None:
                try:
                    slot.conn.send(None)
                except OSError:
                    pass
        for slot in self._slots:
            if slot.process is not None and slot.state is SlotState.IDLE:
                slot.process.join(max(0.0, deadline - time.monotonic()))
            self._kill(slot)
        self._queue.clear()

    # -- internals -----------------------------------------------------------------------------
    def _spawn(self, slot: _Slot) -> None:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=_child_main, args=(child_conn, self._targets, os.getpid()),
            name=f"dockercomp-task-{slot.index}", daemon=True,
        )
        try:
            process.start()
        except OSError as exc:
            parent_conn.close()
            child_conn.close()
            log.error("cannot start task process %d: %s; retrying in %.0f s", slot.index, exc, self._restart_delay)
            self._set(slot, SlotState.DEAD, self._restart_delay)
            return
        child_conn.close()
        slot.process, slot.conn, slot.job = process, parent_conn, None
        self._set(slot, SlotState.STARTING, self._start_timeout)

    def _set(self, slot: _Slot, state: SlotState, timeout: float | None = None) -> None:
        """Enter ``state``; its deadline is ``timeout`` seconds away (None: no deadline)."""
        slot.state = state
        slot.since = self._clock()
        slot.deadline = slot.since + timeout if timeout is not None else float("inf")

    def _dispatch(self) -> None:
        now = self._clock()
        for slot in self._slots:
            if slot.state is SlotState.DEAD and now >= slot.deadline and self._started:
                self._spawn(slot)
        for slot in self._slots:
            if not self._queue:
                return
            if slot.state is not SlotState.IDLE or slot.conn is None:
                continue
            job = self._queue.popleft()
            self._tokens += 1
            slot.token, slot.job = self._tokens, job
            try:
                slot.conn.send((slot.token, job.function, job.args))
            except (OSError, ValueError) as exc:
                # Broken pipe: the process died after saying ready. Give the job back.
                self._queue.appendleft(job)
                slot.job = None
                log.warning("task process %d is gone (%s); starting a new one", slot.index, exc)
                self._kill(slot)
                self._set(slot, SlotState.DEAD, 0.0)
                continue
            self._set(slot, SlotState.BUSY, job.timeout)
            log.debug("%s started in task process %d", job.name, slot.index)

    def _service(self, slot: _Slot, finished: list[Finished]) -> None:
        if slot.state is SlotState.DEAD:
            return
        # Read replies first: a process may answer and die right after.
        while slot.conn is not None:
            try:
                if not slot.conn.poll():
                    break
                message = slot.conn.recv()
            except (EOFError, OSError):
                break
            self._on_message(slot, message, finished)
        now = self._clock()
        if slot.process is not None and slot.process.exitcode is not None:
            self._on_death(slot, finished, now)
        elif now >= slot.deadline:
            if slot.state is SlotState.BUSY and slot.job is not None:
                job = slot.job
                self._kill(slot)
                log.info("%s ran past its %g s limit; killed", job.name, job.timeout)
                finished.append(Finished(job.key, Outcome.TIMEOUT, elapsed=now - slot.since, error=TaskError(
                    TIMEOUT_ERROR, f"{job.function} ran longer than its {job.timeout:g} s time limit and was killed")))
                self._set(slot, SlotState.DEAD, 0.0)
            elif slot.state is SlotState.STARTING:
                log.error("task process %d did not start within %.0f s; starting another", slot.index, self._start_timeout)
                self._kill(slot)
                self._set(slot, SlotState.DEAD, self._restart_delay)

    def _on_message(self, slot: _Slot, message: tuple[Any, ...], finished: list[Finished]) -> None:
        if message[0] == "ready":
            if slot.state is SlotState.STARTING:
                self._set(slot, SlotState.IDLE)
            return
        token, kind = message[0], message[1]
        if slot.state is not SlotState.BUSY or slot.job is None or token != slot.token:
            log.warning("task process %d sent a reply for no running job; ignored", slot.index)
            return
        job = slot.job
        if kind == "ok":
            _, _, text, elapsed = message
            finished.append(Finished(job.key, Outcome.OK, value=json.loads(text), elapsed=elapsed))
        else:
            _, _, type_name, text, trace, elapsed = message
            finished.append(Finished(job.key, Outcome.ERROR, error=TaskError(type_name, text, trace), elapsed=elapsed))
        slot.job = None
        self._set(slot, SlotState.IDLE)

    def _on_death(self, slot: _Slot, finished: list[Finished], now: float) -> None:
        exitcode = slot.process.exitcode if slot.process is not None else None
        how = describe_exit(exitcode)
        self.crashes += 1
        if slot.state is SlotState.BUSY and slot.job is not None:
            job = slot.job
            log.warning("%s: its process %s; starting a new one", job.name, how)
            finished.append(Finished(job.key, Outcome.CRASHED, elapsed=now - slot.since, error=TaskError(
                CRASH_ERROR, f"the process running {job.function} {how}")))
            self._kill(slot)
            self._set(slot, SlotState.DEAD, 0.0)
        else:
            # Died between tasks or while starting: wait a little, so a process that cannot
            # even start (broken install) is retried at a calm pace.
            log.error("task process %d %s while %s; restarting in %.3g s", slot.index, how, slot.state.value,
                      self._restart_delay)
            self._kill(slot)
            self._set(slot, SlotState.DEAD, self._restart_delay)

    def _kill(self, slot: _Slot) -> None:
        process, conn = slot.process, slot.conn
        slot.process, slot.conn, slot.job = None, None, None
        if conn is not None:
            conn.close()
        if process is not None:
            if process.exitcode is None:
                process.kill()
            process.join(5.0)
            try:
                process.close()
            except ValueError:
                pass
