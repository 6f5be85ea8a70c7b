"""The coordinator's rules without a loop, a broker or a database: the worker registry, the
job book, dispatch and the attempt ledger over the in-memory store, on a fake clock. Unit
tests drive it with the messages a worker would send."""

from __future__ import annotations

from typing import Any

from dockercomp.broker.defaults import PROTOCOL_VERSION
from dockercomp.broker.messages import OfflineReason, Outcome, Presence, PresenceState, Result, Task, TaskError
from dockercomp.broker.topics import Topics, WorkerRef
from dockercomp.coordinator.dispatch import Dispatcher, JobBook
from dockercomp.coordinator.ledger import Ledger
from dockercomp.coordinator.leases import PayloadBuilder
from dockercomp.coordinator.registry import PresenceChange, WorkerRegistry, WorkerSlot
from dockercomp.coordinator.status import Rejections, StatusPublisher
from dockercomp.coordinator.store import JobRow, Store

# When the fake clock starts (any fixed point will do).
START = 1_000_000.0
# The lease margin of the rig's dispatcher, seconds.
MARGIN = 2.0


class Rules:
    """Registry, jobs, dispatch and ledger wired as the engine wires them, over ``memory://``
    (or another store ``url``: a SQLite file for what must hold in a database too)."""

    def __init__(self, url: str = "memory://") -> None:
        self.now = START
        self.store = Store.open(url)
        self.topics = Topics()
        self.workers = WorkerRegistry(self.store, self.topics)
        self.jobs = JobBook(self.store)
        self.status = StatusPublisher(self.topics)
        self.rejections = Rejections(clock=lambda: self.now)
        self.ledger = Ledger(self.store, self.workers, self.jobs, self.status, self.rejections)
        self.dispatcher = Dispatcher(self.store, PayloadBuilder(PROTOCOL_VERSION), MARGIN)
        self.seq: dict[str, int] = {}

    def tick(self, seconds: float) -> None:
        self.now += seconds

    # -- what workers say ----------------------------------------------------------------------
    def online(self, name: str, capacity: int = 1, prefetch: int = 0, functions: tuple[str, ...] = ("add",),
               started: float = 1.0, reconnect: bool = False) -> tuple[WorkerSlot, PresenceChange]:
        if reconnect or name not in self.seq:
            self.seq[name] = self.seq.get(name, 0) + 1
        presence = Presence(worker=name, volunteer="local", state=PresenceState.ONLINE, seq=self.seq[name],
                            capacity=capacity, prefetch=prefetch, functions=functions, started=started)
        return self.workers.apply(WorkerRef("local", name), presence, self.now)

    def offline(self, name: str, reason: OfflineReason = OfflineReason.LOST,
                seq: int | None = None) -> tuple[WorkerSlot, PresenceChange]:
        presence = Presence(worker=name, volunteer="local", state=PresenceState.OFFLINE,
                            seq=self.seq[name] if seq is None else seq, reason=reason)
        return self.workers.apply(WorkerRef("local", name), presence, self.now)

    def answer(self, name: str, task: Task, value: Any = None, outcome: Outcome = Outcome.OK,
               task_id: str | None = None, nonce: str | None = None, error_type: str | None = None) -> None:
        """``name`` answers ``task``, echoing its nonce unless ``nonce`` is given."""
        error = None if outcome is Outcome.OK else TaskError(error_type or outcome.value, "it broke")
        result = Result(task_id=task.task_id if task_id is None else task_id, attempt=task.attempt, worker=name,
                        volunteer="local", outcome=outcome, value=value, error=error, elapsed=0.1,
                        nonce=task.nonce if nonce is None else nonce)
        self.ledger.on_result(WorkerRef("local", name), result, self.now)

    # -- what the engine does each step --------------------------------------------------------
    def submit(self, args: list[list[Any]], max_attempts: int = 3, timeout: float = 10.0) -> JobRow:
        job = self.store.create_job("add", args, max_attempts=max_attempts, timeout=timeout)
        self.jobs.poll()
        return job

    def dispatch(self) -> dict[str, list[Task]]:
        """The step's writes, then a dispatch round; the tasks sent, per worker name."""
        self.flush()
        sent: dict[str, list[Task]] = {}
        for topic, payload in self.dispatcher.dispatch(self.workers, self.jobs, self.ledger.leases, self.now):
            sent.setdefault(topic.rsplit("/", 2)[-2], []).append(Task.decode(payload))
        return sent

    def flush(self) -> None:
        with self.store.transaction():
            self.ledger.flush(self.now)
            self.jobs.complete(self.now)

    def states(self, job: JobRow) -> list[str]:
        self.flush()
        return [row.state for row in self.store.results(job)]
