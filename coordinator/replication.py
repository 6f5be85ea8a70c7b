"""A job's replication options, and how two replicas' values are compared (agreement).

``Replication`` is stored with the job (JSON text, NULL for the default single replica, so
jobs of older coordinators read as single-replica). Agreement is canonical-JSON equality
unless the job names a validator: a function ``validate(a, b) -> bool`` saying whether two
decoded values agree, registered under the entry-point group ``dockercomp.validators``
(built-in: ``tolerance``, floats within a relative 1e-6) or given as ``module:attr``.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
from dataclasses import asdict, dataclass
from functools import cached_property
from importlib.metadata import entry_points
from typing import Any, Callable

from dockercomp.coordinator.defaults import MAX_REPLICAS
from dockercomp.coordinator.errors import InvalidInput

log = logging.getLogger(__name__)

# Entry-point group of agreement functions a scientist's package may register.
VALIDATOR_GROUP = "dockercomp.validators"
# Replicas must come from distinct volunteers (accounts) or, relaxed, distinct workers.
DISTINCT = ("volunteer", "worker")

Validator = Callable[[Any, Any], bool]


@dataclass(frozen=True)
class Replication:
    replicas: int = 1  # replicas sent at first
    quorum: int = 1  # agreeing values that make the canonical result
    max_replicas: int = 1  # replicas issued at most before the task fails without quorum
    distinct: str = "volunteer"  # replicas go to distinct "volunteer"s or only distinct "worker"s
    validator: str | None = None  # agreement function; None: canonical-JSON equality
    adaptive: bool = False  # a trusted volunteer's result is accepted alone (bar spot checks)

    @cached_property
    def single(self) -> bool:
        """Today's behaviour: one attempt at a time, its value accepted as it comes. Cached:
        the engine asks once per result (cached_property writes the instance's __dict__
        directly, so the frozen dataclass allows it; equality and hashing see fields only)."""
        return self.quorum == 1 and self.replicas == 1 and not self.adaptive

    def to_json(self) -> str | None:
        return None if self.single and self.validator is None else json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> Replication:
        if not text:
            return SINGLE
        data = json.loads(text)
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    @classmethod
    def make(cls, replicas: int = 1, quorum: int | None = None, max_replicas: int | None = None,
             distinct: str = "volunteer", validator: str | None = None, adaptive: bool = False) -> Replication:
        """Options as a submitter gives them, checked (InvalidInput). ``quorum`` defaults to
        ``replicas``; ``max_replicas`` to twice ``replicas`` when replicated (room for a
        tie-breaker), else 1."""
        for label, value in (("replicas", replicas), ("quorum", quorum), ("max replicas", max_replicas)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InvalidInput(f"{label} {value!r} must be a whole number of at least 1")
        quorum = replicas if quorum is None else quorum
        if max_replicas is None:
            max_replicas = min(MAX_REPLICAS, 2 * replicas) if quorum > 1 else replicas
        if not quorum <= replicas <= max_replicas <= MAX_REPLICAS:
            raise InvalidInput(f"need quorum <= replicas <= max replicas <= {MAX_REPLICAS}, got "
                               f"{quorum} / {replicas} / {max_replicas}",
                               "e.g. --replicas 2 --quorum 2 --max-replicas 4")
        if distinct not in DISTINCT:
            raise InvalidInput(f"replicas must go to distinct 'volunteer' or 'worker', not {distinct!r}")
        if adaptive and quorum < 2:
            raise InvalidInput("--adaptive needs a quorum of at least 2 for untrusted volunteers",
                               "add --replicas 2 --quorum 2")
        if validator is not None:
            load_validator(validator)  # refuse an unknown name now, not in the engine
        return cls(replicas, quorum, max_replicas, distinct, validator, adaptive)


SINGLE = Replication()


# --------------------------------------------------------------------------- store rows
@dataclass(frozen=True)
class ReplicaAttempt:
    """An attempt of an unfinished task of a replicated job (to rebuild its votes on start)."""

    task_id: int
    args: str
    retries_from: int
    attempt_id: int
    number: int
    worker_id: int
    outcome: str
    value: str | None
    elapsed: float | None


@dataclass(frozen=True)
class VolunteerStats:
    """One volunteer's record: validated results and their credit (CPU-seconds), invalid and
    failed attempts, quarantine."""

    volunteer: str
    workers: int
    validated: int
    invalid: int
    failed: int
    credit: float
    quarantined: str | None  # the reason, while quarantined
    quarantined_at: float | None


# --------------------------------------------------------------------------- agreement
def canonical(value: Any) -> str:
    """Canonical JSON text: key order and spacing do not make two values disagree."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def tolerance(a: Any, b: Any, rel: float = 1e-6, abs_tol: float = 1e-9) -> bool:
    """Numbers agree within ``rel`` (relative) or ``abs_tol``; lists and objects agree element
    by element; anything else must be equal."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=rel, abs_tol=abs_tol)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(tolerance(x, y, rel, abs_tol) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(tolerance(a[k], b[k], rel, abs_tol) for k in a)
    return bool(a == b)


BUILTIN_VALIDATORS: dict[str, Validator] = {"tolerance": tolerance}


def load_validator(name: str) -> Validator:
    """A built-in, an entry point of VALIDATOR_GROUP, or ``module:attr``; InvalidInput if none."""
    if name in BUILTIN_VALIDATORS:
        return BUILTIN_VALIDATORS[name]
    for ep in entry_points(group=VALIDATOR_GROUP):
        if ep.name == name:
            try:
                func = ep.load()
            except Exception as exc:  # noqa: BLE001 - any import failure of a plugin
                raise InvalidInput(f"validator {name!r} cannot be loaded: {type(exc).__name__}: {exc}") from None
            return _callable(name, func)
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            return _callable(name, getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError, ValueError) as exc:
            raise InvalidInput(f"validator {name!r} cannot be loaded: {exc}") from None
    known = sorted({*BUILTIN_VALIDATORS, *(ep.name for ep in entry_points(group=VALIDATOR_GROUP))})
    raise InvalidInput(f"no validator named {name!r}",
                       f"known: {', '.join(known)}; or register one under the {VALIDATOR_GROUP} entry points")


def _callable(name: str, func: Any) -> Validator:
    if not callable(func):
        raise InvalidInput(f"validator {name!r} is not callable")
    return func  # type: ignore[no-any-return]
