"""The attempt ledger: accept, reject, late, duplicate, expire, release, close-failed, on the
memory store with a fake clock (no processes, no sockets)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dockercomp.broker.messages import OfflineReason, Outcome, Task
from dockercomp.coordinator.leases import Leases
from dockercomp.coordinator.registry import WorkerRegistry
from tests.support.rules import MARGIN, Rules


@pytest.fixture
def rules() -> Rules:
    return Rules()


def test_a_result_from_the_worker_holding_the_attempt_is_accepted(rules: Rules) -> None:
    # given a task sent to w1
    rules.online("w1")
    job = rules.submit([[1, 2]])
    [task] = rules.dispatch()["w1"]
    # when w1 answers
    rules.answer("w1", task, 3)
    # then the task is done with w1's value and w1 holds nothing
    assert rules.states(job) == ["done"]
    [row] = rules.store.results(job)
    assert (row.value, row.worker, row.attempts, row.errors) == (3, "local/w1", 1, [])
    assert len(rules.ledger.leases) == 0 and rules.ledger.finished == 1
    assert [(w.key, w.tasks_done) for w in rules.store.workers()] == [("local/w1", 1)]
    assert rules.store.get_job(job.id).state == "done"


def test_a_failed_attempt_returns_the_task_until_its_attempts_are_used_up(rules: Rules) -> None:
    rules.online("w1")
    job = rules.submit([[1, 2]], max_attempts=2)
    # when the function raises twice
    rules.answer("w1", rules.dispatch()["w1"][0], outcome=Outcome.ERROR)
    assert rules.states(job) == ["pending"]
    rules.answer("w1", rules.dispatch()["w1"][0], outcome=Outcome.TIMEOUT)
    # then the task failed, with both reasons kept
    assert rules.states(job) == ["failed"]
    [row] = rules.store.results(job)
    assert [(e["attempt"], e["outcome"], e["type"]) for e in row.errors] == [(1, "error", "error"), (2, "timeout", "timeout")]
    assert rules.dispatch() == {}
    assert [w.tasks_failed for w in rules.store.workers()] == [2]


def test_an_expired_lease_returns_the_task_to_another_worker(rules: Rules) -> None:
    rules.online("w1")
    job = rules.submit([[1, 2]], timeout=10)
    [task] = rules.dispatch()["w1"]
    rules.online("w2")
    # when nothing comes back before the deadline (timeout + margin)
    rules.tick(10 + MARGIN - 0.1)
    rules.ledger.expire(rules.now)
    assert len(rules.ledger.leases) == 1  # not yet
    rules.tick(0.2)
    rules.ledger.expire(rules.now)
    # then the attempt is closed as expired and the task goes to the idle worker
    assert rules.states(job) == ["pending"]
    assert rules.store.find_attempt(int(task.task_id), 1).outcome == "expired"  # type: ignore[union-attr]
    [again] = rules.dispatch()["w2"]
    assert (again.task_id, again.attempt) == (task.task_id, 2)


def test_a_late_value_of_an_expired_attempt_is_accepted_and_supersedes_the_new_one(rules: Rules) -> None:
    rules.online("w1")
    job = rules.submit([[1, 2]], timeout=10)
    [first] = rules.dispatch()["w1"]
    rules.tick(20)
    rules.ledger.expire(rules.now)
    rules.online("w2")
    [second] = rules.dispatch()["w2"]
    # when the slow worker's value arrives after all
    rules.answer("w1", first, 3)
    # then it counts, the running attempt is superseded and w2 is free again
    assert rules.states(job) == ["done"]
    assert rules.store.find_attempt(int(second.task_id), 2).outcome == "superseded"  # type: ignore[union-attr]
    assert rules.ledger.leases.count(rules.workers.get("local/w2").id) == 0  # type: ignore[union-attr]
    # and w2's own answer, when it comes, is a duplicate
    rules.answer("w2", second, 3)
    assert rules.rejections.counts["duplicate"] == 1 and rules.states(job) == ["done"]


def test_a_late_failure_changes_nothing(rules: Rules) -> None:
    rules.online("w1")
    job = rules.submit([[1, 2]], timeout=10)
    [task] = rules.dispatch()["w1"]
    rules.tick(20)
    rules.ledger.expire(rules.now)
    rules.answer("w1", task, outcome=Outcome.ERROR)
    assert rules.rejections.counts["late"] == 1 and rules.states(job) == ["pending"]


@pytest.mark.parametrize(("sender", "task_id", "kind"), [
    ("w2", None, "foreign"),  # another worker answers w1's attempt
    ("stranger", None, "foreign"),  # a worker that never registered
    ("w1", "999", "unknown"),  # no such task
    ("w1", "x1", "unknown"),  # not even a task id
])
def test_results_that_cannot_count_are_rejected_and_change_nothing(rules: Rules, sender: str, task_id: str | None,
                                                                   kind: str) -> None:
    rules.online("w1")
    rules.online("w2", functions=("other",))
    job = rules.submit([[1, 2]])
    [task] = rules.dispatch()["w1"]

    rules.answer(sender, task, 3, task_id=task_id)

    assert rules.rejections.counts == {kind: 1}
    assert rules.states(job) == ["assigned"] and len(rules.ledger.leases) == 1


def test_an_attempt_never_sent_is_forged(rules: Rules) -> None:
    rules.online("w1")
    job = rules.submit([[1, 2]])
    [task] = rules.dispatch()["w1"]
    task_never_sent = type(task)(task_id=task.task_id, job_id=task.job_id, attempt=5, function="add")
    rules.answer("w1", task_never_sent, 3)
    assert rules.rejections.counts == {"forged": 1} and rules.states(job) == ["assigned"]


@pytest.mark.parametrize("nonce", ["", "guessed-nonce-000000000", "x" * 64])
def test_a_result_without_its_attempts_nonce_is_forged_even_from_the_holder(rules: Rules, nonce: str) -> None:
    # given a task sent to w1, with its secret nonce
    rules.online("w1")
    job = rules.submit([[1, 2]])
    [task] = rules.dispatch()["w1"]
    assert len(task.nonce) >= 22
    # when w1 (the right worker, the right attempt) answers with another nonce
    rules.answer("w1", task, 999, nonce=nonce)
    # then the answer is forged: not stored, counted against w1, the attempt still open
    assert rules.rejections.counts == {"forged": 1} and rules.states(job) == ["assigned"]
    assert rules.workers.get("local/w1").rejected == 1  # type: ignore[union-attr]
    # and the genuine answer still counts
    rules.answer("w1", task, 3)
    assert rules.states(job) == ["done"] and [r.value for r in rules.store.results(job)] == [3]


def test_a_late_result_is_checked_against_the_stored_nonce(rules: Rules) -> None:
    # given an attempt whose lease expired (it is closed: only the store knows its nonce)
    rules.online("w1")
    job = rules.submit([[1, 2]], timeout=10)
    [task] = rules.dispatch()["w1"]
    rules.tick(20)
    rules.ledger.expire(rules.now)
    # when a late value comes with a wrong nonce, it is forged; with the right one, it counts
    rules.answer("w1", task, 999, nonce="not-the-nonce")
    assert rules.rejections.counts == {"forged": 1} and rules.states(job) == ["pending"]
    rules.answer("w1", task, 3)
    assert rules.states(job) == ["done"] and [r.value for r in rules.store.results(job)] == [3]


def test_rebuilt_leases_keep_their_nonce(rules: Rules) -> None:
    # given a task sent, and the engine restarted (leases rebuilt from the store)
    rules.online("w1")
    job = rules.submit([[1, 2]])
    [task] = rules.dispatch()["w1"]
    rules.flush()
    rules.ledger.reset(Leases.load(rules.store, rules.dispatcher.payloads))
    [lease] = list(rules.ledger.leases)
    assert lease.nonce == task.nonce and Task.decode(lease.payload) == task
    # then a guess is still forged, and the worker's echo of the resent task counts
    rules.answer("w1", task, 999, nonce="")
    assert rules.rejections.counts == {"forged": 1}
    rules.answer("w1", task, 3)
    assert rules.states(job) == ["done"]


def test_nonces_are_unique_per_attempt(rules: Rules) -> None:
    rules.online("w1", capacity=50)
    rules.submit([[i, i] for i in range(50)], max_attempts=2)
    sent = rules.dispatch()["w1"]
    for task in sent:
        rules.answer("w1", task, outcome=Outcome.ERROR)
    again = rules.dispatch()["w1"]
    nonces = [t.nonce for t in sent + again]
    assert len(set(nonces)) == 100


@pytest.mark.parametrize(("outcome", "error_type"), [
    (Outcome.REJECTED, "BadArguments"), (Outcome.ERROR, "ResultTooLarge"), (Outcome.ERROR, "UnserializableResult")])
def test_a_deterministic_failure_fails_the_task_at_once_without_charging_the_worker(
        rules: Rules, outcome: Outcome, error_type: str) -> None:
    rules.online("w1")
    job = rules.submit([[1, 2]], max_attempts=3)
    rules.answer("w1", rules.dispatch()["w1"][0], outcome=outcome, error_type=error_type)
    # then the task failed on its first attempt, with that reason, and w1 is not held to blame
    assert rules.states(job) == ["failed"]
    [row] = rules.store.results(job)
    assert [(e["attempt"], e["outcome"], e["type"]) for e in row.errors] == [(1, outcome.value, error_type)]
    assert rules.dispatch() == {}
    assert rules.workers.get("local/w1").failed == 0  # type: ignore[union-attr]
    assert [w.tasks_failed for w in rules.store.workers()] == [0]


@pytest.mark.parametrize(("outcome", "error_type"), [
    (Outcome.ERROR, "BadArguments"),  # a task's own exception that happens to have that name
    (Outcome.REJECTED, "UnknownFunction"),  # another worker may offer the function
    (Outcome.REJECTED, "QueueFull"), (Outcome.ERROR, "ValueError")])
def test_other_failures_are_retried_and_charged(rules: Rules, outcome: Outcome, error_type: str) -> None:
    rules.online("w1")
    job = rules.submit([[1, 2]], max_attempts=3)
    rules.answer("w1", rules.dispatch()["w1"][0], outcome=outcome, error_type=error_type)
    assert rules.states(job) == ["pending"]
    assert rules.workers.get("local/w1").failed == 1  # type: ignore[union-attr]


def test_a_lost_worker_releases_what_it_held(rules: Rules) -> None:
    rules.online("w1", capacity=2)
    job = rules.submit([[1], [2], [3]])
    assert len(rules.dispatch()["w1"]) == 2
    # when its will arrives
    rules.offline("w1", OfflineReason.LOST)
    slot = rules.workers.get("local/w1")
    rules.ledger.release(slot, "worker local/w1 lost its connection (will) while holding the task")  # type: ignore[arg-type]
    # then both attempts are closed as lost and the tasks wait for another worker
    assert rules.states(job) == ["pending"] * 3
    [row, _, _] = rules.store.results(job)
    assert row.errors[0]["outcome"] == "lost" and "lost its connection" in row.errors[0]["message"]
    assert rules.dispatch() == {}


def test_an_answer_for_a_cancelled_job_only_frees_the_slot(rules: Rules) -> None:
    rules.online("w1")
    job = rules.submit([[1, 2]])
    [task] = rules.dispatch()["w1"]
    rules.store.cancel_job(job)
    rules.jobs.poll()

    rules.answer("w1", task, 3)

    assert rules.states(job) == ["cancelled"]
    assert rules.store.find_attempt(int(task.task_id), 1).outcome == "cancelled"  # type: ignore[union-attr]
    assert len(rules.ledger.leases) == 0 and rules.store.inflight() == {}


def test_retry_gives_a_fresh_budget_counted_from_the_retry(rules: Rules) -> None:
    rules.online("w1")
    job = rules.submit([[1, 2]], max_attempts=1)
    rules.answer("w1", rules.dispatch()["w1"][0], outcome=Outcome.CRASHED)
    assert rules.states(job) == ["failed"]
    rules.store.retry_failed(job)
    rules.jobs.poll()
    # when attempt 2 (the first of the new budget) fails too, the task fails again
    [task] = rules.dispatch()["w1"]
    assert task.attempt == 2
    rules.answer("w1", task, outcome=Outcome.REJECTED)
    assert rules.states(job) == ["failed"]


def test_leases_are_rebuilt_from_the_store(rules: Rules) -> None:
    rules.online("w1", capacity=2)
    rules.submit([[1], [2]])
    sent = rules.dispatch()["w1"]
    rules.flush()
    rebuilt = Leases.load(rules.store, rules.dispatcher.payloads)
    assert sorted((lease.task_id, lease.number) for lease in rebuilt) == sorted(
        (int(t.task_id), t.attempt) for t in sent)
    assert {lease.payload for lease in rebuilt} == {lease.payload for lease in rules.ledger.leases}


def _counters_match_outcomes(rules: Rules, job_ids: list[int]) -> None:
    """Each worker's done/failed counters (in memory, stored, and as a restart loads them)
    equal what its stored attempts say: values accepted, and failed attempts kept as errors."""
    rules.flush()
    done: dict[str, int] = {}
    failed: dict[str, int] = {}
    for job_id in job_ids:
        for row in rules.store.results(rules.store.get_job(job_id)):
            if row.state == "done" and row.worker:
                done[row.worker] = done.get(row.worker, 0) + 1
            for error in row.errors:
                failed[error["worker"]] = failed.get(error["worker"], 0) + 1
    stored = {w.key: (w.tasks_done, w.tasks_failed) for w in rules.store.workers()}
    expected = {key: (done.get(key, 0), failed.get(key, 0)) for key in stored}
    assert stored == expected
    assert {slot.key: (slot.done, slot.failed) for slot in rules.workers} == expected
    restarted = WorkerRegistry(rules.store, rules.topics)
    restarted.load()
    assert {slot.key: (slot.done, slot.failed) for slot in restarted} == expected


@pytest.mark.parametrize("where", ["memory", "sqlite"])
def test_a_late_value_accepted_after_its_attempt_closed_is_not_counted_as_a_failure(
        where: str, tmp_path: Path) -> None:
    # issue 10 item 4: the worker's tasks_failed kept the failure of an attempt it then won.
    rules = Rules("memory://" if where == "memory" else str(tmp_path / "c.db"))
    rules.online("w1")
    job = rules.submit([[1, 2]], timeout=10)
    [first] = rules.dispatch()["w1"]
    rules.tick(20)
    rules.ledger.expire(rules.now)  # attempt 1 expired: a failure of w1, for now
    rules.online("w2")
    [second] = rules.dispatch()["w2"]
    other = rules.submit([[5, 6]], timeout=10)
    # when w1's value arrives late (superseding w2's attempt), and w1 then fails another task
    rules.answer("w1", first, 3)
    [third] = rules.dispatch()["w1"]
    rules.answer("w1", third, outcome=Outcome.ERROR)
    # then w1 has one done and one failure, and every counter matches the stored outcomes,
    # in memory, in the store and after a restart
    assert rules.store.find_attempt(int(first.task_id), 1).outcome == "ok"  # type: ignore[union-attr]
    assert rules.store.find_attempt(int(second.task_id), 2).outcome == "superseded"  # type: ignore[union-attr]
    _counters_match_outcomes(rules, [job.id, other.id])
    assert {w.key: (w.tasks_done, w.tasks_failed) for w in rules.store.workers()} == {
        "local/w1": (1, 1), "local/w2": (0, 0)}
