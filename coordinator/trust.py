"""Reputation: which volunteers are trusted (adaptive replication), which are quarantined,
and the credit each earned.

- **Trusted:** ``TRUST_AFTER`` validated results in a row (agreeing with a quorum) and no value
  in a dispute still undecided; one invalid result makes a volunteer untrusted again. Kept in memory: a restarted coordinator trusts
  nobody until it is earned again (the safe direction).
- **Quarantined:** per job, a volunteer with at least ``QUARANTINE_MIN_RESULTS`` closed attempts
  whose failure or invalid rate is far above the rate of the job's other volunteers gets no
  new work until an operator lifts it (`dockercomp coordinator volunteers release`). Stored:
  it survives restarts; the engine re-reads it on every job poll, so a release shows at once.
- **Credit:** CPU-seconds (a result's ``elapsed``) of validated results, per volunteer; the
  store sums them (``volunteer_stats``), memory keeps the running total for the status topic.

Pure: no transport; writes go to the store inside the engine's transaction.
"""

from __future__ import annotations

import logging
from typing import Any

from dockercomp.broker.connection import Transport
from dockercomp.broker.errors import BrokerError, InvalidName
from dockercomp.broker.messages import encode_status
from dockercomp.broker.topics import Topics
from dockercomp.coordinator import defaults
from dockercomp.coordinator.store import AttemptOutcome, Store

log = logging.getLogger(__name__)

# Failures charged to a volunteer for quarantine: its machine or its code misbehaved. A lost
# connection or a refused task says nothing about the values it returns.
CHARGED = frozenset({AttemptOutcome.ERROR, AttemptOutcome.TIMEOUT, AttemptOutcome.CRASHED, AttemptOutcome.EXPIRED})
# Tally columns per (job, volunteer).
_CLOSED, _INVALID, _FAILED = 0, 1, 2


