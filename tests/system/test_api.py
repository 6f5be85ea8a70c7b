"""The Python API a scientist uses from a notebook or script (coordinator/api.py).

Against a real broker, a real `dockercomp coordinator serve` process and real `dockercomp agent run` processes;
only the tests of waiting without workers run on the store alone (with an injected clock).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from dockercomp.broker.processes import BrokerProcess
from dockercomp.broker.topics import Topics
from dockercomp.coordinator.api import Client, JobStalled, JobTimeout, TasksFailed, connect
from dockercomp.coordinator.defaults import INSERT_BATCH
from dockercomp.coordinator.errors import DatabaseMissing, InvalidInput, UnknownJob
from dockercomp.coordinator.service import Coordinator
from dockercomp.coordinator.store import JobProgress
from tests.support import wait_until
from tests.support.processes import FAST, Processes
from tests.support.security import SecureBroker, connected, prove_subscribed

pytestmark = pytest.mark.timeout(90)


def primes_below(n: int) -> int:
    return sum(1 for k in range(2, n) if all(k % d for d in range(2, int(k**0.5) + 1)))


@pytest.fixture
def client(tmp_path: Path) -> Iterator[Client]:
    with Client(str(tmp_path / "api.db"), poll_interval=0.05) as opened:
        yield opened


@pytest.fixture
def stack(client: Client, procs: Processes) -> Processes:
    """`dockercomp coordinator serve` on the client's database; tests add agents (procs.agent)."""
    procs.serve(client.db, "coordinator", options=())
    return procs


def test_submit_wait_and_results_in_input_order(client: Client, stack: Processes) -> None:
    # Given two agents (both online: on a busy machine one could otherwise do the whole job
    # before the other has started) and a job of prime counts
    stack.agent("a1")
    stack.agent("a2")
    wait_until(lambda: sorted(w.key for w in client.workers() if w.state == "online") == ["local/a1", "local/a2"],
               timeout=30)
    ranges = [[0, 1000 * (i + 1)] for i in range(12)]
    job = client.submit("count_primes", ranges, name="primes", timeout=30, max_attempts=2)
    assert (job.name, job.total, job.function) == ("primes", 12, "count_primes")
    # When the scientist waits for it
    final = job.wait(timeout=60, progress=True)
    # Then every task is done, values are in input order, each attributed to a worker
    assert isinstance(final, JobProgress) and (final.done, final.failed) == (12, 0)
    assert job.values() == [primes_below(hi) for _, hi in ranges]
    rows = job.results()
    assert [row.index for row in rows] == list(range(12))
    assert {row.worker for row in rows} <= {"local/a1", "local/a2"}
    assert all(row.attempts == 1 and row.elapsed is not None and row.errors == [] for row in rows)
    # and the job can be found again by name or id
    assert client.job("primes").id == job.id == client.job(job.id).id
    workers = {w.key: w for w in client.workers()}
    assert set(workers) == {"local/a1", "local/a2"}
    assert sum(w.tasks_done for w in workers.values()) == 12
    assert all(w.state == "online" and w.capacity == 2 for w in workers.values())


def test_as_completed_yields_each_task_once_as_it_finishes(client: Client, stack: Processes) -> None:
    # Given one agent working one task at a time on tasks of 0.2 s
    stack.agent("solo", concurrency=1)
    job = client.submit("sleep", [[0.2]] * 6, name="naps")
    # When the scientist iterates as they complete
    seen = []
    unfinished_when_first_came = None
    for row in job.as_completed(timeout=60):
        if unfinished_when_first_came is None:
            progress = job.progress()
            unfinished_when_first_came = progress.total - progress.finished
        seen.append(row)
    # Then each task came exactly once, done by the agent, and the first before the job ended
    assert sorted(row.index for row in seen) == list(range(6))
    assert all(row.state == "done" and row.value == 0.2 and row.worker == "local/solo" for row in seen)
    assert unfinished_when_first_came and unfinished_when_first_came > 0


def test_a_failing_task_is_reported_with_its_reason(client: Client, stack: Processes) -> None:
    stack.agent("a1")
    job = client.submit("add", [[1, 2], ["a", 1]], name="mixed", max_attempts=1)
    final = job.wait(timeout=60, progress=False)
    assert (final.done, final.failed) == (1, 1)
    with pytest.raises(TasksFailed) as caught:
        job.values()
    assert "#1" in str(caught.value) and "TypeError" in str(caught.value)
    failed = job.results()[1]
    assert failed.state == "failed" and failed.errors[0]["type"] == "TypeError"
    assert failed.errors[0]["worker"] == "local/a1"
    # the job says it ended with failures, and the attempt keeps the worker's traceback
    assert job.state == "failed"
    row, attempts = job.attempts(1)
    assert row.state == "failed" and [a.outcome for a in attempts] == ["error"]
    assert "Traceback" in attempts[0].error["traceback"] and "TypeError" in attempts[0].error["traceback"]


