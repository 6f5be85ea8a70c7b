"""A standby coordinator: which of several `serve` processes on one store is active.

Every `serve` is a candidate (``Leader``). Before it connects to the broker it waits as the
standby, claiming the lead (leadership.py) every ``poll`` seconds; it neither subscribes nor
dispatches until it holds it. Once it does, the engine (service.py) loads the state from the
store, connects, asks every worker to show life and resends the open attempts, as after a
restart. While active, each engine transaction starts with ``fence()``: it renews the lease
under the epoch won, and raises LeadLost when another took over meanwhile, so the transaction
rolls back with nothing written. A coordinator deposed so (it was frozen, or cut off from the
database for longer than the lease) closes its broker connection without a goodbye (the
successor's presence stays), writes nothing, and starts again as the standby: `serve`
re-executes itself (``restart_as_standby``), same command line, same pid.

Takeover after a crash: the lease runs out within ``ttl`` seconds, the standby claims it at
its next poll (a holder on this host whose pid is gone is replaced at once).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any, Callable

from dockercomp.broker.messages import decode_status
from dockercomp.coordinator import defaults
from dockercomp.coordinator.errors import CoordinatorError
from dockercomp.coordinator.leadership import Holder, Lead
from dockercomp.coordinator.store import Store

log = logging.getLogger(__name__)


class LeadLost(CoordinatorError):
    """Another coordinator took the lead over: this one must stop writing and dispatching."""


class Leader:
    """This process's candidacy for the active role on ``store``."""

    def __init__(self, store: Store, ttl: float = defaults.LEASE_TTL, poll: float | None = None,
                 holder: Holder | None = None, on_standby: Callable[[str], None] | None = None) -> None:
        self.store = store
        self.ttl = ttl
        self.poll = poll if poll is not None else ttl * defaults.STANDBY_POLL_SHARE
        self.holder = holder or Holder.mine()
        self.epoch = 0  # the epoch won; 0 while standby
        self.since: float | None = None  # when it was won (the database's clock)
        self._renewed = float("-inf")  # time.monotonic() before the last renewal that succeeded
        self.on_standby = on_standby or log.info  # `serve` prints it: an operator must see it

    # -- standby -----------------------------------------------------------------------------
    def wait(self, stop: threading.Event) -> bool:
        """Block as the standby until this process holds the lead (True), or ``stop`` is set
        (False). Store failures are logged and retried: the database may come back."""
        self.store.fence_sessions(self.ttl)
        told = ""
        take_from: int | None = None
        while not stop.is_set():
            asked = time.monotonic()
            try:
                lead = self.store.claim_lead(self.holder, self.ttl, take_from)
            except self.store.failures as exc:
                if str(exc) != told:  # once per kind of failure, not every poll
                    told = str(exc)
                    log.warning("standby: cannot claim the lead, retrying every %g s: %s", self.poll, exc)
                stop.wait(self.poll)
                continue
            if lead.held_by(self.holder):
                self.epoch, self.since, self._renewed = lead.epoch, lead.since, asked
                log.info("active: this coordinator (%s, pid %d on %s) holds the lead, epoch %d",
                         self.holder.id, self.holder.pid, self.holder.host, lead.epoch)
                return True
            take_from = lead.epoch if self._gone(lead) else None
            if take_from is not None:
                log.info("standby: the active coordinator (pid %d on this host) is gone: taking over", lead.pid)
                continue
            active = f"{lead.holder} (pid {lead.pid} on {lead.host}), epoch {lead.epoch}"
            if active != told:
                told = active
                self.on_standby(f"standby: coordinator {active} is active; this one takes over if its "
                                f"lease ({self.ttl:g} s) runs out")
            stop.wait(self.poll)
        return False

    def _gone(self, lead: Lead) -> bool:
        """The holder ran on this host and its process no longer exists (a crash): waiting out
        its lease would only delay the takeover. Safety never rests on this: fencing does."""
        if lead.host != self.holder.host or lead.pid == self.holder.pid or lead.pid <= 0 or lead.expired:
            return False
        try:
            os.kill(lead.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:  # exists, another user's
            return False
        return False

    # -- active ------------------------------------------------------------------------------
    def fence(self) -> None:
        """Inside the engine's transaction, before it writes: renew the lease of our epoch, or
        raise LeadLost (the caller's transaction then rolls back)."""
        asked = time.monotonic()
        if not self.store.renew_lead(self.epoch, self.ttl):
            raise LeadLost(f"another coordinator took the lead over (this one held epoch {self.epoch})")
        self._renewed = asked

    def fresh(self) -> bool:
        """Whether the lease is surely still ours by our own clock, without asking the database:
        the engine publishes what it committed only then. A process frozen between its commit
        and its publishes wakes past it, and leaves them to its successor (which resends every
        open attempt) or, if none took over, to the attempts' leases."""
        return time.monotonic() - self._renewed < self.ttl

    def release(self) -> None:
        """A clean stop: let the standby take over at once (best effort)."""
        if self.epoch:
            try:
                self.store.release_lead(self.epoch)
            except self.store.failures as exc:
                log.warning("could not release the lead (the standby waits for it to expire): %s", exc)

    def describe(self) -> dict[str, Any]:
        """The fields the coordinator's presence carries to say which one is active."""
        return {"role": "active", "id": self.holder.id, "epoch": self.epoch, "since": self.since}

    def outranks(self, payload: bytes) -> bool:
        """Whether a coordinator presence seen on the broker is an older one's (a lower epoch,
        or none: e.g. the will of a frozen predecessor, fired after we took over) or garbage, which the
        active one then replaces with its own. A newer epoch is left alone: this one is the
        stale one, and its next transaction will tell it."""
        try:
            seen = decode_status(payload) if payload else {}
        except ValueError:
            return True
        if seen.get("id") == self.holder.id:
            return False
        epoch = seen.get("epoch")
        # The same epoch under another id cannot be a real coordinator's: each epoch has one holder.
        return not isinstance(epoch, int) or isinstance(epoch, bool) or epoch <= self.epoch


def restart_as_standby() -> None:
    """Start this `serve` over as the standby: re-execute the same command line (same pid).
    Nothing of the deposed engine's memory can leak into its next term."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    except OSError as exc:
        raise CoordinatorError(f"stepped down, but could not start again as the standby ({exc}): "
                               "start `dockercomp coordinator serve` again") from None
