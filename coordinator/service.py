"""The coordinator engine that `dockercomp coordinator serve` runs: presence in, tasks out, results in.

This module is the loop: it moves messages between the transport and the parts that decide,
the worker registry (registry.py: presence), the attempt ledger (ledger.py: results, deaths,
deadlines), inbound.py (what workers send, decoded and checked), dispatch (dispatch.py,
leases.py) and status (status.py), all over the store interface (store.py).

Threads: one engine thread (``run``) reads the broker connection itself while it is up
(inbox.py; the transport's network thread connects, reconnects and only then puts messages on
the inbox), takes the messages in batches and handles each batch in ONE database transaction:
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
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from typing import TYPE_CHECKING, Any, Callable

from dockercomp.broker.connection import MqttConnection, Transport, Will
from dockercomp.broker.defaults import PROTOCOL_VERSION
from dockercomp.broker.errors import BrokerError
from dockercomp.broker.messages import Rebirth, encode_status
from dockercomp.broker.settings import BrokerSettings
from dockercomp.broker.topics import Topics, WorkerRef, WorkerTopic
from dockercomp.coordinator import defaults
from dockercomp.coordinator.dispatch import Dispatcher, JobBook
from dockercomp.coordinator.errors import CoordinatorError
from dockercomp.coordinator.heap import HeapFreezer
from dockercomp.coordinator.heartbeat import Heartbeat
from dockercomp.coordinator.inbound import Inbound, _Replayed
from dockercomp.coordinator.inbox import Inbox
from dockercomp.coordinator.ledger import Ledger
from dockercomp.coordinator.leader import LeadLost
from dockercomp.coordinator.leases import Leases, PayloadBuilder
from dockercomp.coordinator.liveness import Liveness
from dockercomp.coordinator.registry import Caps, WorkerRegistry
from dockercomp.coordinator.settings import CoordinatorSettings  # re-exported: the engine's settings
from dockercomp.coordinator.status import RateMeter, Rejections, StatusPublisher, summary_status
from dockercomp.coordinator.store import Store, WorkerState
from dockercomp.coordinator.unroutable import UnroutableJobs

if TYPE_CHECKING:
    from dockercomp.coordinator.leader import Leader
    from dockercomp.coordinator.metrics import EngineMetrics

log = logging.getLogger(__name__)

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


class Coordinator(Inbound):
    """The engine. ``transport`` is owned from ``run`` on: it is started and closed here."""

    def __init__(self, store: Store, transport: Transport, topics: Topics | None = None,
                 settings: CoordinatorSettings | None = None, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.transport = transport
        self.topics = topics or Topics()
        self.settings = settings or CoordinatorSettings()
        self.clock = clock
        caps = Caps(self.settings.max_capacity, self.settings.max_prefetch, self.settings.volunteer_max_capacity,
                    self.settings.volunteer_max_prefetch)
        self.workers = WorkerRegistry(store, self.topics, caps)
        self.jobs = JobBook(store)
        self.payloads = PayloadBuilder(PROTOCOL_VERSION)
        self.dispatcher = Dispatcher(store, self.payloads, self.settings.lease_margin)
        self.rejections = Rejections()
        self.rate = RateMeter(self.settings.rate_window)
        self.status = StatusPublisher(self.topics, self.settings.status_interval)
        self.ledger = Ledger(store, self.workers, self.jobs, self.status, self.rejections)
        self.unroutable = UnroutableJobs(store, self.settings.fail_unroutable) if self.settings.fail_unroutable else None
        self.workers.answer_timeout = self.settings.rebirth_timeout
        self.liveness = Liveness(self.settings.heartbeat_misses, self.settings.heartbeat_slack)  # heartbeats
        self._rebirth: list[str] | None = None  # worker keys to ask to show life ([] = everyone)
        self._inbox: Inbox[tuple[str, bytes]] = Inbox(transport)  # the engine's one wait (inbox.py)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._running = False  # open() succeeded
        self._resend: list[tuple[str, bytes]] = []
        self._announce = False
        self._needs_reload = False  # a transaction failed: memory must be rebuilt first
        self._offline_since: float | None = None  # when the broker connection was lost
        self._last_batch = 0  # messages handled by the last step: is traffic flowing?
        self._heap = HeapFreezer()  # a big fleet's objects out of the cyclic GC's scans (heap.py)
        self.started = clock()
        self._next_poll = self._next_lease = self._next_purge = self._next_beat = float("-inf")
        self._nudged = False  # a submitter said new work is stored: poll the jobs now
        self._identity = {"host": socket.gethostname(), "pid": os.getpid(), "version": _version()}
        # Parsed worker topics (Inbound._parse_topic): parsing validates names with regular expressions.
        self._topic_cache: dict[str, WorkerTopic] = {}
        self._workers_prefix = self.topics.workers_prefix  # read per message (Inbound._known_topic)
        self.metrics: EngineMetrics | None = None  # set by metrics.MetricsServer (serve --metrics-port)
        # Set by `serve` (leader.py): wait as the standby until active, fence every transaction.
        self.leader: Leader | None = None
        self._deposed = ""  # why the fence failed (another coordinator is active); "" while it holds

    @property
    def leases(self) -> Leases:
        """The open attempts (the ledger's)."""
        return self.ledger.leases

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def connect(cls, broker: str | BrokerSettings, db: str | Store, settings: CoordinatorSettings | None = None,
                client_id: str | None = None, clock: Callable[[], float] = time.time,
                persistent: bool = True) -> "Coordinator":
        """A coordinator for a broker URL and a database URL (or an open Store). Its MQTT
        session is persistent (``persistent``) under ``client_id``, by default the same for
        every coordinator of one topic root (coordinator_client_id): whoever serves the root
        next, this process restarted or a standby, gets what was queued meanwhile."""
        broker_settings = broker if isinstance(broker, BrokerSettings) else BrokerSettings.from_url(broker)
        store = db if isinstance(db, Store) else Store.open(db)
        client_id = client_id or coordinator_client_id(broker_settings.root)
        transport = MqttConnection(broker_settings, client_id, persistent=persistent)
        return cls(store, transport, Topics(broker_settings.root), settings, clock)

    # -- running -----------------------------------------------------------------------------
    def run(self) -> None:
        """Connect, then handle messages until ``request_stop``. Raises ConnectionFailed when the
        broker cannot be reached within ``connect_timeout``, StoreError when the store fails."""
        try:
            if self.leader is not None and not self.leader.wait(self._stop):
                return  # stopped while standing by
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
        self._inbox.wake()

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
            if self._running and not self._deposed:
                log.exception("the coordinator stopped on an error")
        finally:
            self._ready.set()

    def open(self) -> None:
        """Load the state from the store and connect (``run`` calls this; tests may too)."""
        self.store.relax_durability()
        with self._transaction():
            self._load()
        self.transport.on_message = self._on_message
        self.transport.on_connect = lambda: self._inbox.put(_CONNECTED)
        self.transport.on_disconnect = lambda reason: self._inbox.put(_DISCONNECTED)
        # While connected, the engine thread reads the connection in its own wait (inbox.py).
        self.transport.adopt()
        self.transport.on_lend = self._inbox.wake
        self.transport.will_factory = lambda: Will(self.topics.coordinator_presence, self._presence("offline", "lost"))
        self.transport.subscribe(self.topics.all_presence, 1)
        self.transport.subscribe(self.topics.all_results, 1)
        self.transport.subscribe(self.topics.coordinator_nudge, 0)
        if self.leader is not None:  # to replace a predecessor's late will (leader.py)
            self.transport.subscribe(self.topics.coordinator_presence, 1)
            # Woken from a freeze, the network thread would reconnect under the root's one client
            # id before the engine finds it was deposed: it waits until the lease is surely ours.
            self.transport.may_connect = self.leader.fresh
        self.transport.start()
        self.transport.wait_connected(self.settings.connect_timeout)
        log.info("coordinator ready: %d worker(s), %d job(s), %d open attempt(s) in %s",
                 len(self.workers.by_id), len(self.jobs.by_id), len(self.leases), self.store.url)

    def close(self) -> None:
        """Say goodbye (retained offline presence), publish the last status, disconnect."""
        if self.leader is not None and (self._deposed or not self.leader.epoch):
            # A standby never spoke; a deposed one must not: its successor's presence and rows
            # stand. DISCONNECT (not a dropped socket) also discards our will.
            if self._deposed:
                log.warning("stepping down without writing anything: %s", self._deposed)
            self.transport.close(defaults.DEPOSED_FLUSH_TIMEOUT)
            self.store.close()
            self._inbox.close()
            return
        try:
            if self.transport.connected:
                self._publish_status(self.clock(), force=True)
                self.transport.publish(self.topics.coordinator_presence, self._presence("offline", "shutdown"),
                                       qos=1, retain=True)
        except BrokerError as exc:
            log.warning("could not say goodbye to the broker: %s", exc)
        self.transport.close(defaults.STOP_FLUSH_TIMEOUT)
        try:  # `status` then says since when the coordinator is not running
            with self._transaction():
                self.store.beat(self._heartbeat(self.clock(), stopped=True))
            if self.leader is not None:
                self.leader.release()
        except (LeadLost, *self.store.failures) as exc:
            log.warning("could not record the stop in the store: %s", exc)
        self.store.close()
        self._inbox.close()

    def _heartbeat(self, now: float, stopped: bool = False) -> Heartbeat:
        return Heartbeat(self.started, now, now if stopped else None, not stopped and self.transport.connected,
                         self._identity["host"], self._identity["pid"], self.transport_url,
                         self.leader.epoch if self.leader is not None else 0)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """Every transaction of the engine: fenced first, so a deposed engine writes nothing."""
        with self.store.transaction():
            self._fence()
            yield

    def _fence(self) -> None:
        """First thing in every transaction of an elected engine: renew the lead, or raise
        LeadLost so that the transaction writes nothing (leader.py)."""
        if self.leader is not None:
            try:
                self.leader.fence()
            except LeadLost as exc:
                self._deposed = str(exc)
                raise

    def _load(self) -> None:
        self.workers.load()
        self.ledger.reset(Leases.load(self.store, self.payloads))
        self.jobs.clear()
        self.jobs.poll()
        self.status.everything_changed(self.jobs.by_id, self.workers.by_id)

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        # The reading thread (the engine's wait, or the network thread): enqueue only. A nudge
        # sets the flag before its item wakes the loop, so the step that takes the item polls
        # (_handle ignores the item itself).
        if topic == self.topics.coordinator_nudge:
            self._nudged = True
        elif topic == self.topics.coordinator_presence:
            if self.leader is not None and self.leader.fresh() and self.leader.outranks(payload):
                log.info("an older coordinator's presence was retained (its late will?): publishing ours again")
                self._publish(topic, self._presence("online"), retain=True)
            return
        self._inbox.put((topic, _Replayed(payload) if retained else payload))

    def _presence(self, state: str, reason: str | None = None) -> bytes:
        lead = self.leader.describe() if self.leader is not None else {}
        return encode_status({"state": state, "reason": reason, "started": self.started, **self._identity, **lead})

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
            # Messages wait in the inbox meanwhile; the connection is still read and kept alive,
            # and a stop request ends the wait (request_stop wakes it).
            self._inbox.wait(_RETRY_DELAY, until_item=False)
            return
        items = self._take(timeout)
        if gather > 0 and self._last_batch >= self.settings.busy_batch and len(items) < self.settings.busy_batch:
            time.sleep(gather)
            items += self._take(0.0, self.settings.batch_max - len(items))
        self._last_batch = len(items)
        now = self.clock()
        started = time.perf_counter()
        try:
            self.store.bind()
            self._step(items, now)
        except self.store.failures as exc:
            # The transaction was rolled back: memory no longer matches the store.
            log.error("database error, %d message(s) dropped; reloading the state: %s", len(items), exc)
            self._needs_reload = True
            if self.metrics is not None:
                self.metrics.rolled_back()
        self._heap.check(len(self.workers.by_id))
        if self.metrics is not None:
            self.metrics.stepped(len(items), time.perf_counter() - started)

    def _take(self, timeout: float, limit: int | None = None) -> list[tuple[str, bytes]]:
        """Up to ``limit`` (batch_max) messages from the inbox, waiting ``timeout`` for the first."""
        self._inbox.wait(timeout)
        return self._inbox.take(self.settings.batch_max if limit is None else limit)

    def _step(self, items: list[tuple[str, bytes]], now: float) -> None:
        if now >= self._next_beat:
            self._next_beat = now + defaults.HEARTBEAT_INTERVAL
            with self._transaction():
                self.store.beat(self._heartbeat(now))
        if now >= self._next_poll or self._nudged:
            self._nudged = False
            self._next_poll = now + self.settings.poll_interval
            for job in self.jobs.poll():
                self.status.job_changed(job.id)
        lease_due = now >= self._next_lease
        purge_due = now >= self._next_purge
        connected = self.transport.connected
        sends: list[tuple[str, bytes]] = []
        clears: list[str] = []
        if items or lease_due or purge_due or (connected and self.dispatcher.has_work(self.workers, self.jobs, self.leases)):
            self.ledger.finished = 0
            with self._transaction():
                for topic, payload in items:
                    if not topic:
                        self._connection_changed(payload == _CONNECTED[1], now)
                    else:
                        self._handle(topic, payload, now)
                if lease_due:
                    self._next_lease = now + self.settings.lease_check
                    if self._offline_since is None:  # no result can reach us while cut off
                        self._ask_expired(self.ledger.expire(now), now)
                        self._presume_silent_lost(now)
                self.ledger.flush(now)
                if self.unroutable is not None and lease_due:
                    for job in self.unroutable.check(self.jobs, self.workers, now):
                        self.status.job_changed(job.id)
                if purge_due:
                    self._next_purge = now + self.settings.purge_check
                    clears = self._purge(now)
                if connected:
                    # Read again: a task's attempt is sent (sent_at, its lease's start) when the
                    # round starts, after this step handled the results that freed its slot.
                    sends = self.dispatcher.dispatch(self.workers, self.jobs, self.leases, self.clock())
                    for worker_id in self.dispatcher.served:
                        self.status.worker_changed(worker_id)
                for job in self.jobs.complete(now):
                    log.info("job %s (%d tasks) finished: %d done, %d failed", job.name, job.total,
                             job.counts["done"], job.counts["failed"])
                    self.status.job_changed(job.id)
            self.rate.record(self.ledger.finished, now)
            if self.metrics is not None:
                self.metrics.committed(self.dispatcher.sent if sends else 0)  # tasks, not messages
        if self.leader is not None and not self.leader.fresh():
            return  # frozen since the commit, maybe deposed: publish nothing (leader.py)
        self._send(sends, clears, now)
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
        self.store.extend_deadlines(outage)
        self.workers.unconfirm_all()
        self.liveness.postpone(now)  # no beat could reach us either
        log.info("reconnected after %.1f s; leases extended by as much", outage)

    def _ask_expired(self, holders: set[int], now: float) -> None:
        """A worker that let a lease expire may be dead without a will (its broker restarted):
        no more work until it answers a rebirth request addressed to it."""
        for worker_id in holders:
            slot = self.workers.by_id.get(worker_id)
            if slot is not None and slot.state == WorkerState.ONLINE.value:
                log.info("worker %s let a lease expire: no new work until it shows life", slot.key)
                self.workers.ask(slot, now)
                if self._rebirth != []:  # [] already asks everyone
                    self._rebirth = (self._rebirth or []) + [slot.key]

    def _presume_silent_lost(self, now: float) -> None:
        """Workers that did not answer a rebirth request in time, or whose heartbeats stopped
        (coordinator/liveness.py), are lost, as by their will."""
        silent = [(slot, f"did not answer a rebirth request within {self.settings.rebirth_timeout:g} s")
                  for slot in self.workers.silent(now)]
        silent += [(slot, f"sent no heartbeat for {bound:g} s") for slot, bound in self.liveness.silent(self.workers, now)]
        for slot, why in silent:
            log.warning("worker %s %s: presumed lost; returning %d task(s) it held", slot.key, why,
                        self.leases.count(slot.id))
            self.workers.presume_lost(slot, now)
            self.status.worker_changed(slot.id)
            self.ledger.release(slot, f"worker {slot.key} {why} while holding the task")

    def _send(self, sends: list[tuple[str, bytes]], clears: list[str], now: float) -> None:
        if self._announce:
            self._announce = False
            self._publish(self.topics.coordinator_presence, self._presence("online"), retain=True)
            # A retained presence replayed on subscribe is no proof of life: ask every worker
            # to publish its presence again (after the subscriptions, so the answers reach us).
            self._rebirth = []
            self.workers.ask_all(now)
            # A restarted broker may have forgotten every retained status: publish them all.
            self.status.everything_changed(self.jobs.by_id, self.workers.by_id)
        if self._rebirth is not None:
            self._publish(self.topics.coordinator_rebirth, Rebirth(tuple(self._rebirth)).encode())
            self._rebirth = None
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
                            lambda: summary_status((), list(self.jobs.by_id.values()),
                                                   len(self.leases), self.rejections.snapshot(),
                                                   self.rate.rate(now), self.started, now,
                                                   census=self.workers.census()), now)
        self.jobs.trust.publish(self.transport, self.topics, now)  # status/volunteers/{volunteer}

    def _reload(self) -> bool:
        """Rebuild memory from the store after a failed transaction; True once it worked.

        Workers count as unconfirmed again, and the presence subscription is renewed: the
        broker resends every retained presence, so a will lost with the failed batch is seen
        again, and each worker is resent the attempts it holds (it ignores those it has, and
        answers again those whose results were lost)."""
        self._heap.thaw()  # the old state's cycles must be collectable (coordinator/heap.py)
        try:
            self.store.close()  # a broken connection (PostgreSQL restarted) is replaced
            self.store.relax_durability()
            with self._transaction():
                self._load()
        except self.store.failures as exc:
            log.error("reloading the state failed, retrying: %s", exc)
            return False
        self._needs_reload = False
        self.transport.subscribe(self.topics.all_presence, 1)
        self._announce = True  # every worker is unconfirmed again: ask them all to show life
        log.info("state reloaded: %d open attempt(s)", len(self.leases))
        return True

    # -- periodic ----------------------------------------------------------------------------
    def _purge(self, now: float) -> list[str]:
        """Purge long-lost workers; returns the retained presence topics to clear."""
        purged, elsewhere = self.workers.purge(self.settings.purge_after, now)
        for slot in purged:
            log.info("worker %s purged: lost for more than %g s", slot.key, self.settings.purge_after)
        for slot in purged + elsewhere:
            self.status.worker_changed(slot.id)
        return [self.topics.presence(slot.ref) for slot in purged]

    # -- introspection (tests, API) ------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """The status summary as it would be published now."""
        now = self.clock()
        return summary_status(list(self.workers), list(self.jobs.by_id.values()), len(self.leases),
                              self.rejections.snapshot(), self.rate.rate(now), self.started, now)



def coordinator_client_id(root: str) -> str:
    """The coordinator's MQTT client id for a topic root, the same in every process serving it."""
    return defaults.CLIENT_ID_TEMPLATE.format(root=root)


def clear_retained_presence(transport: Transport, topics: Topics, refs: list[WorkerRef]) -> None:
    """Forget purged workers on the broker: empty retained presence and status (for
    `dockercomp coordinator purge`, which purges in the store while `serve` may not be running)."""
    for ref in refs:
        transport.publish(topics.presence(ref), b"", qos=1, retain=True)
        transport.publish(topics.status_worker(ref), b"", qos=1, retain=True)
