"""Replication, quorum, validators, trust, quarantine and retry exclusion: the rules over the
memory store on a fake clock (no processes, no sockets)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from dockercomp.broker.messages import Outcome, Presence, PresenceState, Result, Task, TaskError
from dockercomp.broker.topics import WorkerRef
from dockercomp.coordinator import defaults
from dockercomp.coordinator.api import Client
from dockercomp.coordinator.cli import main as coordinator_cli
from dockercomp.coordinator.errors import InvalidInput
from dockercomp.coordinator.leases import Leases
from dockercomp.coordinator.replication import Replication, tolerance
from dockercomp.coordinator.store import JobRow, Store
from tests.support.plugins import install_package
from tests.support.rules import Rules


class Crowd(Rules):
    """Rules with workers of several volunteers: names are "volunteer/worker"."""

    def join(self, key: str, capacity: int = 1) -> None:
        volunteer, name = key.split("/")
        self.seq[key] = self.seq.get(key, 0) + 1
        presence = Presence(worker=name, volunteer=volunteer, state=PresenceState.ONLINE, seq=self.seq[key],
                            capacity=capacity, functions=("add",), started=1.0)
        self.workers.apply(WorkerRef(volunteer, name), presence, self.now)

    def reply(self, key: str, task: Task, value: Any = None, outcome: Outcome = Outcome.OK,
              elapsed: float = 2.0) -> None:
        volunteer, name = key.split("/")
        error = None if outcome is Outcome.OK else TaskError(outcome.value, "it broke")
        result = Result(task_id=task.task_id, attempt=task.attempt, worker=name, volunteer=volunteer,
                        outcome=outcome, value=value, error=error, elapsed=elapsed, nonce=task.nonce)
        self.ledger.on_result(WorkerRef(volunteer, name), result, self.now)

    def job(self, args: list[list[Any]], max_attempts: int = 3, **options: Any) -> JobRow:
        job = self.store.create_job("add", args, max_attempts=max_attempts, replication=Replication.make(**options))
        self.jobs.poll()
        return job

    def rows(self, job: JobRow) -> list[Any]:
        self.flush()
        return list(self.store.results(job))

    def stats(self) -> list[Any]:
        self.flush()
        return self.store.volunteer_stats()

    def sent(self) -> dict[str, list[Task]]:
        """Dispatch; the tasks sent per "volunteer/worker"."""
        self.flush()
        sent: dict[str, list[Task]] = {}
        for topic, payload in self.dispatcher.dispatch(self.workers, self.jobs, self.ledger.leases, self.now):
            volunteer, name = topic.split("/")[-3:-1]
            sent.setdefault(f"{volunteer}/{name}", []).append(Task.decode(payload))
        return sent


@pytest.fixture
def crowd() -> Crowd:
    return Crowd()


def test_replicas_go_to_distinct_volunteers_and_agreeing_values_make_the_canonical_result(crowd: Crowd) -> None:
    # given two workers of one volunteer and one of another
    for key in ("alice/w1", "alice/w2", "bob/w1"):
        crowd.join(key)
    job = crowd.job([[1, 2]], replicas=2, quorum=2)
    sent = crowd.sent()
    # then the two replicas went to two volunteers, never twice to alice
    assert sorted(sent) in (["alice/w1", "bob/w1"], ["alice/w2", "bob/w1"])
    for key, [task] in sent.items():
        crowd.reply(key, task, 3)
    [row] = crowd.rows(job)
    assert (row.state, row.value) == ("done", 3)
    assert sorted((r["outcome"], r["value"]) for r in row.replicas) == [("ok", 3), ("ok", 3)]
    assert crowd.store.get_job(job.id).state == "done"
    stats = {s.volunteer: (s.validated, s.credit) for s in crowd.stats()}
    assert stats == {"alice": (1, 2.0), "bob": (1, 2.0)}


def test_credit_counts_no_more_than_the_tasks_time_limit_whatever_a_result_claims(crowd: Crowd) -> None:
    # `elapsed` is the worker's word (up to 1.8e308 decodes); a task never runs past its timeout
    for key in ("alice/w1", "bob/w1"):
        crowd.join(key)
    crowd.job([[1, 2]], replicas=2, quorum=2)
    for key, [task] in crowd.sent().items():
        crowd.reply(key, task, 3, elapsed=1.7e308 if key == "alice/w1" else 2.0)
    stats = {s.volunteer: s.credit for s in crowd.stats()}
    assert stats == {"alice": defaults.TASK_TIMEOUT, "bob": 2.0}


def test_a_disagreement_gets_another_replica_and_the_odd_value_is_invalid(crowd: Crowd) -> None:
    for key in ("alice/w", "bob/w", "carol/w"):
        crowd.join(key)
    job = crowd.job([[1, 2]], replicas=2, quorum=2)
    sent = crowd.sent()
    [honest, cheat] = sorted(sent)
    crowd.reply(honest, sent[honest][0], 3)
    crowd.reply(cheat, sent[cheat][0], 4)
    # no quorum: a third replica goes to the volunteer that had none
    third = crowd.sent()
    assert list(third) == ["carol/w"]
    crowd.reply("carol/w", third["carol/w"][0], 3)
    [row] = crowd.rows(job)
    assert (row.state, row.value, row.attempts) == ("done", 3, 3)
    assert sorted((r["worker"], r["outcome"]) for r in row.replicas) == sorted(
        [(honest.replace("/", "/"), "ok"), (cheat, "invalid"), ("carol/w", "ok")])


def test_without_quorum_after_max_replicas_the_task_fails_with_every_value_and_who_sent_it(crowd: Crowd) -> None:
    for key in ("a/w", "b/w", "c/w"):
        crowd.join(key)
    job = crowd.job([[1]], replicas=2, quorum=2, max_replicas=3)
    value = 0
    for _ in range(3):
        for key, [task] in crowd.sent().items():
            value += 1
            crowd.reply(key, task, value)
    [row] = crowd.rows(job)
    assert row.state == "failed"
    assert sorted(r["value"] for r in row.replicas) == [1, 2, 3]
    assert {r["worker"] for r in row.replicas} == {"a/w", "b/w", "c/w"}
    assert [e["type"] for e in row.errors] == ["NoQuorum"]
    assert "no 2 of 3 values agreed" in row.errors[0]["message"]


def test_replicas_wait_for_another_volunteer_and_status_says_so(crowd: Crowd) -> None:
    crowd.join("alice/w1")
    crowd.join("alice/w2")
    job = crowd.job([[1]], replicas=2, quorum=2)
    [(key, [task])] = crowd.sent().items()
    crowd.reply(key, task, 3)
    assert crowd.sent() == {}  # alice's other worker may not vote twice
    crowd.flush()
    progress = crowd.store.progress(job)
    assert (progress.assigned, progress.waiting) == (1, 1)
    crowd.join("bob/w")
    crowd.jobs.poll()
    [(key, [task])] = crowd.sent().items()
    assert key == "bob/w"
    crowd.reply(key, task, 3)
    assert crowd.states(job) == ["done"]
    assert crowd.store.progress(job).replication == 2.0


def test_a_lone_worker_with_room_is_filled_in_one_round_while_the_others_are_full(crowd: Crowd) -> None:
    # given bob full and alice with 6 free slots
    crowd.join("alice/w", capacity=6)
    crowd.join("bob/w", capacity=6)
    job = crowd.job([[i] for i in range(20)], replicas=2, quorum=2)
    first = crowd.sent()
    assert {key: len(tasks) for key, tasks in first.items()} == {"alice/w": 6, "bob/w": 6}
    for task in first["alice/w"]:
        crowd.reply("alice/w", task, task.args[0])
    # then one round fills all of alice's room (new tasks, their second replicas owed), not
    # half of it (it asked the store for free / replicas tasks: 3), leaving the rest to the next
    again = crowd.sent()
    assert {key: len(tasks) for key, tasks in again.items()} == {"alice/w": 6}
    progress = crowd.store.progress(job)
    assert (progress.pending, progress.assigned) == (8, 12)


def test_a_job_may_relax_replicas_to_distinct_workers(crowd: Crowd) -> None:
    crowd.join("lab/w1")
    crowd.join("lab/w2")
    job = crowd.job([[1]], replicas=2, quorum=2, distinct="worker")
    sent = crowd.sent()
    assert sorted(sent) == ["lab/w1", "lab/w2"]
    for key, [task] in sent.items():
        crowd.reply(key, task, 3)
    assert crowd.states(job) == ["done"]


def test_a_failed_replica_is_reissued_to_another_volunteer(crowd: Crowd) -> None:
    for key in ("a/w", "b/w"):
        crowd.join(key)
    job = crowd.job([[1]], replicas=2, quorum=2)
    sent = crowd.sent()
    crowd.reply("a/w", sent["a/w"][0], outcome=Outcome.ERROR)
    crowd.reply("b/w", sent["b/w"][0], 3)
    assert crowd.sent() == {}  # both volunteers had it
    crowd.join("c/w")
    crowd.jobs.poll()
    again = crowd.sent()
    assert list(again) == ["c/w"]
    crowd.reply("c/w", again["c/w"][0], 3)
    assert crowd.states(job) == ["done"]


def test_a_retry_does_not_go_back_to_the_volunteer_that_failed_it(crowd: Crowd) -> None:
    # given a single-replica job on two volunteers with room for several tasks each
    crowd.join("bad/w", capacity=4)
    crowd.join("good/w", capacity=4)
    job = crowd.job([[i] for i in range(4)], max_attempts=5)
    sent = crowd.sent()
    failed = {t.task_id for t in sent.get("bad/w", [])}
    assert failed
    for task in sent["bad/w"]:
        crowd.reply("bad/w", task, outcome=Outcome.ERROR)
    for task in sent["good/w"]:
        crowd.reply("good/w", task, 1)
    # then every retry went to the other volunteer
    again = crowd.sent()
    assert {t.task_id for t in again.get("good/w", [])} == failed and "bad/w" not in again
    for task in again["good/w"]:
        crowd.reply("good/w", task, 1)
    assert crowd.states(job) == ["done"] * 4


def test_a_retry_goes_back_to_the_same_volunteer_when_nobody_else_can_take_it(crowd: Crowd) -> None:
    crowd.join("only/w")
    job = crowd.job([[1]])
    [task] = crowd.sent()["only/w"]
    crowd.reply("only/w", task, outcome=Outcome.ERROR)
    [again] = crowd.sent()["only/w"]
    crowd.reply("only/w", again, 2)
    assert crowd.states(job) == ["done"]


def test_tolerance_accepts_near_equal_floats() -> None:
    assert tolerance(0.1 + 0.2, 0.3) and tolerance([1.0, {"x": 2.0}], [1.0000000001, {"x": 2.0}])
    assert not tolerance(0.3, 0.31) and not tolerance([1.0], [1.0, 2.0]) and not tolerance(True, 1)


def test_a_validator_decides_agreement(crowd: Crowd) -> None:
    crowd.join("a/w")
    crowd.join("b/w")
    job = crowd.job([[1]], replicas=2, quorum=2, validator="tolerance")
    sent = crowd.sent()
    crowd.reply("a/w", sent["a/w"][0], 0.1 + 0.2)
    crowd.reply("b/w", sent["b/w"][0], 0.3)
    [row] = crowd.rows(job)
    assert row.state == "done" and row.value == pytest.approx(0.3)


def broken(a: Any, b: Any) -> bool:
    raise ValueError("cannot compare these")


def test_a_raising_validator_fails_the_task_with_its_message(crowd: Crowd) -> None:
    crowd.join("a/w")
    crowd.join("b/w")
    job = crowd.job([[1], [2]], replicas=2, quorum=2, validator=f"{__name__}:broken")
    while sent := crowd.sent():
        for key, tasks in sent.items():
            for task in tasks:
                crowd.reply(key, task, 1)
    rows = crowd.rows(job)
    assert [r.state for r in rows] == ["failed", "failed"]
    assert rows[0].errors[0]["type"] == "ValidatorError"
    assert "ValueError: cannot compare these" in rows[0].errors[0]["message"]
    assert crowd.store.get_job(job.id).state == "failed"  # a job that ends with failed tasks says so


def test_an_unknown_validator_is_refused_at_submit() -> None:
    with pytest.raises(InvalidInput, match="no validator named 'nope'"):
        Replication.make(replicas=2, validator="nope")
    with pytest.raises(InvalidInput, match="quorum <= replicas"):
        Replication.make(replicas=2, quorum=3)
    with pytest.raises(InvalidInput, match="adaptive"):
        Replication.make(adaptive=True)


def test_a_cheating_volunteer_is_quarantined_and_gets_no_more_work(crowd: Crowd) -> None:
    for key in ("h1/w", "h2/w", "h3/w", "cheat/w"):
        crowd.join(key)
    job = crowd.job([[i] for i in range(60)], replicas=2, quorum=2)
    for _ in range(200):
        sent = crowd.sent()
        if not sent:
            break
        for key, tasks in sent.items():
            for task in tasks:
                right = int(task.args[0]) * 10
                crowd.reply(key, task, right + 1 if key == "cheat/w" else right)
    rows = crowd.rows(job)
    assert all(r.state == "done" and r.value == r.args[0] * 10 for r in rows)
    assert "cheat" in crowd.store.quarantines()
    stats = {s.volunteer: s for s in crowd.stats()}
    assert stats["cheat"].validated == 0 and stats["cheat"].credit == 0 and stats["cheat"].invalid >= 1
    assert stats["cheat"].quarantined is not None and "invalid" in stats["cheat"].quarantined
    # quarantined: no new work until released
    crowd.job([[1]] * 8, replicas=2, quorum=2)
    assert "cheat/w" not in crowd.sent()
    assert crowd.store.release("cheat")
    crowd.jobs.poll()
    assert "cheat" not in crowd.jobs.trust.quarantined


def test_adaptive_replication_falls_once_volunteers_are_trusted(crowd: Crowd) -> None:
    crowd.jobs.quorum.rng = random.Random(7)
    for key in ("h1/w", "h2/w", "h3/w"):
        crowd.join(key)
    job = crowd.job([[i] for i in range(300)], replicas=2, quorum=2, adaptive=True)
    for _ in range(1000):
        sent = crowd.sent()
        if not sent:
            break
        for key, tasks in sent.items():
            for task in tasks:
                crowd.reply(key, task, int(task.args[0]) + 1)
    assert crowd.states(job) == ["done"] * 300
    progress = crowd.store.progress(job)
    assert progress.replication is not None and progress.replication < 1.3
    assert all(crowd.jobs.trust.trusted(v) for v in ("h1", "h2", "h3"))


def test_one_invalid_result_makes_a_trusted_volunteer_untrusted(crowd: Crowd) -> None:
    trust = crowd.jobs.trust
    for _ in range(defaults.TRUST_AFTER):
        trust.validated(1, "v", 1.0)
    assert trust.trusted("v")
    trust.invalid(1, "v", 0.0)
    assert not trust.trusted("v")


def test_a_value_in_dispute_keeps_a_volunteer_untrusted_until_it_is_decided(crowd: Crowd) -> None:
    # values are decided out of order: a disputed one waits for its tie-breaker while later
    # ones validate; those must not make a streak over the one that may prove invalid
    trust = crowd.jobs.trust
    for _ in range(defaults.TRUST_AFTER):
        trust.validated(1, "v", 1.0)
    trust.dispute("v")
    assert not trust.trusted("v")
    trust.settle("v")
    assert trust.trusted("v")


def test_a_retry_waits_for_a_busy_volunteer_rather_than_going_back_to_the_one_that_failed_it(crowd: Crowd) -> None:
    # given a broken volunteer with many slots, failing every task at once, and a busy sound one
    crowd.join("broken/w", capacity=4)
    crowd.join("sound/w", capacity=1)
    job = crowd.job([[i] for i in range(30)], max_attempts=2)
    for _ in range(200):
        sent = crowd.sent() or (crowd.jobs.poll() and {}) or crowd.sent()
        if not sent:
            break
        for key, tasks in sent.items():
            for task in tasks:
                if key == "broken/w":
                    crowd.reply(key, task, outcome=Outcome.ERROR)
                else:
                    crowd.reply(key, task, 1)
    # then no task went twice to the broken one: every task is done, by the sound one
    rows = crowd.rows(job)
    assert [r.state for r in rows] == ["done"] * 30 and {r.worker for r in rows} == {"sound/w"}
    assert all(len(r.errors) <= 1 for r in rows)


def test_a_validator_registered_as_an_entry_point_is_found_by_name(
        crowd: Crowd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # given a scientist's package installed the way pip would, registering "same_sign"
    install_package(tmp_path, "labvalid", "def same_sign(a, b):\n    return (a >= 0) == (b >= 0)\n",
                    "[dockercomp.validators]\nsame_sign = labvalid:same_sign\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    crowd.join("a/w")
    crowd.join("b/w")
    job = crowd.job([[1]], replicas=2, quorum=2, validator="same_sign")
    sent = crowd.sent()
    crowd.reply("a/w", sent["a/w"][0], 5)
    crowd.reply("b/w", sent["b/w"][0], 7)
    [row] = crowd.rows(job)
    assert (row.state, row.value) == ("done", 5)  # they agree by the validator, not by equality


def test_a_restarted_engine_rebuilds_the_votes_from_the_store(
        crowd: Crowd, monkeypatch: pytest.MonkeyPatch) -> None:
    # given a replicated task with one value in and one replica open
    for key in ("a/w", "b/w"):
        crowd.join(key)
    job = crowd.job([[1], [2]], replicas=2, quorum=2)
    sent = crowd.sent()
    crowd.reply("a/w", sent["a/w"][0], 10)
    crowd.flush()
    # when a new engine loads the same store, as Coordinator._load does
    monkeypatch.setattr(Store, "open", classmethod(lambda cls, url: crowd.store))
    again = Crowd()
    again.workers.load()
    again.ledger.reset(Leases.load(again.store, again.dispatcher.payloads))
    again.jobs.poll()
    again.seq = dict(crowd.seq)
    for key in ("a/w", "b/w", "c/w"):
        again.join(key)
    # then b's open replica still counts, a does not vote twice, and every task completes
    again.reply("b/w", sent["b/w"][0], 10)
    while more := again.sent():
        for key, tasks in more.items():
            for task in tasks:
                assert not (key == "a/w" and task.task_id == sent["a/w"][0].task_id)
                again.reply(key, task, 10 * int(task.args[0]))
    rows = again.rows(job)
    assert [(r.state, r.value) for r in rows] == [("done", 10), ("done", 20)]
    assert all(len({rep["worker"] for rep in r.replicas}) == len(r.replicas) for r in rows)


def test_submit_takes_the_replication_options_from_the_cli_and_the_api(tmp_path: Path) -> None:
    db = str(tmp_path / "c.db")
    runner = CliRunner()
    done = runner.invoke(coordinator_cli, ["submit", "add", "-", "--db", db, "--replicas", "3", "--quorum", "2",
                                           "--validator", "tolerance", "--adaptive", "--json"], input="[1, 2]\n")
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["replication"] == {"replicas": 3, "quorum": 2, "max_replicas": 6,
                                                      "distinct": "volunteer", "validator": "tolerance",
                                                      "adaptive": True}
    refused = runner.invoke(coordinator_cli, ["submit", "add", "-", "--db", db, "--replicas", "2", "--quorum", "3"],
                            input="[1, 2]\n")
    assert refused.exit_code == 2 and "quorum <= replicas" in refused.output
    with Client(db) as client:
        job = client.submit("add", [[1, 2]], replicas=2, quorum=2, distinct="worker")
        assert client.store.get_job(job.id).replication == Replication(2, 2, 4, "worker", None, False)
        assert client.store.get_job(1).replication.adaptive
        assert client.store.get_job(job.id).replication != client.store.get_job(1).replication
    missing = runner.invoke(coordinator_cli, ["volunteers", "release", "nobody", "--db", db])
    assert missing.exit_code == 3 and "not quarantined" in missing.output


def test_cancel_and_retry_of_a_replicated_job(crowd: Crowd) -> None:
    for key in ("a/w", "b/w", "c/w"):
        crowd.join(key)
    job = crowd.job([[1]], replicas=2, quorum=2, max_replicas=2)
    sent = crowd.sent()
    # no quorum within max replicas: failed with both values
    for value, (key, [task]) in enumerate(sent.items()):
        crowd.reply(key, task, value)
    assert crowd.states(job) == ["failed"]
    # retry: a fresh round of replicas, which may agree this time
    assert crowd.store.retry_failed(crowd.store.get_job(job.id)) == 1
    crowd.jobs.poll()
    again = crowd.sent()
    assert len(again) == 2
    for key, [task] in again.items():
        crowd.reply(key, task, 7)
    [row] = crowd.rows(job)
    assert (row.state, row.value, row.attempts) == ("done", 7, 4)
    # cancel while replicas are out: their answers only free the workers
    other = crowd.job([[2]], replicas=2, quorum=2)
    out = crowd.sent()
    crowd.store.cancel_job(crowd.store.get_job(other.id))
    crowd.jobs.poll()
    for key, [task] in out.items():
        crowd.reply(key, task, 1)
    assert crowd.states(other) == ["cancelled"] and len(crowd.ledger.leases) == 0
    assert not crowd.jobs.quorum.tasks
