"""FakeAgent: a worker that speaks dockercomp's protocol over any Transport, with no process
behind it: the in-memory broker for engine unit tests, a real connection for fault tests."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from dockercomp.agent.agent import Agent
from dockercomp.agent.settings import AgentSettings
from dockercomp.agent.tasks import Registry
from dockercomp.broker.memory import MemoryBroker

from dockercomp.broker.batches import RESULTS_KEY, read_tasks, wrap
from dockercomp.broker.connection import Transport, Will
from dockercomp.broker.messages import OfflineReason, Outcome, Presence, PresenceState, Rebirth, Result, Task, TaskError
from dockercomp.broker.topics import Topics, WorkerRef
from tests.support import wait_until

TOPICS = Topics()


def compute(function: str, args: list[Any]) -> Any:
    if function == "add":
        return args[0] + args[1]
    if function == "sum":
        return sum(args[0])
    if function == "noop":
        return None
    raise KeyError(function)


@dataclass
class FakeAgent:
    """A worker that speaks the protocol over any Transport: presence with seq and will,
    tasks received, results answered at once (``auto``) or held until ``answer``."""

    transport: Transport
    worker: str
    volunteer: str = "local"
    capacity: int = 2
    prefetch: int = 0
    functions: tuple[str, ...] = ("add", "sum", "noop")
    auto: bool = True
    started: float = field(default_factory=time.time)
    seq: int = 1
    topics: Topics = TOPICS
    received: list[Task] = field(default_factory=list)
    held: list[Task] = field(default_factory=list)
    answered: list[tuple[str, int]] = field(default_factory=list)
    fail_with: Callable[[Task], TaskError | None] | None = None
    rebirth: bool = True  # answers rebirth requests, as a live agent does (False: a zombie)
    # Tasks taken per message (Presence.batch); 0: single tasks only, as agents before batches.
    # With auto, a batch's tasks are answered in one ResultBatch.
    batch: int = 0
    old_style: bool = False  # a presence without the batch field at all, as agents before batches send
    batches: list[list[Task]] = field(default_factory=list)  # the task batches received

    def __post_init__(self) -> None:
        self.ref = WorkerRef(self.volunteer, self.worker)
        self._lock = threading.Lock()
        self.transport.will_factory = lambda: Will(self.topics.presence(self.ref), self.presence("offline", "lost"))
        self.transport.on_message = self._on_message
        self.transport.on_connect = self.announce
        self.transport.subscribe(self.topics.tasks(self.ref), 1)
        self.transport.subscribe(self.topics.coordinator_rebirth, 1)

    def presence(self, state: str, reason: str | None = None) -> bytes:
        if self.old_style:
            data = json.loads(self._presence(state, reason))
            del data["batch"]
            return json.dumps(data).encode()
        return self._presence(state, reason)

    def _presence(self, state: str, reason: str | None = None) -> bytes:
        return Presence(self.worker, self.volunteer, PresenceState(state), self.seq,
                        OfflineReason(reason) if reason else None, host="test", version="0",
                        cpus=2, capacity=self.capacity, functions=self.functions, started=self.started,
                        prefetch=self.prefetch, batch=self.batch).encode()

    def start(self, timeout: float = 10.0) -> "FakeAgent":
        self.transport.start()
        self.transport.wait_connected(timeout)
        return self

    def announce(self) -> None:
        self.transport.publish(self.topics.presence(self.ref), self.presence("online"), qos=1, retain=True)

    def shutdown(self) -> None:
        self.transport.publish(self.topics.presence(self.ref), self.presence("offline", "shutdown"), qos=1, retain=True)
        self.transport.close()

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        if topic == self.topics.coordinator_rebirth:
            if self.rebirth and not retained and Rebirth.decode(payload).asks(self.ref.key):
                self.announce()
            return
        if topic != self.topics.tasks(self.ref):
            return
        message = read_tasks(payload)
        tasks = [message] if isinstance(message, Task) else message.good
        with self._lock:
            self.received += tasks
            if not isinstance(message, Task):
                self.batches.append(tasks)
            if not self.auto:
                self.held += tasks
                return
        if isinstance(message, Task):
            self.answer(message)
        else:
            self.send(wrap(RESULTS_KEY, [self.result(task).encode() for task in tasks]))
            with self._lock:
                self.answered += [(task.task_id, task.attempt) for task in tasks]

    def answer(self, task: Task, outcome: Outcome = Outcome.OK, value: Any = ..., error: TaskError | None = None) -> None:
        self.send(self.result(task, outcome, value, error).encode())
        with self._lock:
            self.answered.append((task.task_id, task.attempt))

    def result(self, task: Task, outcome: Outcome = Outcome.OK, value: Any = ...,
               error: TaskError | None = None) -> Result:
        """The Result this worker answers ``task`` with (computed unless ``value`` is given)."""
        if value is ... and outcome is Outcome.OK:
            failure = self.fail_with(task) if self.fail_with else None
            if failure is not None:
                outcome, error, value = Outcome.ERROR, failure, None
            else:
                value = compute(task.function, task.args)
        return Result(task.task_id, task.attempt, self.worker, self.volunteer, outcome,
                      None if value is ... else value, error, 0.01, nonce=task.nonce)

    def send(self, payload: bytes) -> None:
        self.transport.publish(self.topics.results(self.ref), payload, qos=1)

    def answer_held(self) -> int:
        with self._lock:
            held, self.held = self.held, []
        for task in held:
            self.answer(task)
        return len(held)


@contextmanager
def memory_agent_running(tmp_path: Path, worker_id: str, **options: Any) -> Iterator[tuple[Agent, MemoryBroker, list[bytes]]]:
    """A real Agent (its task processes too) on the in-memory broker, run in a thread, with the
    result payloads it publishes; stopped at once on exit. ``options`` go to
    AgentSettings.from_options (concurrency, prefetch, batch...)."""
    broker = MemoryBroker()
    settings = AgentSettings.from_options("mqtt://memory", worker_id=worker_id, volunteer="lab",
                                          health_file=str(tmp_path / "h.json"), host="test", container=None,
                                          environ={}, **options)
    sent: list[bytes] = []
    observer = broker.connect("observer")
    observer.on_message = lambda topic, payload, retained: sent.append(payload)
    observer.subscribe(TOPICS.results(settings.worker))
    observer.start()
    agent = Agent(settings, Registry.load(), transport=broker.connect(settings.client_id))
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    wait_until(lambda: broker.retained.get(TOPICS.presence(settings.worker)))
    try:
        yield agent, broker, sent
    finally:
        agent.stop(now=True)
        thread.join(10)


def closing_fakes() -> Iterator[list[FakeAgent]]:
    """Body of a `fakes` fixture: protocol-speaking test workers on real connections, closed afterwards."""
    made: list[FakeAgent] = []
    yield made
    for agent in made:
        agent.transport.close(1)
