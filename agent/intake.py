"""Incoming messages on the agent's main thread: tasks, alone or in a batch (broker/batches.py;
each checked, queued or answered at once on its own),
rebirth requests (answered with the presence) and malformed payloads (answered when they carry
a readable task id, else logged at a bounded rate).

A mixin of Agent (agent.py), which owns the state it reads: the held and finished tasks, the
runner, the counters and the transport.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from dockercomp.agent.errors import TaskRefused
from dockercomp.agent.pause import PAUSED_ERROR
from dockercomp.agent.runner import Job
from dockercomp.agent.state import MALFORMED_TASK, QUEUE_FULL, RELEASED_ERROR, AgentState, TaskKey
from dockercomp.agent.defaults import UNREADABLE_LOG_INTERVAL
from dockercomp.broker.batches import BadItem, read_tasks
from dockercomp.broker.errors import DecodeError
from dockercomp.broker.messages import Outcome, Rebirth, Result, Task, TaskError, peek_task_id

if TYPE_CHECKING:
    from dockercomp.agent.agent import Agent

log = logging.getLogger("dockercomp.agent.agent")  # one logger name for the agent's lines


class TaskIntake:
    """Agent's handling of what arrives on its task and rebirth topics."""

    def _on_task_message(self: "Agent", topic: str, payload: bytes, retained: bool) -> None:
        if topic != self.task_topic:
            if topic == self.rebirth_topic and not retained:  # checked here: off the tasks' path
                self._answer_rebirth(payload)
                return
            # amqtt sends a new client the retained messages of *other* clients' filters.
            log.debug("ignored a message on %s (not subscribed here)", topic)
            return
        if retained:
            self.counts["ignored"] += 1
            log.warning("ignored a retained message on %s: tasks are never retained (clear it with "
                        "mosquitto_pub -r -n -t '%s')", topic, topic)
            return
        try:
            message = read_tasks(payload)
        except DecodeError as exc:
            self._malformed(payload, exc)
            return
        if isinstance(message, Task):
            # A coordinator that sends single tasks gets single results (it may predate batches).
            self._batch_results = False
            self._take(message)
            return
        self._batch_results = True  # it sent a batch: it reads ResultBatch messages too
        self.counts["batches"] += 1
        for item in message.items:
            if isinstance(item, BadItem):
                self._malformed_item(item)
            else:
                self._take(item)

    def _malformed_item(self: "Agent", item: BadItem) -> None:
        """One task of a batch that does not decode: answered rejected when its id is readable
        (the others of the batch run), else counted and logged as an unreadable message."""
        self.counts["malformed"] += 1
        if item.peeked is not None:
            self._reject_malformed(*item.peeked, item.error)
        else:
            self._log_unreadable(item.error, f" (item {item.index} of a batch)")

    def _take(self: "Agent", task: Task) -> None:
        """One task, alone or out of a batch: run it, answer it again, or turn it away."""
        key: TaskKey = (task.task_id, task.attempt)
        if key in self._held:
            self.counts["duplicates"] += 1
            log.info("task %s attempt %d received again while held; ignored", *key)
            return
        answered = self._finished.get(key)
        if answered is not None:
            sent_for, kept = answered
            if sent_for == task and kept is not None:
                # The coordinator resends an open attempt when its answer was lost (its crash, a
                # broker restart): send the same answer again rather than ignore or recompute.
                self.counts["resent"] += 1
                log.info("task %s attempt %d received again; re-sending its result", *key)
                self._send_payload(key, kept)
                return
            # Same id, other content (a new coordinator database), or a result too big to keep:
            # this is work to do.
            del self._finished[key]
        if self.state is AgentState.DRAINING or self.state is AgentState.PAUSED:
            # Sent before the coordinator saw the draining/paused presence: hand it back at once.
            self.counts["released"] += 1
            what = self.state.value
            log.info("%s: task %s attempt %d handed back unrun", what, *key)
            error = TaskError(RELEASED_ERROR if what == "draining" else PAUSED_ERROR, f"sent to a {what} worker")
            self._publish_result(Result(task.task_id, task.attempt, self.ref.worker, self.ref.volunteer,
                                        Outcome.RELEASED, error=error, nonce=task.nonce))
            return
        try:
            self.registry.check(task.function, task.args)
            # It holds at most `concurrency` running tasks plus the queued: count only near the limit.
            near_limit = len(self._held) - self.settings.concurrency >= self._max_queued
            if near_limit and self.runner.queued >= self._max_queued:
                raise TaskRefused(QUEUE_FULL, f"{self.runner.queued} tasks already queued on this worker "
                                              f"(capacity {self.settings.concurrency}); send fewer at once")
        except TaskRefused as exc:
            log.info("task %s attempt %d rejected: %s", task.task_id, task.attempt, exc)
            self._publish_result(Result(task.task_id, task.attempt, self.ref.worker, self.ref.volunteer,
                                        Outcome.REJECTED, error=TaskError(exc.type, exc.message), nonce=task.nonce))
            return
        self._held[key] = task
        self.counts["received"] += 1
        self.runner.submit(Job(key, task.function, task.args, task.timeout, label=f"task {key[0]} attempt {key[1]}"))

    def _answer_rebirth(self: "Agent", payload: bytes) -> None:
        """The coordinator asks for a proof of life: publish the presence again (same seq)."""
        try:
            request = Rebirth.decode(payload)
        except DecodeError as exc:
            log.warning("ignored a malformed rebirth request: %s", exc.reason)
            return
        if not request.asks(self.ref.key):
            return
        presence = self._announce()  # the same presence again, flags unchanged
        if presence is not None:
            self.counts["rebirths"] += 1
            log.info("answered a rebirth request: %s (seq %d)", presence.state.value, presence.seq)

    def _malformed(self: "Agent", payload: bytes, exc: DecodeError) -> None:
        self.counts["malformed"] += 1
        readable = peek_task_id(payload)
        if readable is not None:
            self._reject_malformed(*readable, exc)
            return
        self._log_unreadable(exc)

    def _reject_malformed(self: "Agent", task_id: str, attempt: int, exc: DecodeError) -> None:
        log.warning("task %s attempt %d is malformed (%s); answered rejected", task_id, attempt, exc.reason)
        self._publish_result(Result(task_id, max(1, attempt), self.ref.worker, self.ref.volunteer,
                                    Outcome.REJECTED, error=TaskError(MALFORMED_TASK, exc.reason)))

    def _log_unreadable(self: "Agent", exc: DecodeError, where: str = "") -> None:
        # No id to answer to: one log line, rate-limited so a flood cannot fill the disk.
        now = self._clock()
        if now - self._last_unreadable_log >= UNREADABLE_LOG_INTERVAL:
            extra = f" ({self._unreadable_suppressed} more since the last report)" if self._unreadable_suppressed else ""
            log.warning("ignored a malformed message on %s without a readable task id%s: %s; data %r%s",
                        self.task_topic, where, exc.reason, (exc.data or b"")[:80], extra)
            self._last_unreadable_log, self._unreadable_suppressed = now, 0
        else:
            self._unreadable_suppressed += 1