def test_cancel_stops_a_job_nobody_computes(client: Client) -> None:
    job = client.submit("add", [[1, 2]] * 5, name="unwanted")
    assert job.cancel() == 5
    assert job.wait(timeout=1, progress=False).cancelled == 5
    assert job.state == "cancelled"


def test_wait_without_workers_times_out_with_a_hint(tmp_path: Path) -> None:
    # A fake clock: each sleep advances it, so the timeout passes without real waiting.
    now = [0.0]
    with connect(str(tmp_path / "idle.db"), clock=lambda: now[0],
                 sleep=lambda s: now.__setitem__(0, now[0] + s)) as client:  # fmt: skip
        job = client.submit("add", [[1, 2]], name="idle")
        with pytest.raises(JobTimeout) as caught, pytest.warns(JobStalled, match="no worker is online"):
            job.wait(timeout=10, progress=False)
        assert caught.value.progress.pending == 1
        assert "not finished after 10 s" in str(caught.value)
        assert "no online worker offers 'add' (no worker is online)" in str(caught.value)
        assert "The coordinator has never run on this database" in str(caught.value)
        with pytest.raises(JobTimeout), pytest.warns(JobStalled):
            list(job.as_completed(timeout=10))


def test_bad_submissions_store_nothing(client: Client) -> None:
    with pytest.raises(InvalidInput, match="line 2"):
        client.submit("add", [[1, 2], {"a": 1}])
    with pytest.raises(InvalidInput, match="no tasks"):
        client.submit("add", [])
    with pytest.raises(InvalidInput, match="job name"):
        client.submit("add", [[1, 2]], name="has space")
    assert client.jobs() == []
    with pytest.raises(UnknownJob, match="no job was submitted yet"):
        client.job("anything")


def test_tuples_and_generators_are_accepted(client: Client) -> None:
    job = client.submit("add", ((i, i) for i in range(3)), name="gen")
    assert [row.args for row in job.results()] == [[0, 0], [1, 1], [2, 2]]
    assert job.progress().pending == 3


def test_a_misspelt_function_is_named_while_workers_are_online(client: Client, stack: Processes) -> None:
    # Given two workers online that offer count_primes (among others)
    stack.agent("a1")
    stack.agent("a2")
    wait_until(lambda: len(client.offering("count_primes")) == 2, timeout=30)
    # When a job names a function no worker offers
    job = client.submit("count_prime", [[0, 100]], name="typo")
    # Then waiting for it says so, naming what the workers do offer
    with pytest.raises(JobTimeout) as caught, pytest.warns(JobStalled, match="no online worker offers 'count_prime'"):
        job.wait(timeout=6, progress=False)  # warned after 5 s (STALL_CHECK_INTERVAL)
    assert "no online worker offers 'count_prime' (they offer: " in str(caught.value)
    assert "count_primes" in caught.value.why and "workers online?" not in str(caught.value)
    assert job.stalled().startswith("no online worker offers 'count_prime'")
    assert client.submit("count_primes", [[0, 100]]).stalled() == ""


def test_the_heartbeat_says_whether_serve_runs(client: Client, stack: Processes) -> None:
    # Given `serve` running on the client's database
    assert wait_until(lambda: client.liveness().live, timeout=30)
    beat = client.liveness().beat
    assert beat is not None and beat.stopped_at is None and beat.broker.startswith("mqtt://")
    # When it stops
    stack.stop_all()
    # Then the store says so, and since when
    alive = client.liveness()
    assert not alive.running and alive.since is not None and alive.beat.stopped_at == alive.since
    assert "The coordinator is not running: it stopped" in alive.sentence()


def test_replace_reruns_a_cell_and_a_bad_replacement_keeps_the_old_job(client: Client) -> None:
    first = client.submit("add", [[1, 2]], name="cell")
    with pytest.raises(InvalidInput, match="already exists"):
        client.submit("add", [[1, 2]], name="cell")
    with pytest.raises(InvalidInput, match="line 2"):
        client.submit("add", [[3, 4], {"a": 1}], name="cell", replace=True)
    assert [row.args for row in client.job("cell").results()] == [[1, 2]]
    second = client.submit("add", [[3, 4], [5, 6]], name="cell", replace=True)
    assert second.id != first.id and client.job("cell").total == 2
    assert second.delete() == 2
    with pytest.raises(UnknownJob):
        client.job("cell")


def test_reading_a_missing_database_never_creates_it(tmp_path: Path) -> None:
    path = tmp_path / "typo.db"
    with pytest.raises(DatabaseMissing, match=f"no coordinator database at {path}"):
        Client(str(path), create=False)
    assert not path.exists()
