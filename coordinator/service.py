"""The coordinator engine that `dockercomp coordinator serve` runs: presence in, tasks out, results in.

Threads: the transport's network thread only puts incoming messages on a queue; one engine
thread (``run``) takes them in batches and handles each batch in ONE database transaction:
presence and results first, then expired leases and purges, then a dispatch round for the
capacity that freed up. Task messages are published after the commit, so a crash can lose a
message but never a record of what was sent (an unsent attempt's lease simply runs out).

Library use (tests, the Python API, the demo)::

    coordinator = Coordinator.connect("mqtt://127.0.0.1:1883", "coordinator.db")
    coordinator.start()          # engine in a background thread; returns once connected
    ...
    coordinator.stop()
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from functools import lru_cache
from importlib import metadata
from typing import Any, Callable, TypeVar

import peewee as pw

from dockercomp.broker.connection import MqttConnection, Transport, Will
from dockercomp.broker.defaults import PROTOCOL_VERSION
from dockercomp.broker.errors import BrokerError, DecodeError, InvalidTopic
from dockercomp.broker.messages import Presence, Result, encode_status
from dockercomp.broker.settings import BrokerSettings
from dockercomp.broker.topics import Topics, WorkerRef
from dockercomp.coordinator import defaults
from dockercomp.coordinator.dispatch import Dispatcher, JobBook, PresenceChange, WorkerPool, WorkerSlot
from dockercomp.coordinator.errors import CoordinatorError, StoreError
from dockercomp.coordinator.leases import Changes, Lease, Leases, PayloadBuilder, error_json, find_attempt, task_exists
from dockercomp.coordinator.settings import CoordinatorSettings  # re-exported: the engine's settings
from dockercomp.coordinator.status import RateMeter, Rejection, Rejections, StatusPublisher, summary_status
from dockercomp.coordinator.store import AttemptOutcome, JobState, Store, TaskState, Worker, WorkerState, dump_json

log = logging.getLogger(__name__)

# A message from a worker: Presence or Result, both naming the worker that sent it.
_Sent = TypeVar("_Sent", Presence, Result)

# Queue items telling the engine that the transport (re)connected or lost its connection.
_CONNECTED = ("", b"connected")
_DISCONNECTED = ("", b"disconnected")
# Seconds the engine waits after a failed database transaction before trying again.
_RETRY_DELAY = 1.0


def _version() -> str:
    try:
        return metadata.version("dockercomp")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class Coordinator:
    """The engine. ``transport`` is owned from ``run`` on: it is started and closed here."""

    def __init__(self, store: Store, transport: Transport, topics: Topics | None = None,
                 settings: CoordinatorSettings | None = None, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.transport = transport
        self.topics = topics or Topics()
        self.settings = settings or CoordinatorSettings()
        self.clock = clock
        self.workers = WorkerPool(self.topics)
        self.jobs = JobBook(store)
        self.leases = Leases()
        self.payloads = PayloadBuilder(PROTOCOL_VERSION)
        self.dispatcher = Dispatcher(store, self.payloads, self.settings.lease_margin)
        self.rejections = Rejections()
        self.rate = RateMeter(self.settings.rate_window)
        self.status = StatusPublisher(self.topics, self.settings.status_interval)
        self._changes = Changes()
        self._inbox: queue.SimpleQueue[tuple[str, bytes]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._running = False  # open() succeeded
        self._resend: list[tuple[str, bytes]] = []
        self._announce = False
        self._needs_reload = False  # a transaction failed: memory must be rebuilt first
        self._offline_since: float | None = None  # when the broker connection was lost
        self._finished = 0
        self._last_batch = 0  # messages handled by the last step: is traffic flowing?
        self.started = clock()
        self._next_poll = self._next_lease = self._next_purge = float("-inf")
        self._identity = {"host": socket.gethostname(), "pid": os.getpid(), "version": _version()}
        # Topic parsing validates names with regular expressions: remember the answers.
        self._parse_topic = lru_cache(maxsize=8192)(self.topics.parse_worker_topic)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def connect(cls, broker: str | BrokerSettings, db: str | Store, settings: CoordinatorSettings | None = None,
                client_id: str | None = None, clock: Callable[[], float] = time.time) -> "Coordinator":
        """A coordinator for a broker URL and a database URL (or an open Store)."""
        broker_settings = broker if isinstance(broker, BrokerSettings) else BrokerSettings.from_url(broker)
        store = db if isinstance(db, Store) else Store.open(db)
        client_id = client_id or f"{defaults.CLIENT_ID_PREFIX}-{socket.gethostname()}-{os.getpid()}"
        transport = MqttConnection(broker_settings, client_id)
        return cls(store, transport, Topics(broker_settings.root), settings, clock)

    # -- running -----------------------------------------------------------------------------
    def run(self) -> None:
        """Connect, then handle messages until ``request_stop``. Raises ConnectionFailed when the
        broker cannot be reached within ``connect_timeout``, StoreError when the store fails."""
        try:
            self.open()
            self._running = True
            self._ready.set()
            while not self._stop.is_set():
                self.step(self._wait_time(), gather=self.settings.gather)
        finally:
            self.close()

    def request_stop(self) -> None:
        """Ask ``run`` to return after the current step (safe from a signal handler)."""
        self._stop.set()

    def start(self) -> "Coordinator":
        """Run the engine in a background thread; returns once it is connected and loaded."""
        if self._thread is not None:
            raise CoordinatorError("this coordinator was already started")
        self._thread = threading.Thread(target=self._run_in_thread, name="coordinator", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the background engine (see ``start``) and wait for it."""
        self.request_stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the coordinator did not stop within %.0f s", timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the background engine stops; True if it did. Joins in short slices, so
        signal handlers keep running in the main thread."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.running:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            self._thread.join(0.2)  # type: ignore[union-attr]
        return True

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def error(self) -> BaseException | None:
        """What stopped the background engine, if it failed."""
        return self._error

    @property
    def transport_url(self) -> str:
        settings = getattr(self.transport, "settings", None)
        return settings.url if isinstance(settings, BrokerSettings) else type(self.transport).__name__

    def __enter__(self) -> "Coordinator":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run_in_thread(self) -> None:
        try:
            self.run()
        except BaseException as exc:  # noqa: BLE001 - handed to the thread that called start()
            self._error = exc
            if self._running:
                log.exception("the coordinator stopped on an error")
        finally:
            self._ready.set()

    def open(self) -> None:
        """Load the state from the store and connect (``run`` calls this; tests may too)."""
        self.store.relax_durability()
        with self.store.transaction():
            self._load()
        self.transport.on_message = self._on_message
        self.transport.on_connect = lambda: self._inbox.put(_CONNECTED)
        self.transport.on_disconnect = lambda reason: self._inbox.put(_DISCONNECTED)
        self.transport.will_factory = lambda: Will(self.topics.coordinator_presence, self._presence("offline", "lost"))
        self.transport.subscribe(self.topics.all_presence, 1)
        self.transport.subscribe(self.topics.all_results, 1)
        self.transport.start()
        self.transport.wait_connected(self.settings.connect_timeout)
        log.info("coordinator ready: %d worker(s), %d job(s), %d open attempt(s) in %s",
                 len(self.workers.by_id), len(self.jobs.by_id), len(self.leases), self.store.url)

    def close(self) -> None:
        """Say goodbye (retained offline presence), publish the last status, disconnect."""
        try:
            if self.transport.connected:
                self._publish_status(self.clock(), force=True)
                self.transport.publish(self.topics.coordinator_presence, self._presence("offline", "shutdown"),
                                       qos=1, retain=True)
        except BrokerError as exc:
            log.warning("could not say goodbye to the broker: %s", exc)
        self.transport.close(defaults.STOP_FLUSH_TIMEOUT)
        self.store.close()

    def _load(self) -> None:
        self.workers.load()
        self.leases = Leases.load(self.payloads)
        self.jobs.by_id.clear()
        self.jobs.poll()
        self.status.everything_changed(self.jobs.by_id, self.workers.by_id)

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        # Network thread: enqueue only.
        self._inbox.put((topic, payload))

    def _presence(self, state: str, reason: str | None = None) -> bytes:
        return encode_status({"state": state, "reason": reason, "started": self.started, **self._identity})

    def _wait_time(self) -> float:
        # Status waits for a connection: counting it while disconnected would spin.
        status_due = self.status.next_due() if self.transport.connected else float("inf")
        upcoming = min(self._next_poll, self._next_lease, self._next_purge, status_due)
        return max(0.0, min(defaults.POLL_INTERVAL, upcoming - self.clock()))

    # -- one step ----------------------------------------------------------------------------
    def step(self, timeout: float = 0.0, gather: float = 0.0) -> None:
        """Wait up to ``timeout`` for messages, then handle everything that is due.

        ``gather``: when the last step was busy (``busy_batch`` messages or more) and fewer
        are waiting now, wait this long once for more, so that one transaction, one dispatch
        round and one network write serve more tasks. Idle or lightly loaded, nothing waits:
        a lone result is handled at once."""
        if self._needs_reload and not self._reload():
            self._stop.wait(_RETRY_DELAY)  # messages wait in the inbox meanwhile
            return
        items = self._take(timeout)
        if gather > 0 and self._last_batch >= self.settings.busy_batch and len(items) < self.settings.busy_batch:
            time.sleep(gather)
            items += self._take(0.0, self.settings.batch_max - len(items))
        self._last_batch = len(items)
        now = self.clock()
        try:
            self.store.bind()
            self._step(items, now)
        except (pw.PeeweeException, StoreError) as exc:
            # The transaction was rolled back: memory no longer matches the store.
            log.error("database error, %d message(s) dropped; reloading the state: %s", len(items), exc)
            self._needs_reload = True

    def _take(self, timeout: float, limit: int | None = None) -> list[tuple[str, bytes]]:
        """Up to ``limit`` (batch_max) messages from the inbox, waiting ``timeout`` for the first."""
        limit = self.settings.batch_max if limit is None else limit
        items: list[tuple[str, bytes]] = []
        try:
            if limit > 0:
                items.append(self._inbox.get(timeout=timeout) if timeout > 0 else self._inbox.get_nowait())
            while len(items) < limit:
                items.append(self._inbox.get_nowait())
        except queue.Empty:
            pass
        return items

    def _step(self, items: list[tuple[str, bytes]], now: float) -> None:
        if now >= self._next_poll:
            self._next_poll = now + self.settings.poll_interval
            for job in self.jobs.poll():
                self.status.job_changed(job.id)
        lease_due = now >= self._next_lease
        purge_due = now >= self._next_purge
        connected = self.transport.connected
        sends: list[tuple[str, bytes]] = []
        clears: list[str] = []
        if items or lease_due or purge_due or (connected and self.dispatcher.has_work(self.workers, self.jobs, self.leases)):
            self._finished = 0
            with self.store.transaction():
                for topic, payload in items:
                    if not topic:
                        self._connection_changed(payload == _CONNECTED[1], now)
                    else:
                        self._handle(topic, payload, now)
                if lease_due:
                    self._next_lease = now + self.settings.lease_check
                    if self._offline_since is None:  # no result can reach us while cut off
                        self._expire(now)
                self._changes.flush(self.store.db, now)
                if purge_due:
                    self._next_purge = now + self.settings.purge_check
                    clears = self._purge(now)
                if connected:
                    sends = self.dispatcher.dispatch(self.workers, self.jobs, self.leases, now)
                    for worker_id in self.dispatcher.served:
                        self.status.worker_changed(worker_id)
                for job in self.jobs.complete(now):
                    log.info("job %s (%d tasks) finished: %d done, %d failed", job.name, job.total,
                             job.counts["done"], job.counts["failed"])
                    self.status.job_changed(job.id)
            self.rate.record(self._finished, now)
        self._send(sends, clears)
        self._publish_status(now)

    def _connection_changed(self, connected: bool, now: float) -> None:
        if not connected:
            if self._offline_since is None:
                self._offline_since = now
            return
        self._announce = True
        if self._offline_since is None:
            return
        # Back from an outage. Leases did not run while no result could reach us; and until a
        # worker's presence is seen again it may still be reconnecting (a task sent now would
        # be lost): dispatch waits for it, then resends what it holds.
        outage, self._offline_since = now - self._offline_since, None
        for lease in self.leases:
            lease.deadline += outage
        p = self.store.db.param
        self.store.db.execute_sql(f"UPDATE attempt SET deadline = deadline + {p} WHERE outcome = {p}",
                                  (outage, AttemptOutcome.OPEN.value))
        self.workers.unconfirm_all()
        log.info("reconnected after %.1f s; leases extended by as much", outage)

    def _send(self, sends: list[tuple[str, bytes]], clears: list[str]) -> None:
        if self._announce:
            self._announce = False
            self._publish(self.topics.coordinator_presence, self._presence("online"), retain=True)
            # A restarted broker may have forgotten every retained status: publish them all.
            self.status.everything_changed(self.jobs.by_id, self.workers.by_id)
        resend, self._resend = self._resend, []
        # One batch: one wake-up of the network thread, whose writes are then joined.
        for topic, reason in self.transport.publish_many(resend + sends):
            # The attempt stays open; its lease runs out and the task is sent again.
            log.warning("publish to %s failed: %s", topic, reason)
        for topic in clears:
            self._publish(topic, b"", retain=True)

    def _publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        try:
            self.transport.publish(topic, payload, qos=1, retain=retain)
        except BrokerError as exc:
            # The attempt stays open; its lease runs out and the task is sent again.
            log.warning("publish to %s failed: %s", topic, exc)

    def _publish_status(self, now: float, force: bool = False) -> None:
        if not (force or self.status.due(now)) or not self.transport.connected:
            return
        self.status.publish(self.transport, self.workers.by_id, self.jobs.by_id, self.leases.count,
                            lambda: summary_status(list(self.workers), list(self.jobs.by_id.values()),
                                                   len(self.leases), self.rejections.snapshot(),
                                                   self.rate.rate(now), self.started, now), now)

    def _reload(self) -> bool:
        """Rebuild memory from the store after a failed transaction; True once it worked.

        Workers count as unconfirmed again, and the presence subscription is renewed: the
        broker resends every retained presence, so a will lost with the failed batch is seen
        again, and each worker is resent the attempts it holds (it ignores those it has, and
        answers again those whose results were lost)."""
        self._changes = Changes()
        try:
            self.store.close()  # a broken connection (PostgreSQL restarted) is replaced
            self.store.relax_durability()
            with self.store.transaction():
                self._load()
        except (pw.PeeweeException, StoreError) as exc:
            log.error("reloading the state failed, retrying: %s", exc)
            return False
        self._needs_reload = False
        self.transport.subscribe(self.topics.all_presence, 1)
        log.info("state reloaded: %d open attempt(s)", len(self.leases))
        return True

    # -- messages ----------------------------------------------------------------------------
    def _handle(self, topic: str, payload: bytes, now: float) -> None:
        try:
            parsed = self._parse_topic(topic)
        except InvalidTopic:
            return  # amqtt replays other clients' retained messages on connect; not ours
        if parsed.kind == "presence":
            self._on_presence(parsed.ref, payload, now)
        elif parsed.kind == "results":
            self._on_result(parsed.ref, payload, now)

    def _reject(self, kind: Rejection, ref: WorkerRef, detail: str, level: int = logging.WARNING) -> None:
        self.rejections.reject(kind, ref.key, detail, level)
        slot = self.workers.get(ref.key)
        if slot is not None and kind is not Rejection.STALE:
            slot.rejected += 1
            self.status.worker_changed(slot.id)
        self.status.summary_changed()

    def _decode_from(self, ref: WorkerRef, kind: str, decode: Callable[[bytes], _Sent],
                     payload: bytes) -> _Sent | None:
        """A message decoded from ``ref``'s topic and naming ``ref`` itself, or None once the
        rejection is counted and logged."""
        try:
            message = decode(payload)
        except DecodeError as exc:
            self._reject(Rejection.MALFORMED, ref, f"{kind}: {exc.reason}")
            return None
        except Exception as exc:  # noqa: BLE001 - a decoder bug must not drop the whole batch
            self._reject(Rejection.MALFORMED, ref, f"{kind}: undecodable ({type(exc).__name__}: {exc})")
            return None
        if (message.volunteer, message.worker) != (ref.volunteer, ref.worker):
            self._reject(Rejection.MISMATCH, ref, f"{kind} names {message.volunteer}/{message.worker}")
            return None
        return message

    def _on_presence(self, ref: WorkerRef, payload: bytes, now: float) -> None:
        if not payload:
            return  # a cleared retained presence (purge)
        presence = self._decode_from(ref, "presence", Presence.decode, payload)
        if presence is None:
            return
        slot, change = self.workers.apply(ref, presence, now)
        self.status.worker_changed(slot.id)
        if change is PresenceChange.STALE:
            self._reject(Rejection.STALE, ref, f"{presence.state.value} presence of connection {presence.seq}, "
                         f"older than the current one ({slot.seq})", logging.INFO)
        elif change in (PresenceChange.LOST, PresenceChange.SHUTDOWN):
            held = self.leases.of_worker(slot.id)
            log.info("worker %s %s; returning %d task(s) it held", ref.key,
                     "lost its connection" if change is PresenceChange.LOST else "shut down", len(held))
            why = "lost its connection (will)" if change is PresenceChange.LOST else "shut down"
            self._release(slot, f"worker {ref.key} {why} while holding the task")
        elif change is PresenceChange.RESTARTED:
            log.info("worker %s restarted; returning %d task(s) the old process held",
                     ref.key, self.leases.count(slot.id))
            self._release(slot, f"worker {ref.key} restarted while holding the task")
        elif change is PresenceChange.RECONNECTED or change is PresenceChange.ONLINE:
            # It may have missed tasks sent while it was away; it ignores those it still holds.
            self._resend += [(slot.tasks_topic, lease.payload) for lease in self.leases.of_worker(slot.id)]
        if change in (PresenceChange.NEW, PresenceChange.ONLINE) and slot.state == WorkerState.ONLINE.value:
            log.info("worker %s online: capacity %d, prefetch %d, functions %s", ref.key, slot.capacity,
                     slot.prefetch, ", ".join(sorted(slot.functions)) or "none")
            if slot.capacity <= 0:
                log.warning("worker %s announced capacity 0: it gets no work", ref.key)

    def _release(self, slot: WorkerSlot, message: str) -> None:
        for lease in self.leases.of_worker(slot.id):
            self._close_failed(lease, AttemptOutcome.LOST, error_json("WorkerLost", message))

    def _close_failed(self, lease: Lease, outcome: AttemptOutcome, error: str) -> None:
        """Close an open attempt that produced no value; the task goes back to pending, or
        fails when its attempts are used up."""
        self.leases.remove(lease)
        self._changes.close(lease.attempt_id, outcome, error, lease.worker_id)
        worker = self.workers.by_id.get(lease.worker_id)
        if worker is not None:
            worker.failed += 1
            self.status.worker_changed(worker.id)
        job = self.jobs.get(lease.job_id)
        if job is None or not job.active:
            return  # cancelled meanwhile: the task stays cancelled
        if lease.budget_used() >= job.max_attempts:
            self._changes.set_task(lease.task_id, TaskState.FAILED)
            job.move(TaskState.ASSIGNED.value, TaskState.FAILED.value)
            self._finished += 1
        else:
            self._changes.set_task(lease.task_id, TaskState.PENDING)
            job.move(TaskState.ASSIGNED.value, TaskState.PENDING.value)
            job.drained = False
        self.status.job_changed(job.id)

    def _on_result(self, ref: WorkerRef, payload: bytes, now: float) -> None:
        result = self._decode_from(ref, "result", Result.decode, payload)
        if result is None:
            return
        what = f"result for task {result.task_id} attempt {result.attempt}"
        digits = result.task_id.isascii() and result.task_id.isdigit() and len(result.task_id) < 19
        task_id = int(result.task_id) if digits else None
        slot = self.workers.get(ref.key)
        if task_id is None:
            self._reject(Rejection.UNKNOWN, ref, f"{what}: no such task")
            return
        if slot is None:
            self._reject(Rejection.FOREIGN, ref, f"{what}: the sender never registered")
            return
        lease = self.leases.get(task_id, result.attempt)
        if lease is not None:
            if lease.worker_id != slot.id:
                self._reject(Rejection.FOREIGN, ref, f"{what}: that attempt was sent to another worker")
                return
            job = self.jobs.get(lease.job_id)
            if job is None or not job.active:
                self.leases.remove(lease)  # cancelled: the answer only frees the worker's slot
                self._changes.close(lease.attempt_id, AttemptOutcome.CANCELLED, None, None)
                self.status.worker_changed(slot.id)
                return
            if result.ok:
                self.leases.remove(lease)
                self._accept(lease.attempt_id, task_id, lease.job_id, TaskState.ASSIGNED, slot, result, now)
            else:
                error = result.error.to_object() if result.error else {"type": result.outcome.value, "message": ""}
                self._close_failed(lease, AttemptOutcome(result.outcome.value), dump_json(error))
            return
        self._late_result(ref, slot, task_id, result, what, now)

    def _late_result(self, ref: WorkerRef, slot: WorkerSlot, task_id: int, result: Result, what: str,
                     now: float) -> None:
        """A result for an attempt that is not open: late, duplicate, foreign or unknown."""
        self._changes.flush(self.store.db, now)  # the lookup must see this step's writes
        record = find_attempt(task_id, result.attempt)
        if record is None:
            if task_exists(task_id):
                self._reject(Rejection.FOREIGN, ref, f"{what}: that attempt was never sent")
            else:
                self._reject(Rejection.UNKNOWN, ref, f"{what}: no such task")
            return
        if record.worker_id != slot.id:
            self._reject(Rejection.FOREIGN, ref, f"{what}: that attempt was sent to another worker")
            return
        if record.task_state == TaskState.DONE.value:
            self._reject(Rejection.DUPLICATE, ref, f"{what}: the task already has its result", logging.INFO)
            return
        job = self.jobs.get(record.job_id)
        acceptable = (result.ok and job is not None and job.state != JobState.CANCELLED.value
                      and record.task_state in (TaskState.PENDING.value, TaskState.ASSIGNED.value,
                                                TaskState.FAILED.value))
        if not acceptable:
            self._reject(Rejection.LATE, ref, f"{what}: attempt already closed ({record.outcome}), "
                         f"task {record.task_state}", logging.INFO)
            return
        other = self.leases.of_task(task_id)
        if other is not None:
            # Another attempt is running for this task: it is superseded by this answer.
            self.leases.remove(other)
            self._changes.supersede(other.attempt_id)
            self.status.worker_changed(other.worker_id)
        log.info("accepted late %s from %s (attempt was %s)", what, ref.key, record.outcome)
        self._accept(record.attempt_id, task_id, record.job_id, TaskState(record.task_state), slot, result, now)

    def _accept(self, attempt_id: int, task_id: int, job_id: int, previous: TaskState, slot: WorkerSlot,
                result: Result, now: float) -> None:
        self._changes.accept(task_id, attempt_id, slot.id, dump_json(result.value), result.elapsed, now)
        slot.done += 1
        self.status.worker_changed(slot.id)
        job = self.jobs.get(job_id)
        if job is not None:
            job.move(previous.value, TaskState.DONE.value)
            self.status.job_changed(job.id)
        self._finished += 1

    # -- periodic ----------------------------------------------------------------------------
    def _expire(self, now: float) -> None:
        for lease in self.leases.expired(now):
            worker = self.workers.by_id.get(lease.worker_id)
            name = worker.key if worker else f"worker #{lease.worker_id}"
            limit = lease.deadline - lease.sent_at
            log.info("lease of task %d attempt %d on %s expired; returning the task",
                     lease.task_id, lease.number, name)
            self._close_failed(lease, AttemptOutcome.EXPIRED,
                               error_json("LeaseExpired", f"no result from {name} within {limit:g} s"))

    def _purge(self, now: float) -> list[str]:
        clears = []
        for row in self.store.purge_lost(self.settings.purge_after, now):
            slot = self.workers.mark_purged(row.id)
            if slot is None:
                continue
            log.info("worker %s purged: lost for more than %g s", slot.key, self.settings.purge_after)
            clears.append(self.topics.presence(slot.ref))
            self.status.worker_changed(slot.id)
        # Workers `dockercomp coordinator purge` purged meanwhile (it clears their presence itself).
        lost = [w.id for w in self.workers if w.state == WorkerState.LOST.value]
        if lost:
            for (worker_id,) in Worker.select(Worker.id).where(
                    Worker.id.in_(lost) & (Worker.state == WorkerState.PURGED.value)).tuples():
                self.workers.mark_purged(worker_id)
                self.status.worker_changed(worker_id)
        return clears

    # -- introspection (tests, API) ------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """The status summary as it would be published now."""
        now = self.clock()
        return summary_status(list(self.workers), list(self.jobs.by_id.values()), len(self.leases),
                              self.rejections.snapshot(), self.rate.rate(now), self.started, now)



def clear_retained_presence(transport: Transport, topics: Topics, refs: list[WorkerRef]) -> None:
    """Forget purged workers on the broker: empty retained presence and status (for
    `dockercomp coordinator purge`, which purges in the store while `serve` may not be running)."""
    for ref in refs:
        transport.publish(topics.presence(ref), b"", qos=1, retain=True)
        transport.publish(topics.status_worker(ref), b"", qos=1, retain=True)
