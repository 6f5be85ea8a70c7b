"""Batches on the wire (broker/batches.py): the envelope's extremes, the presence field that
negotiates them, and the engine over the in-memory broker sending and reading them."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dockercomp.agent.results import log_lines
from dockercomp.broker.batches import (
    RESULTS_KEY,
    TASKS_KEY,
    BadItem,
    Batch,
    encode_results,
    encode_tasks,
    pack,
    read_results,
    read_tasks,
    wrap,
)
from dockercomp.broker.defaults import MAX_BATCH_ITEMS, MAX_JSON_DEPTH, MAX_PAYLOAD_BYTES, PROTOCOL_VERSION
from dockercomp.broker.errors import DecodeError
from dockercomp.broker.memory import MemoryBroker
from dockercomp.broker.messages import Outcome, Presence, PresenceState, Result, Task
from dockercomp.broker.topics import Topics, WorkerRef
from dockercomp.coordinator.service import Coordinator, CoordinatorSettings
from dockercomp.coordinator.status import Rejection
from dockercomp.coordinator.store import Store
from tests.support.agents import FakeAgent
from tests.support.hostile import hostile_json, wire

pytestmark = pytest.mark.timeout(120)
TOPICS = Topics()


def task(i: int, **changes: Any) -> Task:
    return Task(**{"task_id": str(i), "job_id": "1", "attempt": 1, "function": "add", "args": [i, i],
                   "timeout": 30.0, "nonce": f"n{i}", **changes})


def result(i: int, worker: str = "w1", **changes: Any) -> Result:
    return Result(**{"task_id": str(i), "attempt": 1, "worker": worker, "volunteer": "lab", "outcome": Outcome.OK,
                     "value": 2 * i, "elapsed": 0.001, "nonce": f"n{i}", **changes})


# --------------------------------------------------------------------------- the presence field
def test_the_batch_size_travels_in_the_presence() -> None:
    presence = Presence("w1", "lab", PresenceState.ONLINE, 1, capacity=2, batch=50)
    assert Presence.decode(presence.encode()).batch == 50


def test_a_presence_without_the_field_announces_no_batching() -> None:
    # What an agent that predates batches sends.
    old = json.loads(Presence("w1", "lab", PresenceState.ONLINE, 1, capacity=2).encode())
    del old["batch"]
    assert Presence.decode(json.dumps(old).encode()).batch == 0


@pytest.mark.parametrize("bad, reason", [(-1, "must not be negative"), ("8", "must be an integer"),
                                         (True, "got a boolean"), (1.5, "must be an integer"),
                                         (2**64, "out of range"), ([3], "must be an integer")])
def test_a_batch_size_that_is_not_a_count_is_rejected(bad: Any, reason: str) -> None:
    data = json.loads(Presence("w1", "lab", PresenceState.ONLINE, 1).encode())
    data["batch"] = bad
    with pytest.raises(DecodeError, match=reason):
        Presence.decode(json.dumps(data).encode())


def test_a_huge_batch_size_decodes_and_is_capped_by_the_coordinator(
        engine: tuple[Coordinator, MemoryBroker]) -> None:
    coordinator, broker = engine
    ref = WorkerRef("lab", "w1")
    huge = Presence("w1", "lab", PresenceState.ONLINE, 1, capacity=2, functions=("add",), batch=2**62)
    broker.deliver(TOPICS.presence(ref), huge.encode(), False)
    coordinator.step()
    assert coordinator.workers.get(ref.key).batch == MAX_BATCH_ITEMS


# --------------------------------------------------------------------------- the envelope
def test_a_task_batch_carries_each_task_as_its_single_message_would() -> None:
    tasks = [task(i) for i in range(3)]
    payload = encode_tasks(tasks)
    assert json.loads(payload) == {"v": PROTOCOL_VERSION, TASKS_KEY: [json.loads(t.encode()) for t in tasks]}
    decoded = read_tasks(payload)
    assert isinstance(decoded, Batch) and decoded.items == tuple(tasks)


def test_a_single_task_or_result_reads_as_itself() -> None:
    assert read_tasks(task(1).encode()) == task(1)
    assert read_results(result(1).encode()) == result(1)


def test_a_result_batch_round_trip() -> None:
    results = [result(i) for i in range(4)]
    decoded = read_results(encode_results(results))
    assert isinstance(decoded, Batch) and decoded.good == results and not decoded.bad


@pytest.mark.parametrize("items, reason", [
    ([], "at least one item"),
    ([json.loads(task(1).encode())] * (MAX_BATCH_ITEMS + 1), f"at most {MAX_BATCH_ITEMS}"),
    ({"0": 1}, "must be a list"),
    ("tasks", "must be a list"),
    (None, "must be a list"),
])
def test_an_envelope_with_no_or_too_many_items_is_one_decode_error(items: Any, reason: str) -> None:
    for key, read in ((TASKS_KEY, read_tasks), (RESULTS_KEY, read_results)):
        payload = json.dumps({"v": PROTOCOL_VERSION, key: items}).encode()
        with pytest.raises(DecodeError) as caught:
            read(payload)
        if read is read_tasks:
            assert reason in caught.value.reason


def test_an_oversized_batch_is_rejected_before_parsing() -> None:
    payload = wrap(TASKS_KEY, [task(1, args=["x" * 1000]).encode()] * (MAX_PAYLOAD_BYTES // 1000 + 1))
    with pytest.raises(DecodeError, match="exceeds"):
        read_tasks(payload)


def test_a_batch_of_another_protocol_version_is_rejected_whole() -> None:
    payload = json.dumps({"v": 1, TASKS_KEY: [json.loads(task(1).encode())]}).encode()
    with pytest.raises(DecodeError, match="version"):
        read_tasks(payload)


def test_bad_items_are_returned_beside_the_good_ones_with_their_readable_id() -> None:
    good = json.loads(task(1).encode())
    no_job = {**json.loads(task(2).encode()), "job_id": 7}
    old = {**json.loads(task(3).encode()), "v": 1}
    decoded = read_tasks(json.dumps({"v": PROTOCOL_VERSION, TASKS_KEY: [good, no_job, 5, old]}).encode())
    assert isinstance(decoded, Batch)
    assert decoded.good == [task(1)]
    assert [(b.index, b.peeked) for b in decoded.bad] == [(1, ("2", 1)), (2, None), (3, ("3", 1))]
    assert "job_id" in decoded.bad[0].error.reason and "version" in decoded.bad[2].error.reason


def test_items_may_nest_as_deep_as_a_single_message_and_no_deeper() -> None:
    deepest: Any = []
    for _ in range(MAX_JSON_DEPTH - 3):  # with [] itself, the args list and the task object: the limit
        deepest = [deepest]
    ok = task(1, args=[deepest])
    assert Task.decode(ok.encode()) == ok
    assert read_tasks(encode_tasks([ok])).items == (ok,)  # type: ignore[union-attr]
    too_deep = task(2, args=[[deepest]])
    with pytest.raises(DecodeError, match="nested"):
        read_tasks(too_deep.encode())
    with pytest.raises(DecodeError, match="nested"):
        read_tasks(encode_tasks([too_deep]))


def test_pack_keeps_order_and_bounds_items_and_bytes() -> None:
    payloads = [task(i).encode() for i in range(10)]
    messages = pack(TASKS_KEY, payloads, 4)
    assert [len(read_tasks(m).items) for m in messages] == [4, 4, 2]  # type: ignore[union-attr]
    assert [t for m in messages for t in read_tasks(m).items] == [task(i) for i in range(10)]  # type: ignore[union-attr]
    # By bytes: room for two per message.
    limit = len(wrap(TASKS_KEY, payloads[:2]))
    assert all(len(m) <= limit for m in pack(TASKS_KEY, payloads, 100, limit))
    assert len(pack(TASKS_KEY, payloads, 100, limit)) == 5
    # A hostile or huge size is capped; zero still sends one per message.
    assert len(pack(TASKS_KEY, payloads * 30, 2**62)) == 3
    assert len(pack(TASKS_KEY, payloads, 0)) == 10


def test_an_item_too_big_for_any_envelope_goes_alone_as_itself() -> None:
    room = MAX_PAYLOAD_BYTES - len(task(1, args=[""]).encode())
    big = task(1, args=["x" * (room - 5)]).encode()  # fits a message, not a message and an envelope
    small = task(2).encode()
    messages = pack(TASKS_KEY, [small, big, small], 10)
    assert messages[1] == big and len(messages) == 3
    assert all(len(m) <= MAX_PAYLOAD_BYTES for m in messages)


@settings(max_examples=300, deadline=None)
@given(hostile_json, st.sampled_from([TASKS_KEY, RESULTS_KEY]))
def test_any_batch_shaped_document_is_a_batch_or_one_decode_error(value: Any, key: str) -> None:
    for items in (value, [value], [value, json.loads(task(1).encode())]):
        payload = wire({"v": PROTOCOL_VERSION, key: items})
        for read in (read_tasks, read_results):
            try:
                decoded = read(payload)
            except DecodeError:
                continue
            if isinstance(decoded, Batch):
                assert all(isinstance(i, (Task, Result, BadItem)) for i in decoded.items)


# --------------------------------------------------------------------------- the engine
@pytest.fixture
def engine(tmp_path: Path) -> Iterator[tuple[Coordinator, MemoryBroker]]:
    broker = MemoryBroker()
    coordinator = Coordinator(Store.open(str(tmp_path / "batches.db")), broker.connect("coordinator"),
                              settings=CoordinatorSettings(connect_timeout=1, status_interval=0.01))
    coordinator.open()
    yield coordinator, broker
    coordinator.close()


def _fake(broker: MemoryBroker, worker: str, **kwargs: Any) -> FakeAgent:
    return FakeAgent(broker.connect(worker), worker, volunteer="lab", **kwargs).start()


def _run(coordinator: Coordinator, job: Any, steps: int = 20) -> None:
    for _ in range(steps):
        coordinator.step()
        if coordinator.store.progress(job).state != "active":
            return


def test_an_old_style_worker_gets_single_tasks_and_a_batching_one_gets_batches(
        engine: tuple[Coordinator, MemoryBroker]) -> None:
    coordinator, broker = engine
    old = _fake(broker, "old", capacity=2, prefetch=6, old_style=True)
    assert "batch" not in json.loads(old.presence("online"))
    new = _fake(broker, "new", capacity=2, prefetch=6, batch=5)
    job = coordinator.store.create_job("add", [[i, i] for i in range(40)])
    _run(coordinator, job)
    assert coordinator.store.progress(job).done == 40
    assert old.received and not old.batches  # each of its tasks came alone
    assert new.batches and max(len(b) for b in new.batches) == 5  # its size, not its window of 8
    assert sum(len(b) for b in new.batches) == len(new.received)
    assert {r.value for r in coordinator.store.results(job)} == {2 * i for i in range(40)}
    assert not coordinator.rejections.counts


def test_a_forged_nonce_inside_a_result_batch_rejects_only_that_item(engine: tuple[Coordinator, MemoryBroker]) -> None:
    coordinator, broker = engine
    agent = _fake(broker, "w1", capacity=3, batch=10, auto=False)
    job = coordinator.store.create_job("add", [[i, i] for i in range(3)])
    _run(coordinator, job, 3)
    assert [len(b) for b in agent.batches] == [3]
    first, forged, third = agent.held
    agent.send(wrap(RESULTS_KEY, [agent.result(first).encode(), agent.result(forged).encode().replace(
        forged.nonce.encode(), b"guessed"), agent.result(third).encode()]))
    coordinator.step()
    assert coordinator.store.progress(job).done == 2
    assert coordinator.rejections.counts == {Rejection.FORGED.value: 1}
    agent.answer(forged)
    _run(coordinator, job)
    assert coordinator.store.progress(job).done == 3


def test_a_result_twice_in_one_batch_is_accepted_once(engine: tuple[Coordinator, MemoryBroker]) -> None:
    coordinator, broker = engine
    agent = _fake(broker, "w1", capacity=2, batch=10, auto=False)
    job = coordinator.store.create_job("add", [[i, i] for i in range(2)])
    _run(coordinator, job, 3)
    one, two = agent.held
    agent.send(wrap(RESULTS_KEY, [agent.result(one).encode()] * 2 + [agent.result(two).encode()]))
    _run(coordinator, job)
    assert coordinator.store.progress(job).done == 2
    assert len(list(coordinator.store.results(job))) == 2
    assert coordinator.rejections.counts == {Rejection.DUPLICATE.value: 1}


def test_a_bad_result_batch_is_counted_once_and_its_good_items_count(engine: tuple[Coordinator, MemoryBroker]) -> None:
    coordinator, broker = engine
    agent = _fake(broker, "w1", capacity=4, batch=10, auto=False)
    job = coordinator.store.create_job("add", [[i, i] for i in range(4)])
    _run(coordinator, job, 3)
    a, b, c, d = agent.held
    topic = TOPICS.results(agent.ref)
    foreign = agent.result(b).encode().replace(b'"worker":"w1"', b'"worker":"w9"')
    broken = agent.result(c).encode().replace(b'"attempt":1', b'"attempt":-1')
    broker.deliver(topic, wrap(RESULTS_KEY, [agent.result(a).encode(), foreign, broken, b"7"]), False)
    broker.deliver(topic, wrap(RESULTS_KEY, []), False)  # no item
    broker.deliver(topic, wrap(RESULTS_KEY, [agent.result(d).encode()] * (MAX_BATCH_ITEMS + 1)), False)
    broker.deliver(topic, b'{"v":2,"results":[' + b"[" * 40 + b"]" * 40 + b"]}", False)  # too deep
    coordinator.step()
    assert coordinator.store.progress(job).done == 1
    assert coordinator.rejections.counts == {Rejection.MALFORMED.value: 4, Rejection.MISMATCH.value: 1}
    for held in (b, c, d):
        agent.answer(held)
    _run(coordinator, job)
    assert coordinator.store.progress(job).done == 4


# --------------------------------------------------------------------------- the agent's per-task lines
class _CountingStream(io.StringIO):
    writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def test_the_lines_of_a_burst_are_the_usual_lines_in_one_write(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("dockercomp.test.batched")
    logger.setLevel(logging.INFO)
    stream, single = _CountingStream(), io.StringIO()
    batched = logging.StreamHandler(stream)
    one_by_one = logging.StreamHandler(single)
    for handler in (batched, one_by_one):
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    lines = [("task %s attempt %d finished: %s in %.3f s", (str(i), 1, "ok", 0.25)) for i in range(5)]
    logger.addHandler(batched)
    try:
        with caplog.at_level(logging.INFO, logger="dockercomp.test.batched"):
            log_lines(logger, logging.INFO, lines)
            log_lines(logger, logging.DEBUG, lines)  # below the level: nothing
            captured = [r.getMessage() for r in caplog.records]  # handlers other than plain streams
    finally:
        logger.removeHandler(batched)
    logger.addHandler(one_by_one)
    try:
        for message, args in lines:
            logger.info(message, *args)
    finally:
        logger.removeHandler(one_by_one)
    assert stream.getvalue() == single.getvalue() and stream.getvalue().count("\n") == 5
    assert stream.writes == 1
    assert captured == [f"task {i} attempt 1 finished: ok in 0.250 s" for i in range(5)]


class _Shouting(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).upper()


def test_a_burst_shares_one_timestamp_and_other_formatters_and_filtered_handlers_get_records() -> None:
    logger = logging.getLogger("dockercomp.test.stamped")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    stamped, shouting, filtered = _CountingStream(), io.StringIO(), io.StringIO()
    handlers = [logging.StreamHandler(stream) for stream in (stamped, shouting, filtered)]
    handlers[0].setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(process)d: %(message)s"))
    handlers[1].setFormatter(_Shouting("%(message)s"))
    handlers[2].addFilter(lambda record: "attempt 2" not in record.getMessage())
    lines = [("task %s attempt %d finished", (str(i), i)) for i in range(1, 4)] + [("no args: 100%", ())]
    for handler in handlers:
        logger.addHandler(handler)
    try:
        log_lines(logger, logging.INFO, lines)
    finally:
        for handler in handlers:
            logger.removeHandler(handler)

    rows = stamped.getvalue().splitlines()
    assert stamped.writes == 1 and len({row[:23] for row in rows}) == 1  # one "%Y-%m-%d %H:%M:%S,mmm"
    assert [row[24:] for row in rows] == [f"INFO dockercomp.test.stamped {os.getpid()}: {text}" for text in
                                          ("task 1 attempt 1 finished", "task 2 attempt 2 finished",
                                           "task 3 attempt 3 finished", "no args: 100%")]
    assert shouting.getvalue().splitlines() == ["TASK 1 ATTEMPT 1 FINISHED", "TASK 2 ATTEMPT 2 FINISHED",
                                                "TASK 3 ATTEMPT 3 FINISHED", "NO ARGS: 100%"]
    assert filtered.getvalue().splitlines() == ["task 1 attempt 1 finished", "task 3 attempt 3 finished",
                                                "no args: 100%"]
