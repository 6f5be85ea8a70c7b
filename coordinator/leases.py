"""Leases: the open attempts, kept in memory, and the task messages sent for them.

Every dispatch opens an attempt with a deadline (the job's timeout plus a margin, plus the
wait in the worker's queue for a prefetched task: ``Dispatcher.deadline``). The engine
keeps the open attempts in memory (``Leases``), indexed by wire identity (task id, attempt
number), by task and by worker, so a result, a will or a deadline finds them without a query.
They are rebuilt from the store on start: the store is the truth, memory an index of it.

The ledger (ledger.py) gathers one engine step's closings and acceptances in a
``store.Changes`` and the store writes them in a few statements at the end of the step
(inside the step's transaction), so a burst of results costs a handful of queries, not
several per result.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from dataclasses import dataclass
from typing import Iterator

from dockercomp.coordinator.defaults import NONCE_BYTES
from dockercomp.coordinator.store import Store, dump_json


@dataclass(slots=True, eq=False)
class Lease:
    """One open attempt: sent to ``worker_id``, answer expected before ``deadline``."""

    attempt_id: int
    task_id: int
    number: int  # attempt number, 1-based, as on the wire
    job_id: int
    worker_id: int
    sent_at: float
    deadline: float  # wall-clock time (seconds since the epoch), survives restarts
    timeout: float  # the job's time limit per task, as sent
    retries_from: int  # the task's attempt count when `retry` last renewed its budget
    payload: bytes  # the task message, kept to resend when the worker reconnects
    nonce: str  # the attempt's secret (sent in the task message): its result must echo it

    @property
    def key(self) -> tuple[int, int]:
        return (self.task_id, self.number)

    def budget_used(self) -> int:
        """Attempts counted against the job's max_attempts, this one included."""
        return self.number - self.retries_from


class Leases:
    """The open attempts, indexed three ways."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[int, int], Lease] = {}
        self._by_task: dict[int, Lease] = {}
        self._by_worker: dict[int, dict[tuple[int, int], Lease]] = {}
        # Per worker, how many of its leases have each timeout: the longest one bounds how
        # long the tasks ahead of a prefetched task can take (Dispatcher.deadline).
        # (Plain dicts, not Counters: a fleet of 50,000 workers makes 50,000 of them at once.)
        self._timeouts: dict[int, dict[float, int]] = {}
        # Workers a lease was removed from since dispatch last looked: they may have room
        # again (coordinator/room.py), so a round need not count every worker's leases.
        self.freed: set[int] = set()

    def __len__(self) -> int:
        return len(self._by_key)

    def add(self, lease: Lease) -> None:
        old = self._by_key.get(lease.key)
        if old is not None:
            self.remove(old)
        self._by_key[lease.key] = lease
        self._by_task[lease.task_id] = lease
        self._by_worker.setdefault(lease.worker_id, {})[lease.key] = lease
        timeouts = self._timeouts.get(lease.worker_id)
        if timeouts is None:
            timeouts = self._timeouts[lease.worker_id] = {}
        timeouts[lease.timeout] = timeouts.get(lease.timeout, 0) + 1

    def get(self, task_id: int, number: int) -> Lease | None:
        return self._by_key.get((task_id, number))

    def of_task(self, task_id: int) -> Lease | None:
        return self._by_task.get(task_id)

    def remove(self, lease: Lease) -> None:
        if self._by_key.get(lease.key) is not lease:
            return  # not held (any more): removing twice must not uncount another lease
        del self._by_key[lease.key]
        if self._by_task.get(lease.task_id) is lease:
            del self._by_task[lease.task_id]
        held = self._by_worker.get(lease.worker_id)
        if held is not None:
            held.pop(lease.key, None)
        self.freed.add(lease.worker_id)
        timeouts = self._timeouts[lease.worker_id]
        left = timeouts[lease.timeout] - 1
        if left > 0:
            timeouts[lease.timeout] = left
        else:
            del timeouts[lease.timeout]

    def of_worker(self, worker_id: int) -> list[Lease]:
        return list(self._by_worker.get(worker_id, {}).values())

    def count(self, worker_id: int) -> int:
        held = self._by_worker.get(worker_id)
        return len(held) if held else 0

    def longest_timeout(self, worker_id: int) -> float:
        """The longest time limit among the tasks the worker holds (0 when it holds none)."""
        timeouts = self._timeouts.get(worker_id)
        return max(timeouts) if timeouts else 0.0

    def expired(self, now: float) -> list[Lease]:
        # A linear pass: open attempts number at most the fleet's total capacity.
        return [lease for lease in self._by_key.values() if lease.deadline <= now]

    def __iter__(self) -> Iterator[Lease]:
        return iter(list(self._by_key.values()))

    @classmethod
    def load(cls, store: Store, payloads: "PayloadBuilder") -> "Leases":
        """Every open attempt in the store, with its task message rebuilt for resending."""
        leases = cls()
        for row in store.open_leases():
            payload = payloads.build(row.task_id, row.job_id, row.number, row.function, row.args, row.timeout,
                                     row.nonce)
            leases.add(Lease(row.attempt_id, row.task_id, row.number, row.job_id, row.worker_id, row.sent_at,
                             row.deadline, row.timeout, row.retries_from, payload, row.nonce))
        return leases


class PayloadBuilder:
    """Task messages built from the stored JSON text of the arguments, without re-encoding
    them; byte-for-byte what ``broker.messages.Task(...).encode()`` produces."""

    def __init__(self, version: int) -> None:
        self._prefix = '{"v":%d,"task_id":"' % version
        # (function, timeout) -> the text around the arguments: a job's tasks all share it.
        self._parts: dict[tuple[str, float], tuple[str, str]] = {}

    def build(self, task_id: int, job_id: int, attempt: int, function: str, args_json: str, timeout: float,
              nonce: str) -> bytes:
        parts = self._parts.get((function, timeout))
        if parts is None:
            if len(self._parts) >= 1024:  # one entry per job shape; a long-running engine sees many
                self._parts.clear()
            parts = self._parts[(function, timeout)] = (
                f',"function":{json.dumps(function)},"args":', f',"timeout":{json.dumps(float(timeout))}}}')
        # The nonce is new_nonces()'s URL-safe base64 (or "" for an attempt opened before nonces
        # existed): nothing in it needs JSON escaping.
        head = f'{self._prefix}{task_id}","job_id":"{job_id}","attempt":{attempt},"nonce":"{nonce}"'
        return f"{head}{parts[0]}{args_json}{parts[1]}".encode()


# Characters of one nonce: NONCE_BYTES is a multiple of 3, so base64 needs no padding.
_NONCE_CHARS = NONCE_BYTES // 3 * 4


def new_nonces(count: int) -> list[str]:
    """``count`` fresh nonces from one draw of the system's random source: each exactly what
    ``secrets.token_urlsafe(NONCE_BYTES)`` gives, at a quarter of the cost (once per task)."""
    text = base64.urlsafe_b64encode(os.urandom(NONCE_BYTES * count)).decode("ascii")
    return [text[i:i + _NONCE_CHARS] for i in range(0, len(text), _NONCE_CHARS)]


def nonce_matches(expected: str, received: str) -> bool:
    """Whether a result carries its attempt's nonce; an attempt stored without one (opened by
    a coordinator older than nonces) matches nothing, so its answer cannot be forged either:
    it expires and is sent again with a nonce."""
    return bool(expected) and secrets.compare_digest(expected.encode(), received.encode())


def error_json(kind: str, message: str, traceback: str = "") -> str:
    return dump_json({"type": kind, "message": message, "traceback": traceback})
