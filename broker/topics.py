"""Every dockercomp topic, built and parsed in one place.

Layout (root ``dockercomp`` by default)::

    {root}/workers/{volunteer}/{worker}/presence   retained online/offline presence (worker)
    {root}/workers/{volunteer}/{worker}/tasks      work for one worker (coordinator -> worker)
    {root}/workers/{volunteer}/{worker}/results    results of that worker (worker -> coordinator)
    {root}/coordinator/presence                    retained coordinator presence
    {root}/coordinator/nudge                       "a job was submitted": look now (not retained)
    {root}/coordinator/rebirth                     "announce yourselves again" (coordinator -> workers)
    {root}/status/summary                          retained overall progress
    {root}/status/jobs/{job}                       retained progress of one job
    {root}/status/workers/{volunteer}/{worker}     retained counters of one worker
    {root}/status/volunteers/{volunteer}           retained credit, trust, quarantine of one volunteer

The volunteer is its own level, equal to the volunteer's broker user name, so a Mosquitto ACL
can confine a volunteer's workers with ``pattern write dockercomp/workers/%u/+/results``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dockercomp.broker.defaults import MAX_NAME_LENGTH, ROOT_TOPIC
from dockercomp.broker.errors import InvalidName, InvalidTopic

# One topic level: letters, digits, '_' and '-'. Not '.': RabbitMQ's MQTT plugin maps '/' to
# '.' in its routing keys, so a dot splits the level in two there (a worker "lab.1" was never
# seen by the coordinator); not '*', '+', '#': wildcards in MQTT or in RabbitMQ's bindings.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*\Z")
_DOTTED_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*\Z")
ALLOWED_NAME_CHARACTERS = "letters, digits, '_' and '-' only, starting with a letter or digit"
# Characters a supported broker rewrites or reads as wildcards inside a topic level.
REWRITTEN_CHARACTERS = ".*+#"

WORKER_TOPIC_KINDS = ("presence", "tasks", "results")


# Names that passed validation: every result and presence carries two names, and the same
# ones recur; a set lookup is ~20x cheaper than the regular expression. Bounded: an unbounded
# stream of new names only makes it start over. The bound holds the names of a fleet of
# 50,000 workers and their volunteers twice over (issue 14's scale; 16,384 made such a fleet
# start over all the time), at most ~12 MB of short names.
_VALID_NAMES: set[str] = set()
_VALID_NAMES_MAX = 131_072


def validate_name(value: object, what: str = "name", *, dots: bool = False) -> str:
    """Return ``value`` if it can be one topic level, else raise InvalidName.

    Letters, digits, ``_ -``, starting with a letter or digit: no ``/ + # * .`` (a level
    separator or wildcard in MQTT or in RabbitMQ, which maps '/' and '.' into each other),
    no ``$``, no spaces, nothing empty or longer than MAX_NAME_LENGTH.

    ``dots=True`` also allows '.' (after the first character), for names that are never a topic
    level: job names (status topics name a job by its id).
    """
    # type() is str, not isinstance: a str subclass could compare equal to a cached name
    # while being something else.
    if type(value) is str and value in _VALID_NAMES:
        return value
    if not isinstance(value, str):
        raise InvalidName(what, value, "must be a string")
    if not value:
        raise InvalidName(what, value, "must not be empty")
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidName(what, value, f"longer than {MAX_NAME_LENGTH} characters")
    if not _NAME.match(value) and not (dots and _DOTTED_NAME.match(value)):
        if dots:
            raise InvalidName(what, value, "use letters, digits, '_', '.' and '-' only, starting with a letter or digit")
        rewritten = "".join(sorted({c for c in value if c in REWRITTEN_CHARACTERS}))
        why = f" ({' '.join(repr(c) for c in rewritten)} would be rewritten or read as a wildcard by a broker such " \
              "as RabbitMQ)" if rewritten else ""
        raise InvalidName(what, value, f"use {ALLOWED_NAME_CHARACTERS}{why}")
    if type(value) is str and "." not in value:  # the cache holds topic levels only
        if len(_VALID_NAMES) >= _VALID_NAMES_MAX:
            _VALID_NAMES.clear()
        _VALID_NAMES.add(value)
    return value


@dataclass(frozen=True, order=True)
class WorkerRef:
    """A worker's identity: the volunteer who runs it and its name, unique per volunteer."""

    volunteer: str
    worker: str

    def __post_init__(self) -> None:
        validate_name(self.volunteer, "volunteer name")
        validate_name(self.worker, "worker id")

    @property
    def key(self) -> str:
        """``volunteer/worker``: the form stored and shown to people."""
        return f"{self.volunteer}/{self.worker}"

    @classmethod
    def parse(cls, key: str) -> "WorkerRef":
        volunteer, sep, worker = key.partition("/")
        if not sep:
            raise InvalidName("worker", key, "expected 'volunteer/worker'")
        return cls(volunteer, worker)

    def __str__(self) -> str:
        return self.key


