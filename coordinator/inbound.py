"""Messages from workers on the engine thread: presence (registry.py decides what changed, this
says what follows from it) and results (the ledger closes the attempt), each decoded strictly
and checked to name the worker whose topic it came on.

A mixin of Coordinator (service.py), which owns the state it uses.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, TypeVar, Union

from dockercomp.broker.batches import TASKS_KEY, Batch, ResultBatch, pack, read_results
from dockercomp.broker.defaults import MAX_BATCH_ITEMS
from dockercomp.broker.errors import DecodeError, InvalidName, InvalidTopic
from dockercomp.broker.messages import Presence, PresenceState, Result
from dockercomp.broker.topics import WORKER_TOPIC_KINDS, WorkerRef, WorkerTopic
from dockercomp.coordinator import defaults
from dockercomp.coordinator.leases import error_json
from dockercomp.coordinator.registry import PresenceChange
from dockercomp.coordinator.status import Rejection
from dockercomp.coordinator.store import WorkerState

if TYPE_CHECKING:
    from dockercomp.coordinator.service import Coordinator

log = logging.getLogger("dockercomp.coordinator.service")  # one logger name for the engine's lines

# A message from a worker: Presence or Result, both naming the worker that sent it, or a
# ResultBatch, whose items do.
_Sent = TypeVar("_Sent", Presence, Result, Union[Result, ResultBatch])


class _Replayed(bytes):
    """The payload of a retained message the broker replayed on subscribe (not published
    just now): a presence like this is no proof of life. A bytes subclass, so the inbox and
    every message that is not a presence are handled as before, at no cost."""



class Inbound:
    """Coordinator's handling of what workers send."""

    def _handle(self: "Coordinator", topic: str, payload: bytes, now: float) -> None:
        try:
            parsed = self._parse_topic(topic)
        except InvalidTopic as exc:
            if isinstance(exc.__cause__, InvalidName):
                # A worker topic whose names no agent may use (e.g. a '.' that RabbitMQ rewrites).
                self.rejections.reject(Rejection.MALFORMED, topic, str(exc.__cause__))
                self.status.summary_changed()
            return  # else amqtt replays other clients' retained messages on connect; not ours
        if parsed.kind == "presence":
            self._on_presence(parsed.ref, payload, now)
        elif parsed.kind == "results":
            self._on_result(parsed.ref, payload, now)

    def _parse_topic(self: "Coordinator", topic: str) -> WorkerTopic:
        """Topics.parse_worker_topic, remembered: the same topics recur. The cache starts over
        when full (a stream of new topics cannot grow it); a fleet bigger than it (50,000 workers
        send on 100,000 topics) misses it, and then a registered worker's topic is still not
        parsed (``_known_topic``). InvalidTopic is raised again on every call."""
        parsed = self._topic_cache.get(topic)
        if parsed is None:
            parsed = self._known_topic(topic) or self.topics.parse_worker_topic(topic)
            if len(self._topic_cache) >= defaults.TOPIC_CACHE:
                self._topic_cache.clear()
            self._topic_cache[topic] = parsed
        return parsed

    def _known_topic(self: "Coordinator", topic: str) -> WorkerTopic | None:
        """``topic`` parsed without parsing it when it is a registered worker's: its middle,
        ``{volunteer}/{worker}``, is the registry's key, whose names were checked when the worker
        registered; None for any other topic (a key holds exactly one '/', so a topic with more
        levels never matches one)."""
        if topic.startswith(self._workers_prefix):
            key, _, kind = topic[len(self._workers_prefix):].rpartition("/")
            slot = self.workers.by_key.get(key)
            if slot is not None and kind in WORKER_TOPIC_KINDS:
                return WorkerTopic(slot.ref, kind)
        return None

    def _decode_from(self: "Coordinator", ref: WorkerRef, kind: str, decode: Callable[[bytes], _Sent],
                     payload: bytes) -> _Sent | None:
        """A message decoded from ``ref``'s topic and naming ``ref`` itself, or None once the
        rejection is counted and logged."""
        try:
            message = decode(payload)
        except DecodeError as exc:
            self.ledger.reject(Rejection.MALFORMED, ref, f"{kind}: {exc.reason}")
            return None
        except Exception as exc:  # noqa: BLE001 - a decoder bug must not drop the whole batch
            self.ledger.reject(Rejection.MALFORMED, ref, f"{kind}: undecodable ({type(exc).__name__}: {exc})")
            return None
        if isinstance(message, Batch):
            return message  # its items name their worker: checked one by one (_on_result)
        if (message.volunteer, message.worker) != (ref.volunteer, ref.worker):
            self.ledger.reject(Rejection.MISMATCH, ref, f"{kind} names {message.volunteer}/{message.worker}")
            return None
        return message

    def _on_presence(self: "Coordinator", ref: WorkerRef, payload: bytes, now: float) -> None:
        if not payload:
            return  # a cleared retained presence (purge)
        live = not isinstance(payload, _Replayed)
        if live and self.liveness.beat(self.workers.get(ref.key), payload, now):
            return  # a heartbeat repeating what we know (coordinator/liveness.py)
        presence = self._decode_from(ref, "presence", Presence.decode, payload)
        if presence is None:
            return
        slot, change = self.workers.apply(ref, presence, now, live)
        if change is not PresenceChange.STALE and presence.state is not PresenceState.OFFLINE:
            slot.batch = min(presence.batch, MAX_BATCH_ITEMS)  # a hostile 2**62 gets the cap
        if live and change is not PresenceChange.STALE:
            self.liveness.applied(slot, presence, payload, now)
        self.status.worker_changed(slot.id)
        if change is PresenceChange.STALE:
            self.ledger.reject(Rejection.STALE, ref, f"{presence.state.value} presence of connection {presence.seq}, "
                         f"older than the current one ({slot.seq})", logging.INFO)
        elif change is PresenceChange.LOST:
            log.info("worker %s lost its connection; returning %d task(s) it held", ref.key,
                     self.leases.count(slot.id))
            self.ledger.release(slot, f"worker {ref.key} lost its connection (will) while holding the task")
        elif change is PresenceChange.SHUTDOWN:
            # A clean goodbye: what it still holds was sent after it stopped taking work (or its
            # answer is lost); handed back without using an attempt.
            held = self.leases.of_worker(slot.id)
            log.info("worker %s shut down; returning %d task(s) it held (no attempt used)", ref.key, len(held))
            error = error_json("WorkerShutdown", f"worker {ref.key} shut down while holding the task")
            for lease in held:
                self.ledger.hand_back(lease, error)
        elif change is PresenceChange.DRAINING:
            log.info("worker %s is draining: no new work; its %d task(s) keep running", ref.key,
                     self.leases.count(slot.id))
        elif change is PresenceChange.PAUSED or change is PresenceChange.RESUMED:
            log.info("worker %s %s (%d task(s) held)", ref.key, "paused: no new work" if change is
                     PresenceChange.PAUSED else "resumed: takes work again", self.leases.count(slot.id))
        elif change is PresenceChange.RESTARTED:
            log.info("worker %s restarted; returning %d task(s) the old process held",
                     ref.key, self.leases.count(slot.id))
            self.ledger.release(slot, f"worker {ref.key} restarted while holding the task")
        elif live and (change is PresenceChange.RECONNECTED or change is PresenceChange.ONLINE):
            # It may have missed tasks sent while it was away; it ignores those it still holds.
            held = [lease.payload for lease in self.leases.of_worker(slot.id)]
            self._resend += [(slot.tasks_topic, message) for message in (
                pack(TASKS_KEY, held, slot.batch) if slot.batch and held else held)]
        if change in (PresenceChange.NEW, PresenceChange.ONLINE) and slot.state == WorkerState.ONLINE.value:
            log.info("worker %s online: capacity %d, prefetch %d, functions %s", ref.key, slot.capacity,
                     slot.prefetch, ", ".join(sorted(slot.functions)) or "none")
            if slot.capacity <= 0:
                log.warning("worker %s announced capacity 0: it gets no work", ref.key)

    def _on_result(self: "Coordinator", ref: WorkerRef, payload: bytes, now: float) -> None:
        message = self._decode_from(ref, "result", read_results, payload)
        if message is None:
            return
        # The ledger closes each attempt, and records its latency for /metrics as it does.
        if isinstance(message, Result):
            self.ledger.on_result(ref, message, now)
            return
        # A ResultBatch: an envelope only; each result is checked and closes its attempt as if it
        # came alone. What is wrong inside is counted once per batch; the rest is handled.
        results = message.good
        bad, foreign = message.bad, [r for r in results if (r.volunteer, r.worker) != (ref.volunteer, ref.worker)]
        if bad:
            self.ledger.reject(Rejection.MALFORMED, ref, f"result batch: {len(bad)} of {len(message.items)} "
                               f"item(s) unreadable (item {bad[0].index}: {bad[0].error.reason})")
        if foreign:
            self.ledger.reject(Rejection.MISMATCH, ref, f"result batch: {len(foreign)} of {len(message.items)} "
                               f"result(s) name another worker ({foreign[0].volunteer}/{foreign[0].worker})")
            results = [r for r in results if (r.volunteer, r.worker) == (ref.volunteer, ref.worker)]
        for result in results:
            self.ledger.on_result(ref, result, now)
