"""The worker registry: who may take work, from what their presence messages say.

Each worker is mirrored in memory (``WorkerSlot``) and written through to the store on every
presence; the engine is the only writer of worker rows, so memory stays exact. What a
presence means for the work a worker holds (``PresenceChange``) is decided here from its
connection sequence (``seq``, Sparkplug B's bdSeq: a will carries the number of the
connection it belongs to) and its process start time; the ledger acts on it.

A stored "online" is hearsay until a live presence of the worker is seen by this coordinator
(``confirmed``): only confirmed workers get work. A retained presence the broker replays on
subscribe is no proof of life (the worker may have died while the broker was down, so no
will fired): the coordinator asks every worker to announce itself again (a rebirth request)
and presumes lost those that stay silent past a deadline (``awaiting``). Lost workers are
purged after a grace period.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from enum import Enum
from typing import Any, Iterator

from dockercomp.broker.messages import OfflineReason, Presence, PresenceState
from dockercomp.broker.topics import Topics, WorkerRef
from dockercomp.coordinator import defaults
from dockercomp.coordinator.status import worker_census
from dockercomp.coordinator.store import Store, WorkerRow, WorkerState

log = logging.getLogger(__name__)


class PresenceChange(str, Enum):
    NEW = "new"  # first presence ever seen from this worker
    ONLINE = "online"  # online again after being lost, offline or purged (same process)
    RECONNECTED = "reconnected"  # a new connection of the same process, or first seen since we started
    DRAINING = "draining"  # shutting down: keeps its work, gets no more
    PAUSED = "paused"  # paused (by its volunteer or idle-only mode): connected, gets no work
    RESUMED = "resumed"  # online again after a pause on the same connection
    RESTARTED = "restarted"  # a new agent process: whatever the old one held is gone
    LOST = "lost"  # its will: the connection dropped without goodbye
    SHUTDOWN = "shutdown"  # it said goodbye
    STALE = "stale"  # older than what we know (a will arriving after a newer connection)
    UNCHANGED = "unchanged"  # a repeat of what we know (retained presence seen again)


@dataclass(eq=False)
class WorkerSlot:
    """A worker as the engine sees it."""

    id: int
    ref: WorkerRef
    tasks_topic: str
    state: str
    seq: int
    started: float
    capacity: int
    functions: frozenset[str]
    prefetch: int = 0
    host: str = ""
    version: str = ""
    last_seen: float = 0.0
    lost_at: float | None = None
    done: int = 0
    failed: int = 0
    rejected: int = 0
    # Presence seen since this coordinator started: until then a stored "online" is hearsay.
    confirmed: bool = False
    # (capacity, prefetch) as its presence announced them; ``capacity`` and ``prefetch`` are
    # what the caps grant (Caps.grant).
    asked: tuple[int, int] = (0, 0)
    # The (asked, granted) last logged as capped: each change is logged once, not every presence.
    capped_note: tuple[int, int, int, int] | None = None
    # Marked lost for not answering a rebirth request (not by a will): a live online presence
    # of the same connection brings it back.
    presumed: bool = False

    @property
    def key(self) -> str:
        return self.ref.key

    @property
    def limit(self) -> int:
        """Most open attempts it may hold: ``capacity`` running plus ``prefetch`` queued."""
        return self.capacity + self.prefetch


@dataclass(frozen=True)
class Caps:
    """What a presence may claim, whatever it says: a worker announcing capacity 2**63-1 gets
    ``capacity``; the online workers of one volunteer share ``volunteer_capacity`` (the
    oldest first), so a volunteer cannot take a job by announcing many big workers."""

    capacity: int = defaults.MAX_WORKER_CAPACITY
    prefetch: int = defaults.MAX_PREFETCH
    volunteer_capacity: int = defaults.MAX_VOLUNTEER_CAPACITY
    volunteer_prefetch: int = defaults.MAX_VOLUNTEER_PREFETCH

    def grant(self, workers: list[WorkerSlot]) -> list[WorkerSlot]:
        """Set each of one volunteer's online workers' granted capacity and prefetch from what
        it asked; returns those whose grant changed."""
        room, queue = self.volunteer_capacity, self.volunteer_prefetch
        changed = []
        for slot in sorted(workers, key=lambda w: w.id):
            capacity = min(slot.asked[0], self.capacity, room)
            prefetch = min(slot.asked[1], self.prefetch, queue)
            room, queue = room - capacity, queue - prefetch
            note = (*slot.asked, capacity, prefetch)
            if (capacity, prefetch) != slot.asked and note != slot.capped_note:
                log.warning("worker %s asked for capacity %d and prefetch %d; granted %d and %d (caps: "
                            "%d and %d per worker, %d and %d per volunteer)", slot.key, *note, self.capacity,
                            self.prefetch, self.volunteer_capacity, self.volunteer_prefetch)
                slot.capped_note = note
            if (capacity, prefetch) != (slot.capacity, slot.prefetch):
                slot.capacity, slot.prefetch = capacity, prefetch
                changed.append(slot)
        return changed


class WorkerRegistry:
    """Workers known to the store, kept in memory and written through on every presence."""

    def __init__(self, store: Store, topics: Topics, caps: Caps | None = None) -> None:
        self.store = store
        self.topics = topics
        self.caps = caps or Caps()
        self._of_volunteer: dict[str, list[WorkerSlot]] = {}  # each volunteer's workers: its caps' share
        self.by_key: dict[str, WorkerSlot] = {}
        self.by_id: dict[int, WorkerSlot] = {}
        # dispatchable(), kept between presence changes: sorting 1,000 workers on every
        # engine step was a visible share of the dispatch cost at scale.
        self._census: tuple[Counter[str], int] | None = None
        self._dispatchable = None
        # Workers asked to show life (rebirth): worker id -> when silence makes them lost.
        self.awaiting: dict[int, float] = {}
        # Seconds a worker known only from a replayed presence has to show life.
        self.answer_timeout = float("inf")

    def load(self) -> None:
        self.by_key.clear()
        self.by_id.clear()
        self._of_volunteer.clear()
        self._dispatchable = None
        for row in self.store.workers():
            try:
                ref = WorkerRef(row.volunteer, row.name)
            except ValueError:
                log.warning("ignoring stored worker %r: its name is not valid any more", row.key)
                continue
            self._add(row, ref, confirmed=False)
        for volunteer in list(self._of_volunteer):
            self._cap(volunteer)  # the caps may be lower than when the rows were written

    def _add(self, row: WorkerRow, ref: WorkerRef, confirmed: bool) -> WorkerSlot:
        slot = WorkerSlot(
            id=row.id, ref=ref, tasks_topic=self.topics.tasks(ref), state=row.state, seq=row.seq,
            started=row.started, capacity=row.capacity, functions=frozenset(row.functions),
            prefetch=row.prefetch, host=row.host, version=row.version, last_seen=row.last_seen, lost_at=row.lost_at,
            done=row.tasks_done, failed=row.tasks_failed, confirmed=confirmed, asked=(row.capacity, row.prefetch),
        )
        self.by_key[slot.key] = slot
        self.by_id[slot.id] = slot
        self._of_volunteer.setdefault(ref.volunteer, []).append(slot)
        self._dispatchable = None
        return slot

    # Every change of a worker's state or grant drops the dispatchable list (``_dispatchable =
    # None``); the census goes with it, so it is counted again only after such a change.
    @property
    def _dispatchable(self) -> list[WorkerSlot] | None:
        return self._dispatchable_list

    @_dispatchable.setter
    def _dispatchable(self, value: list[WorkerSlot] | None) -> None:
        self._dispatchable_list = value
        if value is None:
            self._census = None

    def census(self) -> tuple[Counter[str], int]:
        """(workers per state, online capacity), kept until the next change: the status summary
        asks twice a second, and counting 50,000 workers took ~20 ms each time (issue 14)."""
        if self._census is None:
            self._census = worker_census(self.by_id.values())
        return self._census

    def get(self, key: str) -> WorkerSlot | None:
        return self.by_key.get(key)

    def __iter__(self) -> Iterator[WorkerSlot]:
        return iter(list(self.by_id.values()))

    def dispatchable(self) -> list[WorkerSlot]:
        """Online workers confirmed since start that take work, in a stable order (do not
        modify the list: it is kept until the next presence change)."""
        if self._dispatchable is None:
            self._dispatchable = [w for _, w in sorted(self.by_id.items())
                                  if w.state == WorkerState.ONLINE.value and w.confirmed and w.capacity > 0
                                  and w.functions]
        return self._dispatchable

    def unconfirm_all(self) -> None:
        """Until its presence is seen again, no worker gets work (after a broker outage)."""
        for worker in self.by_id.values():
            worker.confirmed = False
        self.awaiting.clear()  # nobody could answer while we were cut off: a new round starts
        self._dispatchable = None

    def ask_all(self, now: float) -> None:
        """A rebirth request went out to everyone: each online worker not confirmed yet must
        answer within ``answer_timeout``."""
        deadline = now + self.answer_timeout
        for worker in self.by_id.values():
            if not worker.confirmed and worker.state in _ALIVE:
                self.awaiting[worker.id] = min(self.awaiting.get(worker.id, deadline), deadline)

    def ask(self, slot: WorkerSlot, now: float) -> None:
        """Ask one worker to show life (its lease expired): no work until it does."""
        slot.confirmed = False
        self._dispatchable = None
        self.awaiting.setdefault(slot.id, now + self.answer_timeout)

    def silent(self, now: float) -> list[WorkerSlot]:
        """The workers whose deadline to answer passed without a live presence (taken off the
        list: the caller marks them lost)."""
        due = [worker_id for worker_id, deadline in self.awaiting.items() if deadline <= now]
        silent = []
        for worker_id in due:
            del self.awaiting[worker_id]
            slot = self.by_id.get(worker_id)
            if slot is not None and not slot.confirmed and slot.state in _ALIVE:
                silent.append(slot)
        return silent

    def presume_lost(self, slot: WorkerSlot, now: float) -> None:
        """Mark a silent worker lost (as its will would have); its work is the caller's to return."""
        self._dispatchable = None
        self.store.update_worker(slot.id, state=WorkerState.LOST.value, last_seen=slot.last_seen, lost_at=now)
        slot.state, slot.lost_at, slot.presumed = WorkerState.LOST.value, now, True
        self._cap(slot.ref.volunteer)  # its share of the volunteer's caps goes back to the others

    def apply(self, ref: WorkerRef, presence: Presence, now: float,
              live: bool = True) -> tuple[WorkerSlot, PresenceChange]:
        """Record a presence message; says what it means for the work the worker holds.
        ``live``: published just now, not a retained one the broker replays on subscribe; only
        a live online (or draining) presence confirms a worker."""
        slot = self.by_key.get(ref.key)
        online = presence.state is PresenceState.ONLINE
        self._dispatchable = None
        # Presumed lost for its silence, it now answers on the same connection: alive after all.
        revived = False
        if slot is not None and live and presence.state is not PresenceState.OFFLINE:
            self.awaiting.pop(slot.id, None)
            revived = slot.presumed and presence.seq == slot.seq and slot.state == WorkerState.LOST.value
        if slot is None:
            state = WorkerState.ONLINE if online else _HOLDING.get(presence.state, WorkerState.LOST)
            row = self.store.add_worker(ref.key, ref.volunteer, ref.worker, now, state=state.value, seq=presence.seq,
                                        lost_at=None if state is not WorkerState.LOST else now,
                                        **_details(presence, self.caps))
            slot = self._add(row, ref, confirmed=live)
            slot.asked = (presence.capacity, presence.prefetch)
            self._cap(ref.volunteer)
            self._await_if_replayed(slot, live, now)
            return slot, PresenceChange.NEW
        if presence.seq < slot.seq:
            return slot, PresenceChange.STALE
        holding = _HOLDING.get(presence.state)
        if holding is not None:  # draining or paused: connected, keeps its work, gets no more
            if presence.seq == slot.seq and slot.state not in _ALIVE and not revived:
                return slot, PresenceChange.STALE  # its goodbye or will was already seen
            change = PresenceChange.UNCHANGED if slot.state == holding.value else PresenceChange(holding.value)
            self._update(slot, presence, holding, now)
            slot.confirmed = slot.confirmed or live
            self._cap(ref.volunteer)  # it takes nothing: its share goes to the others
            self._await_if_replayed(slot, live, now)
            return slot, change
        if online:
            resumed = slot.state == WorkerState.PAUSED.value
            if presence.seq == slot.seq and slot.state != WorkerState.ONLINE.value and not (revived or resumed):
                # This connection's will or goodbye was already seen: the online is older news.
                return slot, PresenceChange.STALE
            if slot.started and presence.started and presence.started != slot.started:
                change = PresenceChange.RESTARTED
            elif resumed and presence.seq == slot.seq:
                change = PresenceChange.RESUMED
            elif slot.state != WorkerState.ONLINE.value:
                change = PresenceChange.ONLINE
            elif presence.seq > slot.seq or not slot.confirmed:
                change = PresenceChange.RECONNECTED
            else:
                change = PresenceChange.UNCHANGED
            self._update(slot, presence, WorkerState.ONLINE, now)
            slot.confirmed = slot.confirmed or live
            self._cap(ref.volunteer)
            self._await_if_replayed(slot, live, now)
            return slot, change
        if presence.seq == slot.seq and slot.state not in _ALIVE:
            return slot, PresenceChange.UNCHANGED
        shutdown = presence.reason is OfflineReason.SHUTDOWN
        self._update(slot, presence, WorkerState.OFFLINE if shutdown else WorkerState.LOST, now)
        slot.confirmed = True
        self._cap(ref.volunteer)  # its share of the volunteer's caps goes back to the others
        return slot, PresenceChange.SHUTDOWN if shutdown else PresenceChange.LOST

    def _await_if_replayed(self, slot: WorkerSlot, live: bool, now: float) -> None:
        """Known from a replayed presence only: it must show life like the others asked."""
        if not live and not slot.confirmed and slot.state in _ALIVE:
            self.awaiting.setdefault(slot.id, now + self.answer_timeout)

    def _update(self, slot: WorkerSlot, presence: Presence, state: WorkerState, now: float) -> None:
        online = state.value in _ALIVE
        fields: dict[str, Any] = {"state": state.value, "seq": presence.seq, "last_seen": now}
        if online:
            fields.update(_details(presence, self.caps), lost_at=None, purged_at=None)
            slot.started, slot.asked = presence.started, (presence.capacity, presence.prefetch)
            slot.capacity, slot.prefetch = fields["capacity"], fields["prefetch"]
            slot.functions = frozenset(presence.functions)
            slot.host, slot.version = presence.host, presence.version
            slot.lost_at = None
        elif state is WorkerState.LOST:
            fields["lost_at"] = now
            slot.lost_at = now
        slot.presumed = False
        self.store.update_worker(slot.id, **fields)
        slot.state, slot.seq, slot.last_seen = state.value, presence.seq, now

    def _cap(self, volunteer: str) -> None:
        """Share the volunteer's caps among its online workers again; write changed grants."""
        online = [w for w in self._of_volunteer.get(volunteer, ()) if w.state == WorkerState.ONLINE.value]
        for slot in self.caps.grant(online):
            self.store.update_worker(slot.id, capacity=slot.capacity, prefetch=slot.prefetch)
            self._dispatchable = None

    def purge(self, older_than: float, now: float) -> tuple[list[WorkerSlot], list[WorkerSlot]]:
        """Purge the workers lost for more than ``older_than`` seconds. Returns them (their
        retained presence is to be cleared), then those `dockercomp coordinator purge` purged
        meanwhile (it cleared their presence itself)."""
        purged = [slot for row in self.store.purge_lost(older_than, now)
                  if (slot := self._mark_purged(row.id)) is not None]
        lost = [w.id for w in self.by_id.values() if w.state == WorkerState.LOST.value]
        elsewhere = [slot for worker_id in (self.store.purged_among(lost) if lost else [])
                     if (slot := self._mark_purged(worker_id)) is not None]
        return purged, elsewhere

    def _mark_purged(self, worker_id: int) -> WorkerSlot | None:
        slot = self.by_id.get(worker_id)
        if slot is not None:
            slot.state = WorkerState.PURGED.value
            self._dispatchable = None
        return slot


# Worker states that hold work and must show life when asked.
_ALIVE = (WorkerState.ONLINE.value, WorkerState.DRAINING.value, WorkerState.PAUSED.value)

# Presence states of a connected worker that takes no new work, and the worker state each means.
_HOLDING = {PresenceState.DRAINING: WorkerState.DRAINING, PresenceState.PAUSED: WorkerState.PAUSED}


def _details(presence: Presence, caps: Caps) -> dict[str, Any]:
    """The worker row's fields from a presence, its numbers within the caps (the volunteer's
    share is settled afterwards by ``WorkerRegistry._cap``)."""
    return {
        "host": presence.host, "container": presence.container, "image": presence.image,
        "version": presence.version, "cpus": min(presence.cpus, defaults.MAX_REPORTED_CPUS),
        "capacity": min(presence.capacity, caps.capacity), "prefetch": min(presence.prefetch, caps.prefetch),
        "functions": sorted(presence.functions), "started": presence.started,
    }