@dataclass(frozen=True)
class WorkerTopic:
    """A parsed worker topic: whose, and which kind (presence, tasks or results)."""

    ref: WorkerRef
    kind: str


@dataclass(frozen=True)
class Topics:
    """Topic templates under one root."""

    root: str = ROOT_TOPIC

    def __post_init__(self) -> None:
        if not self.root or any(c in self.root for c in REWRITTEN_CHARACTERS) or self.root.startswith("/"):
            raise InvalidName("topic root", self.root,
                              "must be non-empty, without '.', '*', '+', '#' or a leading '/' ('.' and '*' are "
                              "rewritten or read as wildcards by RabbitMQ)")

    # -- per worker --------------------------------------------------------------------
    def presence(self, ref: WorkerRef) -> str:
        return f"{self.root}/workers/{ref.volunteer}/{ref.worker}/presence"

    def tasks(self, ref: WorkerRef) -> str:
        return f"{self.root}/workers/{ref.volunteer}/{ref.worker}/tasks"

    def results(self, ref: WorkerRef) -> str:
        return f"{self.root}/workers/{ref.volunteer}/{ref.worker}/results"

    # -- filters the coordinator subscribes to -------------------------------------------
    @property
    def all_presence(self) -> str:
        return f"{self.root}/workers/+/+/presence"

    @property
    def all_results(self) -> str:
        return f"{self.root}/workers/+/+/results"

    # -- coordinator and status ------------------------------------------------------------
    @property
    def coordinator_presence(self) -> str:
        return f"{self.root}/coordinator/presence"

    @property
    def coordinator_nudge(self) -> str:
        """Where a submitter says "new work is stored": the engine polls its jobs at once
        instead of at its next poll (a wake-up only: the payload is ignored, never retained)."""
        return f"{self.root}/coordinator/nudge"

    @property
    def coordinator_rebirth(self) -> str:
        return f"{self.root}/coordinator/rebirth"

    @property
    def status_summary(self) -> str:
        return f"{self.root}/status/summary"

    def status_job(self, job: str) -> str:
        return f"{self.root}/status/jobs/{validate_name(job, 'job name')}"

    def status_worker(self, ref: WorkerRef) -> str:
        return f"{self.root}/status/workers/{ref.volunteer}/{ref.worker}"

    def status_volunteer(self, volunteer: str) -> str:
        return f"{self.root}/status/volunteers/{validate_name(volunteer, 'volunteer name')}"

    @property
    def all_status(self) -> str:
        return f"{self.root}/status/#"

    @property
    def workers_prefix(self) -> str:
        """``{root}/workers/``: what every worker topic starts with."""
        return f"{self.root}/workers/"

    def parse_worker_topic(self, topic: str) -> WorkerTopic:
        """Split ``{root}/workers/{volunteer}/{worker}/{kind}``; InvalidTopic otherwise."""
        prefix = self.workers_prefix
        if not topic.startswith(prefix):
            raise InvalidTopic(topic, f"not below {prefix}")
        parts = topic[len(prefix):].split("/")
        if len(parts) != 3 or parts[2] not in WORKER_TOPIC_KINDS:
            raise InvalidTopic(topic, "expected workers/{volunteer}/{worker}/{presence|tasks|results}")
        try:
            return WorkerTopic(WorkerRef(parts[0], parts[1]), parts[2])
        except InvalidName as exc:
            raise InvalidTopic(topic, str(exc)) from exc
