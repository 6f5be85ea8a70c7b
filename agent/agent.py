"""The worker agent: takes tasks from its task topic, runs them in the Runner, sends results.

Threads and who does what:

- paho's network thread (inside MqttConnection) connects, then lends the connection to the
  main thread, which reads and writes it in its own wait (``adopt``/``pump``) until it is lost.
  Whichever thread reads only *enqueues*: incoming messages and connection changes go to the
  inbox (from the network thread with a byte on the wake-up pipe, which ends the main loop's
  wait). The one exception is presence: the online presence is published from ``on_connect``
  and the will is built in ``will_factory``, both on that thread right before/after the
  CONNECT, so a presence always carries the sequence number of the connection it belongs to.
- Signal handlers only count signals or set the pause flag (the wake-up fd, set with ``signal.set_wakeup_fd``,
  ends the wait).
- The main thread (``run``) decodes tasks, feeds the runner, publishes results, writes the
  health file and drives shutdown.

Presence life cycle: before each connection attempt ``seq = max(seq + 1, now_us)``, and the
will (retained offline, reason ``lost``) carries it; on CONNACK the retained online presence
carries the same seq; a pause publishes ``paused`` and a resume ``online`` again, same seq
(agent/pause.py); on a drained shutdown a retained offline presence with reason
``shutdown``, then a clean DISCONNECT (no will).
"""

from __future__ import annotations

import collections
import logging
import math
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Hashable
from types import FrameType
from typing import Any

from dockercomp.agent.defaults import CLOSE_FLUSH_SECONDS, HEALTH_INTERVAL_SECONDS, MAX_QUEUED_TASKS
from dockercomp.agent.health import Health, remove_health, write_health
from dockercomp.agent.intake import TaskIntake
from dockercomp.agent.liveness import Heartbeat
from dockercomp.agent.pause import LoadWatch, Pauser
from dockercomp.agent.results import ResultSender
from dockercomp.agent.runner import Finished, Runner
from dockercomp.agent.settings import AgentSettings, package_version
from dockercomp.agent.state import RELEASED_ERROR, AgentState, TaskKey
from dockercomp.agent.tasks import Registry
from dockercomp.broker.connection import MqttConnection, Transport, Will
from dockercomp.broker.errors import BrokerError
from dockercomp.broker.messages import OfflineReason, Outcome, Presence, PresenceState, Task, TaskError
from dockercomp.broker.topics import Topics

log = logging.getLogger(__name__)

