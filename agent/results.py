"""Results leaving the agent: one payload per ended attempt, remembered for a redelivery, a
result too big for a message replaced by a ResultTooLarge error, several sent with one publish
call, and to a coordinator that sends task batches, joined into ResultBatch messages
(broker/batches.py) after at most a few milliseconds of waiting for more.

A mixin of Agent (agent.py), which owns the state it uses.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from dockercomp.agent.defaults import REMEMBERED_FINISHED, REMEMBERED_RESULT_BYTES, RESULT_LINGER_SECONDS
from dockercomp.agent.runner import Finished
from dockercomp.agent.state import TaskKey
from dockercomp.broker.batches import RESULTS_KEY, pack
from dockercomp.broker.defaults import MAX_PAYLOAD_BYTES
from dockercomp.broker.errors import BrokerError
from dockercomp.broker.messages import Outcome, Result, TaskError

if TYPE_CHECKING:
    from dockercomp.agent.agent import Agent

log = logging.getLogger("dockercomp.agent.agent")  # one logger name for the agent's lines


class ResultSender:
    """Agent's sending of results."""

    def report_all(self: "Agent", ended: list[Finished], linger: bool = False) -> None:
        """Answer the tasks that ended in one poll with one publish call: the network loop is
        woken once for all of them, not once per result. To a coordinator that sends batches,
        they go as ResultBatch messages; with ``linger`` (the main loop), while other tasks are
        still in flight, they may wait up to RESULT_LINGER_SECONDS for more to join them."""
        payloads = [self._answer(finished) for finished in ended]
        if self._batch_results:
            self._outbox += payloads
            self._unlogged += ended
            if linger and len(self._outbox) < self._result_batch and not self.runner.idle:
                if self._outbox_due == math.inf:
                    self._outbox_due = self._clock() + RESULT_LINGER_SECONDS
                if self._clock() < self._outbox_due:
                    return  # the loop's poll wakes by the due time (Agent.run)
            self.flush_results()
        else:
            self._publish_many(payloads)
            self._log_finished(ended)

    def flush_results(self: "Agent") -> None:
        """Send the results held for a batch now."""
        outbox = self._outbox
        if not outbox:
            return
        self._outbox, self._outbox_due = [], math.inf
        if len(outbox) == 1:  # a lone result goes as itself: less to write and to read
            self._publish_many(outbox)
        else:
            self._publish_many(pack(RESULTS_KEY, outbox, self._result_batch))
        unlogged, self._unlogged = self._unlogged, []
        self._log_finished(unlogged)

    def _publish_many(self: "Agent", payloads: list[bytes]) -> None:
        # QoS 1: kept by the transport while the broker is away, sent on reconnection.
        failed = self.transport.publish_many([(self.result_topic, payload) for payload in payloads], qos=1)
        if failed:
            log.error("%d of %d result messages could not be sent: %s", len(failed), len(payloads), failed[0][1])

    @staticmethod
    def _log_finished(ended: list[Finished]) -> None:
        # One line per task at the default level: what `dockercomp installer logs` shows a
        # volunteer. Written after the results left, so it adds nothing to their latency, and
        # the lines of one result batch in one write (log_lines): 3 instead of 13 µs a line.
        if log.isEnabledFor(logging.INFO):
            log_lines(log, logging.INFO, [("task %s attempt %d finished: %s in %.3f s",
                                           (f.key[0], f.key[1], f.outcome.value, f.elapsed))  # type: ignore[index]
                                          for f in ended])

    def _answer(self: "Agent", finished: Finished) -> bytes:
        """The result payload of a task that ended; it is remembered for a redelivery."""
        key: TaskKey = finished.key  # type: ignore[assignment]
        task = self._held.pop(key, None)
        self.counts[finished.outcome.value] += 1
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


def log_lines(logger: logging.Logger, level: int, lines: list[tuple[str, tuple[Any, ...]]]) -> None:
    """Log each ``(message, args)`` as its own record (one line each, formatted as usual),
    but hand each plain stream handler (logging.basicConfig's) all of them in ONE write and
    flush instead of one per line: the agent logs a line for every task, and a burst of
    finished tasks would otherwise cost a system call each. Other handlers get each record."""
    if not lines or not logger.isEnabledFor(level):
        return
    records: list[logging.LogRecord] | None = None  # made only for a handler that needs them
    found = False
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            found = True
            if level < handler.level:
                continue
            if type(handler) is logging.StreamHandler and not logger.filters and not handler.filters:
                # exactly: subclasses may write elsewhere
                _write_lines(handler, logger, level, lines)
                continue
            if records is None:
                records = _records(logger, level, lines)
            for record in records:
                handler.handle(record)
        current = current.parent if current.propagate else None
    if not found and logging.lastResort is not None and level >= logging.lastResort.level:
        for record in _records(logger, level, lines):
            logging.lastResort.handle(record)


def _records(logger: logging.Logger, level: int, lines: list[tuple[str, tuple[Any, ...]]]) -> list[logging.LogRecord]:
    records = [logger.makeRecord(logger.name, level, "(agent)", 0, message, args, None) for message, args in lines]
    return [record for record in records if logger.filter(record)]


def _write_lines(handler: logging.StreamHandler, logger: logging.Logger, level: int,  # type: ignore[type-arg]
                 lines: list[tuple[str, tuple[Any, ...]]]) -> None:
    """The lines through a plain formatter, in one write. They share one record and its time
    (one result batch's): a record and a time formatted per line cost the agent 13 µs a line,
    these 3."""
    record = logger.makeRecord(logger.name, level, "(agent)", 0, *lines[0], None)
    formatter = handler.formatter or logging.Formatter()
    try:
        if type(formatter) is logging.Formatter:  # exactly: a subclass may format otherwise
            if formatter.usesTime():
                record.asctime = formatter.formatTime(record, formatter.datefmt)
            parts = []
            for message, args in lines:
                record.message = message % args if args else message
                parts.append(formatter.formatMessage(record))
            text = handler.terminator.join(parts) + handler.terminator
        else:
            text = "".join(handler.format(r) + handler.terminator for r in _records(logger, level, lines))
        with handler.lock:  # type: ignore[union-attr]
            handler.stream.write(text)
            handler.flush()
    except Exception:  # noqa: BLE001 - as Handler.emit: logging never raises
        handler.handleError(record)