def test_a_generator_is_streamed_into_the_store_not_read_whole_first(client: Client) -> None:
    # issue 10 item 16: submit materialised the whole argument list (1M tasks: 153 MB RSS).
    pulled = [0]
    pulled_at_first_batch: list[int] = []

    def tasks(n: int) -> Iterator[list[int]]:
        for i in range(n):
            pulled[0] += 1
            yield [i, i]

    n = 3 * INSERT_BATCH + 7
    job = client.submit("add", tasks(n), name="streamed",
                        on_progress=lambda stored: pulled_at_first_batch.append(pulled[0]) if not pulled_at_first_batch else None)
    # the first batch was stored before the rest of the generator was read
    assert pulled_at_first_batch and pulled_at_first_batch[0] <= INSERT_BATCH + 1
    assert job.total == n == client.job("streamed").progress().pending


def test_a_bad_argument_late_in_a_stream_leaves_no_job(client: Client) -> None:
    def tasks() -> Iterator[object]:
        yield from ([i] for i in range(2 * INSERT_BATCH + 3))
        yield "not a list"

    with pytest.raises(InvalidInput, match=f"line {2 * INSERT_BATCH + 4}"):
        client.submit("add", tasks(), name="late-error")
    assert client.jobs() == []
    # and the name is still free: the whole job is gone, not only its last batches
    assert client.submit("add", [[1, 2]], name="late-error").total == 1


@pytest.mark.parametrize("how", ["api", "cli"])
def test_submit_nudges_a_running_serve_which_dispatches_at_once(broker: BrokerProcess, procs: Processes,
                                                                 tmp_path: Path, how: str) -> None:
    # issue 10 item 15: a submitted job waited for serve's next poll of the jobs table.
    # Given an engine that would poll only every 10 minutes, and an agent online
    db = str(tmp_path / "nudged.db")
    settings = dataclasses.replace(FAST, poll_interval=600)
    engine = Coordinator.connect(broker.url, db, settings).start()
    try:
        procs.agent("a1")
        with Client(db, broker=broker.url, poll_interval=0.05) as client:
            wait_until(lambda: [w.key for w in client.workers() if w.state == "online"] == ["local/a1"], timeout=30)
            # when a job is submitted by a client that knows the broker
            if how == "api":
                job = client.submit("add", [[1, 2], [3, 4]], name="nudged")
            else:
                (tmp_path / "tasks.jsonl").write_text("[1, 2]\n[3, 4]\n")
                procs.cli("submit", "add", str(tmp_path / "tasks.jsonl"), "--job", "nudged", "--db", db,
                          "--broker", broker.url)
                job = client.job("nudged")
            # then serve dispatches it long before its next poll: the nudge woke it
            assert job.wait(timeout=60, progress=False).done == 2
            assert job.values() == [3, 7]
    finally:
        engine.stop()
    assert engine.error is None, engine.error


def test_a_nudge_that_cannot_be_delivered_still_stores_the_job(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    # Nothing listens on port 1 of this machine: the nudge fails fast and submit goes on.
    with Client(str(tmp_path / "alone.db"), broker="mqtt://coordinator:s3cret@127.0.0.1:1") as client:
        assert client.nudge
        job = client.submit("add", [[1, 2]], name="unnudged")
        assert client.job("unnudged").progress().pending == 1 == job.total
        assert client.nudge_coordinator(timeout=0.2) is False
    # said once per failed nudge, without the password
    said = [r.getMessage() for r in caplog.records if "could not nudge" in r.getMessage()]
    assert len(said) == 2 and not any("s3cret" in text for text in caplog.text.splitlines())


def test_only_the_coordinator_account_may_nudge(secure_broker: SecureBroker, tmp_path: Path) -> None:
    # The shipped policy (Mosquitto's ACL file, and the same file in force in amqtt)
    alice = secure_broker.add("alice")
    nudge = Topics().coordinator_nudge
    with connected(secure_broker.url(secure_broker.coordinator), "listener", nudge) as listener:
        prove_subscribed(listener, listener, nudge)
        listener.received.clear()
        # a volunteer's nudge is acknowledged (MQTT 3.1.1 has no refusal) but dropped
        with Client(str(tmp_path / "a.db"), broker=secure_broker.url(alice)) as volunteer:
            assert volunteer.nudge_coordinator(timeout=5)
        # the coordinator account's, sent after it, is the only one delivered
        with Client(str(tmp_path / "c.db"), broker=secure_broker.url(secure_broker.coordinator)) as scientist:
            assert scientist.nudge_coordinator(timeout=5)
        listener.wait_for(nudge)
        assert listener.topics() == [nudge]