class Agent(TaskIntake, ResultSender):
    """One worker: ``Agent(settings, Registry.load()).run()`` until signalled. Incoming tasks are
    handled in intake.py, outgoing results in results.py (mixins over this object's state)."""

    def __init__(
        self,
        settings: AgentSettings,
        registry: Registry,
        *,
        transport: Transport | None = None,
        runner: Runner | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        now_ns: Callable[[], int] = time.time_ns,
        health_interval: float = HEALTH_INTERVAL_SECONDS,
        max_queued: int = MAX_QUEUED_TASKS,
        load_watch: LoadWatch | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.ref = settings.worker
        self.topics = Topics(settings.broker.root)
        self.task_topic = self.topics.tasks(self.ref)
        self.result_topic = self.topics.results(self.ref)
        self.presence_topic = self.topics.presence(self.ref)
        self.rebirth_topic = self.topics.coordinator_rebirth
        self.transport = transport or MqttConnection(settings.broker, settings.client_id)
        # The worker's prefetch, spread over its task processes: each may hold its share of
        # tasks beyond the one it runs, so it starts the next without waiting for this loop.
        per_process = math.ceil(settings.prefetch / settings.concurrency)
        self.runner = runner or Runner(registry.targets, settings.concurrency, prefetch=per_process, clock=clock)
        self._clock, self._wall, self._now_ns = clock, wall, now_ns
        self._health_interval = min(health_interval, max(0.5, settings.keepalive / 2))
        self._max_queued = max_queued
        self.started = wall()
        self.state = AgentState.STARTING
        self.version = package_version()

        self._inbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._wake_fds = (self._wake_r,)
        # True while the main loop may block in poll: only then does an event need a byte on
        # the wake-up pipe (a write per incoming task would cost two system calls and a wake-up).
        self._sleeping = False
        self._wake_pending = False  # a wake-up byte was written during this sleep: one is enough
        self._signals = 0  # SIGTERM/SIGINT received; 1 = drain, 2 = stop at once
        self._stop_requests = 0  # stop() calls from other threads (tests, embedding)
        self._previous_handlers: dict[int, Any] = {}

        # Presence state shared with the network thread.
        self._presence_lock = threading.Lock()
        self._seq = 0
        self._left = False  # the final offline presence is out: never re-announce
        self._draining = False  # the draining presence is out (or due): never announce online again
        self._paused = False  # announce paused, not online (a reconnection, a rebirth answer)
        self.pauser = Pauser(self, load_watch, clock)
        self.heartbeat = Heartbeat(self, settings.heartbeat, clock)  # agent/liveness.py
        self._fatal: BrokerError | None = None  # the transport gave up (refused credentials, TLS mismatch)
        self._connected = False
        self._announced = False  # an online presence was published at least once
        self._link_since = wall()
        self._last_error = "not connected yet"

        self._held: dict[TaskKey, Task] = {}  # queued or running
        # Answered attempts: the task as received and the result payload sent (None when too big).
        self._finished: collections.OrderedDict[TaskKey, tuple[Task, bytes | None]] = collections.OrderedDict()
        # Batches (broker/batches.py): answer with ResultBatch messages while the coordinator
        # sends task batches; results held for one, and when they must go at the latest.
        self._batch_results = False
        self._result_batch = max(1, settings.batch)
        self._outbox: list[bytes] = []
        self._unlogged: list[Finished] = []  # their log lines, written when they leave
        self._outbox_due = math.inf
        self._last_unreadable_log = float("-inf")
        self._unreadable_suppressed = 0
        self.counts: collections.Counter[str] = collections.Counter()  # for logs and tests

    # -- presence (network thread) -----------------------------------------------------------
    def _presence(self, state: PresenceState, reason: OfflineReason | None, seq: int) -> Presence:
        s = self.settings
        return Presence(
            worker=self.ref.worker, volunteer=self.ref.volunteer, state=state, seq=seq, reason=reason,
            host=s.host, container=s.container, image=s.image, version=self.version, cpus=os.cpu_count() or 0,
            capacity=s.concurrency, functions=tuple(self.registry.names), started=self.started,
            prefetch=s.prefetch, batch=s.batch, heartbeat=s.heartbeat,
        )

    def _make_will(self) -> Will:
        with self._presence_lock:
            # Grows per connection and across restarts (wall clock), so a stale will is
            # always numbered below the presence of any later connection.
            self._seq = max(self._seq + 1, self._now_ns() // 1000)
            payload = self._presence(PresenceState.OFFLINE, OfflineReason.LOST, self._seq).encode()
        return Will(self.presence_topic, payload, qos=1, retain=True)

    def _live_state(self) -> PresenceState:
        """What a live presence says now (caller holds the lock): a reconnection while draining
        or paused must not announce the worker ready for work."""
        if self._draining:
            return PresenceState.DRAINING
        return PresenceState.PAUSED if self._paused else PresenceState.ONLINE

    def _on_connect(self) -> None:
        with self._presence_lock:
            if not self._left:
                online = self._presence(self._live_state(), None, self._seq)
                self.transport.publish(self.presence_topic, online.encode(), qos=1, retain=True)
                self._announced = True
            seq = self._seq
        self._post(("connected", seq))

    def _on_disconnect(self, reason: str) -> None:
        self._post(("disconnected", reason))

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        self._post(("message", topic, bytes(payload), retained))

    def _post(self, event: tuple[Any, ...]) -> None:
        self._inbox.put(event)
        # Read after the put: the loop checks the inbox after raising the flag.
        if self._sleeping and not self._wake_pending:
            self._wake_pending = True
            self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):  # full: the loop is awake anyway; closed: we are done
            pass

    # -- signals ---------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        """First SIGTERM/SIGINT drains, the second stops at once; SIGUSR1 pauses, SIGUSR2
        resumes. Main thread only."""
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        self._previous_handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        self._previous_handlers.update({sig: signal.signal(sig, self._on_pause_signal)
                                        for sig in (signal.SIGUSR1, signal.SIGUSR2)})

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1  # only a flag: the main loop does the I/O

    def _on_pause_signal(self, signum: int, frame: FrameType | None) -> None:
        self.pauser.requested = signum == signal.SIGUSR1  # only a flag: the main loop does the I/O

    def pause(self, paused: bool = True) -> None:
        """Ask a running agent to pause (or resume, with paused=False). Thread-safe."""
        self.pauser.requested = paused
        self._wake()

    def stop(self, now: bool = False) -> None:
        """Ask a running agent to drain (or, with now=True, to stop at once). Thread-safe."""
        self._stop_requests += 2 if now else 1
        self._wake()

    @property
    def stop_level(self) -> int:
        return self._signals + self._stop_requests

    # -- main loop ---------------------------------------------------------------------------------
    def run(self) -> int:
        """Serve until stopped; returns the process exit code (0 after a drained shutdown).
        Raises ConnectionRejected when the broker refuses this agent in a way retrying cannot mend."""
        log.info("agent %s starting: %d task process(es), prefetch %d, functions %s, broker %s", self.ref.key,
                 self.settings.concurrency, self.settings.prefetch, ", ".join(self.registry.names),
                 self.settings.broker.url)
        self.runner.start()
        self.transport.will_factory = self._make_will
        self.transport.on_connect = self._on_connect
        self.transport.on_disconnect = self._on_disconnect
        self.transport.on_message = self._on_message
        # While connected, this thread reads the connection itself: a task reaches the runner
        # without a hand-over from the network thread (MqttConnection.adopt).
        self.transport.adopt()
        self.transport.on_lend = self._wake
        self.transport.subscribe(self.task_topic, qos=1)
        self.transport.subscribe(self.rebirth_topic, qos=1)
        self.transport.start()
        drain_deadline: float | None = None
        next_health = self._clock()
        failed = False
        try:
            while True:
                self._handle_inbox()
                if self._fatal is not None:
                    break
                level = self.stop_level
                if level >= 2:
                    self._abort_running("the worker was stopped at once (second signal)")
                    break
                if level >= 1 and drain_deadline is None:
                    drain_deadline = self._begin_drain()
                if drain_deadline is not None:
                    if self.runner.idle:
                        break
                    if self._clock() >= drain_deadline:
                        self._abort_running(f"still running when the {self.settings.grace:g} s grace period ended")
                        break
                    pause_due = float("inf")
                else:
                    pause_due = self.pauser.step()
                now = self._clock()
                if now >= next_health:
                    self._write_health()
                    next_health = now + self._health_interval
                beat_due = self.heartbeat.step()
                timeout = max(0.0, min(next_health, pause_due, self._outbox_due, beat_due) - now)
                if drain_deadline is not None:
                    timeout = min(timeout, max(0.0, drain_deadline - now))
                self._wake_pending = False
                self._sleeping = True
                if not self._inbox.empty():  # posted before the flag was up: no wake-up byte
                    timeout = 0.0
                try:
                    ended = self.runner.poll(timeout, wake=self._wake_fds + self.transport.waitables(),
                                             before_wait=self.transport.write_pending)
                finally:
                    self._sleeping = False
                self.transport.pump(self.runner.woken)  # tasks read here land in the inbox
                if ended:
                    self.report_all(ended, linger=True)
                elif self._outbox and self._clock() >= self._outbox_due:
                    self.flush_results()
                if self._wake_r in self.runner.woken:
                    self._drain_wake_pipe()
        except Exception:
            log.exception("agent %s failed; leaving", self.ref.key)
            failed = True
        finally:
            self.flush_results()
            self._leave(fast=failed or self.stop_level >= 2 or self._fatal is not None)
        if self._fatal is not None:
            raise self._fatal  # the command turns it into one line and its exit code
        return 1 if failed else 0

    def _drain_wake_pipe(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _begin_drain(self) -> float:
        self.flush_results()
        self._announce(draining=True)
        self.state = AgentState.DRAINING
        dropped = self.runner.drop_queued()
        running = len(self.runner.running)
        log.warning("draining: no new tasks; %d running task(s) get up to %g s to finish%s "
                    "(signal again to stop at once)", running, self.settings.grace,
                    f"; {len(dropped)} queued task(s) handed back unrun" if dropped else "")
        if dropped:
            self.report_all([Finished(job.key, Outcome.RELEASED, error=TaskError(
                RELEASED_ERROR, "queued on a worker that shut down; never started")) for job in dropped])
        return self._clock() + self.settings.grace

    def set_paused(self, paused: bool) -> None:
        """Enter or leave the paused state, its presence first (agent/pause.py does the rest)."""
        self._announce(paused=paused)
        if self.state is not AgentState.DRAINING:
            self.state = AgentState.PAUSED if paused else AgentState.RUNNING
        self._write_health()

    def _announce(self, *, draining: bool | None = None, paused: bool | None = None) -> Presence | None:
        """Publish the live presence (retained, this connection's seq), after setting the flags
        given; returns it, or None when nothing went out (not announced yet: the presence on
        CONNACK will say it; gone; or the publish failed)."""
        # Say so first: the coordinator stops sending work before this agent turns any away,
        # and tasks already on their way come back released.
        with self._presence_lock:
            self._draining = self._draining if draining is None else draining
            self._paused = self._paused if paused is None else paused
            announce = self._announced and not self._left and self.transport.connected
            presence = self._presence(self._live_state(), None, self._seq)
        if not announce:
            return None
        try:
            self.transport.publish(self.presence_topic, presence.encode(), qos=1, retain=True)
        except BrokerError as exc:
            log.warning("could not publish the %s presence: %s", presence.state.value, exc)
            return None
        return presence

    def _abort_running(self, reason: str) -> None:
        killed = self.runner.kill_running(reason)
        if killed:
            names = ", ".join(f"{key[0]} attempt {key[1]}" for key in (f.key for f in killed))  # type: ignore[index]
            log.warning("killed %d task(s) %s: %s (handed back: released, no attempt used)", len(killed), reason,
                        names)
        if killed:
            self.report_all(killed)

    def _leave(self, fast: bool) -> None:
        """Say goodbye (retained offline, reason shutdown) and disconnect cleanly."""
        self.runner.stop(timeout=0.5 if fast else 2.0)
        flush = 1.0 if fast else CLOSE_FLUSH_SECONDS
        if not self.transport.connected and not fast and self.transport.unacked:
            # Undelivered results go out only over a connection: give the broker a moment.
            try:
                self.transport.wait_connected(flush)
            except BrokerError:
                pass
        with self._presence_lock:
            self._left = True
            announced = self._announced
            goodbye = self._presence(PresenceState.OFFLINE, OfflineReason.SHUTDOWN, self._seq)
        if announced:  # else nobody ever saw this worker online: nothing to take back
            try:
                self.transport.publish(self.presence_topic, goodbye.encode(), qos=1, retain=True)
            except BrokerError as exc:
                log.error("could not publish the offline presence: %s", exc)
        delivered = self.transport.connected and self.transport.flush(flush)
        if not delivered and announced:
            log.error("leaving with %d message(s) the broker has not acknowledged (%s); the coordinator "
                      "reassigns tasks whose results it did not get", self.transport.unacked,
                      self._last_error or "no acknowledgement in time")
        self.transport.close(timeout=0.5)
        self.state = AgentState.STOPPED
        if self.settings.health_file is not None:
            remove_health(self.settings.health_file, os.getpid())
        if self._previous_handlers:
            # The wake-up pipe closes below: a later signal must not write into a reused fd.
            signal.set_wakeup_fd(-1)
            for sig, handler in self._previous_handlers.items():
                signal.signal(sig, handler)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        log.info("agent %s stopped (%s)", self.ref.key,
                 ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items())) or "no tasks")

    # -- events --------------------------------------------------------------------------------------
    def _handle_inbox(self) -> None:
        inbox = self._inbox
        while not inbox.empty():  # this thread is the only reader
            event = inbox.get_nowait()
            kind = event[0]
            if kind == "message":
                self._on_task_message(event[1], event[2], event[3])
            elif kind == "connected":
                self._connected, self._link_since, self._last_error = True, self._wall(), ""
                if self.state is AgentState.STARTING:
                    self.state = AgentState.RUNNING
                log.info("online as %s (seq %d), %s %s", self.ref.key, event[1],
                         "paused, handing back tasks on" if self._paused else "taking tasks on", self.task_topic)
                self._write_health()
            elif kind == "disconnected":
                self._connected, self._link_since, self._last_error = False, self._wall(), event[1]
                if self.transport.failure is not None:  # retrying cannot help: stop (run raises it)
                    self._fatal = self.transport.failure
                    continue
                log.warning("broker connection lost (%s); %d task(s) keep running, results wait for "
                            "the reconnection", event[1], len(self._held))
                self._write_health()

    # -- health -------------------------------------------------------------------------------------------
    def _write_health(self) -> None:
        path = self.settings.health_file
        if path is None:
            return
        health = Health(
            pid=os.getpid(), worker=self.ref.key, broker=self.settings.broker.url,
            state=self.state.value,
            connected=self._connected, since=self._link_since, updated=self._wall(),
            keepalive=self.settings.keepalive, running=len(self.runner.running), queued=self.runner.queued,
            last_error=self._last_error if not self._connected else "",
        )
        try:
            write_health(path, health)
        except OSError as exc:
            log.warning("cannot write the health file %s: %s (`dockercomp agent check` will fail)", path, exc)

    @property
    def held(self) -> list[Hashable]:
        return list(self._held)