class Trust:
    """Streaks, per-job tallies, quarantines and credit of the volunteers."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.quarantined: dict[str, str] = {}  # volunteer -> reason
        self.streak: dict[str, int] = {}  # validated results in a row
        # Values of a volunteer in tasks whose replicas disagree, not yet decided: one of them
        # may turn out invalid, so the results after it do not make a streak yet (values are
        # decided out of order: a disputed one waits for a tie-breaker).
        self.disputed: dict[str, int] = {}
        self.credit: dict[str, float] = {}  # CPU-seconds validated since start (status topic)
        self.changed: set[str] = set()  # volunteers whose record changed since the last status
        # volunteer -> [validated, invalid, credit]: the store's totals at start plus what this
        # engine decided since (the status topic; read from the store once, not per publication).
        self.totals: dict[str, list[Any]] | None = None
        self._tally: dict[int, dict[str, list[int]]] = {}  # job -> volunteer -> [closed, invalid, failed]

    def refresh(self) -> bool:
        """Re-read the quarantines (an operator may have released one); True if they changed."""
        now = self.store.quarantines()
        if now == self.quarantined:
            return False
        for name in set(now) ^ set(self.quarantined):
            self.changed.add(name)
            if name not in now:
                log.info("volunteer %s released from quarantine", name)
                self.streak.pop(name, None)
                for tally in self._tally.values():
                    tally.pop(name, None)  # a fresh start, or it would be quarantined again at once
        self.quarantined = now
        return True

    def trusted(self, volunteer: str) -> bool:
        return (self.streak.get(volunteer, 0) >= defaults.TRUST_AFTER and not self.disputed.get(volunteer)
                and volunteer not in self.quarantined)

    def dispute(self, volunteer: str) -> None:
        self.disputed[volunteer] = self.disputed.get(volunteer, 0) + 1

    def settle(self, volunteer: str) -> None:
        left = self.disputed.get(volunteer, 0) - 1
        if left > 0:
            self.disputed[volunteer] = left
        else:
            self.disputed.pop(volunteer, None)

    # -- what happened to a volunteer's attempt -------------------------------------------------
    def accepted(self, job_id: int, volunteer: str) -> None:
        """A single-replica result: counted for the job's rates only (nothing validated it)."""
        tally = self._tally.get(job_id)
        if tally is None:
            tally = self._tally[job_id] = {}
        counts = tally.get(volunteer)
        if counts is None:
            tally[volunteer] = [1, 0, 0]
        else:
            counts[_CLOSED] += 1

    def validated(self, job_id: int, volunteer: str, elapsed: float) -> None:
        self.accepted(job_id, volunteer)
        self.streak[volunteer] = self.streak.get(volunteer, 0) + 1
        self.credited(volunteer, elapsed)
        self._total(volunteer)[0] += 1

    def accepted_alone(self, volunteer: str, elapsed: float) -> None:
        """A trusted volunteer's value accepted without replicas (adaptive): credited, no streak."""
        self.credited(volunteer, elapsed)
        self._total(volunteer)[0] += 1

    def credited(self, volunteer: str, elapsed: float) -> None:
        self.credit[volunteer] = self.credit.get(volunteer, 0.0) + max(0.0, elapsed)
        self._total(volunteer)[2] += max(0.0, elapsed)
        self.changed.add(volunteer)

    def _total(self, volunteer: str) -> list[Any]:
        if self.totals is None:
            self.totals = {s.volunteer: [s.validated, s.invalid, s.credit] for s in self.store.volunteer_stats()}
        return self.totals.setdefault(volunteer, [0, 0, 0.0])

    def status(self, volunteer: str, now: float) -> dict[str, Any]:
        """The retained status of one volunteer (docs/protocol.md, "Status topics")."""
        validated, invalid, credit = self._total(volunteer)
        return {"volunteer": volunteer, "credit": round(credit, 3), "validated": validated, "invalid": invalid,
                "streak": self.streak.get(volunteer, 0), "trusted": self.trusted(volunteer),
                "quarantined": self.quarantined.get(volunteer), "updated": round(now, 3)}

    def publish(self, transport: Transport, topics: Topics, now: float) -> None:
        """Publish the retained status of the volunteers whose record changed."""
        while self.changed:
            volunteer = self.changed.pop()
            try:
                topic = topics.status_volunteer(volunteer)
            except InvalidName:
                continue  # a quarantine stored by hand under a name no topic can carry
            try:
                transport.publish(topic, encode_status(self.status(volunteer, now)), qos=1, retain=True)
            except BrokerError as exc:
                self.changed.add(volunteer)
                log.warning("could not publish the status of volunteer %s: %s", volunteer, exc)
                return

    def invalid(self, job_id: int, volunteer: str, now: float) -> None:
        if self.streak.get(volunteer, 0) >= defaults.TRUST_AFTER:
            log.warning("volunteer %s returned an invalid result: no longer trusted", volunteer)
        self.streak[volunteer] = 0
        self.changed.add(volunteer)
        self._total(volunteer)[1] += 1
        self._count(job_id, volunteer, _INVALID, now)

    def failed(self, job_id: int, volunteer: str, outcome: AttemptOutcome, now: float) -> None:
        if outcome in CHARGED:
            self._count(job_id, volunteer, _FAILED, now)

    def forget_job(self, job_id: int) -> None:
        self._tally.pop(job_id, None)

    # -- quarantine -----------------------------------------------------------------------------
    def _count(self, job_id: int, volunteer: str, column: int, now: float) -> None:
        tally = self._tally.setdefault(job_id, {})
        counts = tally.setdefault(volunteer, [0, 0, 0])
        counts[_CLOSED] += 1
        counts[column] += 1
        if volunteer in self.quarantined or counts[_CLOSED] < defaults.QUARANTINE_MIN_RESULTS:
            return
        rate = counts[column] / counts[_CLOSED]
        others = [c for name, c in tally.items() if name != volunteer]
        closed = sum(c[_CLOSED] for c in others)
        if closed < defaults.QUARANTINE_MIN_RESULTS:
            return  # nobody to compare with: a function that fails for all is not a cheater
        base = sum(c[column] for c in others) / closed
        if rate >= defaults.QUARANTINE_MIN_RATE and rate >= defaults.QUARANTINE_FACTOR * base + defaults.QUARANTINE_MARGIN:
            what = "invalid" if column == _INVALID else "failed"
            reason = (f"job {job_id}: {counts[column]} of {counts[_CLOSED]} results {what} ({rate:.0%}), "
                      f"others {base:.0%}")
            self.quarantine(volunteer, reason, now)

    def quarantine(self, volunteer: str, reason: str, now: float) -> None:
        self.store.quarantine(volunteer, reason, now)
        self.quarantined[volunteer] = reason
        self.streak.pop(volunteer, None)
        self.changed.add(volunteer)
        log.warning("volunteer %s quarantined (no new work until released): %s", volunteer, reason)
