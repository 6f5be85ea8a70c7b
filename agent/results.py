"""Results leaving the agent: one payload per ended attempt, remembered for a redelivery, a
result too big for a message replaced by a ResultTooLarge error, several sent with one publish call.

A mixin of Agent (agent.py), which owns the state it uses.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from dockercomp.agent.defaults import REMEMBERED_FINISHED, REMEMBERED_RESULT_BYTES
from dockercomp.agent.runner import Finished
from dockercomp.agent.state import TaskKey
from dockercomp.broker.defaults import MAX_PAYLOAD_BYTES
from dockercomp.broker.errors import BrokerError
from dockercomp.broker.messages import Outcome, Result, TaskError

if TYPE_CHECKING:
    from dockercomp.agent.agent import Agent

log = logging.getLogger("dockercomp.agent.agent")  # one logger name for the agent's lines


class ResultSender:
    """Agent's sending of results."""

    def report_all(self: "Agent", ended: list[Finished]) -> None:
        """Answer the tasks that ended in one poll with one publish call: the network loop is
        woken once for all of them, not once per result."""
        if len(ended) == 1:
            self._report(ended[0])
            return
        payloads = [(self.result_topic, self._answer(finished)) for finished in ended]
        # QoS 1: kept by the transport while the broker is away, sent on reconnection.
        failed = self.transport.publish_many(payloads, qos=1)
        if failed:
            log.error("%d of %d results could not be sent: %s", len(failed), len(payloads), failed[0][1])

    def _report(self: "Agent", finished: Finished) -> None:
        key: TaskKey = finished.key  # type: ignore[assignment]
        self._send_payload(key, self._answer(finished))

    def _answer(self: "Agent", finished: Finished) -> bytes:
        """The result payload of a task that ended; it is remembered for a redelivery."""
        key: TaskKey = finished.key  # type: ignore[assignment]
        task = self._held.pop(key, None)
        self.counts[finished.outcome.value] += 1
        # One line per task at the default level: what `dockercomp installer logs` shows a volunteer.
        if log.isEnabledFor(logging.INFO):
            log.info("task %s attempt %d finished: %s in %.3f s", key[0], key[1], finished.outcome.value,
                     finished.elapsed)
        payload = self._result_payload(Result(key[0], key[1], self.ref.worker, self.ref.volunteer, finished.outcome,
                                              value=finished.value, error=finished.error,
                                              elapsed=round(finished.elapsed, 6),
                                              nonce=task.nonce if task is not None else ""))
        if task is not None:
            self._finished[key] = (task, payload if len(payload) <= REMEMBERED_RESULT_BYTES else None)
            while len(self._finished) > REMEMBERED_FINISHED:
                self._finished.popitem(last=False)
        return payload

    @staticmethod
    def _result_payload(result: Result) -> bytes:
        payload = result.encode()
        if len(payload) > MAX_PAYLOAD_BYTES:
            payload = Result(result.task_id, result.attempt, result.worker, result.volunteer, Outcome.ERROR,
                             error=TaskError("ResultTooLarge", f"the result is {len(payload)} bytes; "
                                             f"a message may carry {MAX_PAYLOAD_BYTES}"),
                             elapsed=result.elapsed, nonce=result.nonce).encode()
        return payload

    def _publish_result(self: "Agent", result: Result) -> bytes:
        """Send a result; returns the payload sent."""
        payload = self._result_payload(result)
        self._send_payload((result.task_id, result.attempt), payload)
        return payload

    def _send_payload(self: "Agent", key: TaskKey, payload: bytes) -> None:
        try:
            # QoS 1: kept by the transport while the broker is away, sent on reconnection.
            self.transport.publish(self.result_topic, payload, qos=1)
        except BrokerError as exc:
            log.error("result of task %s attempt %d could not be sent: %s", key[0], key[1], exc)
