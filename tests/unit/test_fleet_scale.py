"""What a fleet of 50,000 workers costs the coordinator grows with its free workers and its status
 budget, not with the fleet (issue 14).

Counted, not timed: how many workers' leases a round looks at, how many topics are parsed."""

from __future__ import annotations

import pytest

from dockercomp.broker.errors import InvalidTopic
from dockercomp.broker.memory import MemoryBroker
from dockercomp.broker.messages import Presence, PresenceState, Task
from dockercomp.broker.topics import Topics, WorkerRef, WorkerTopic
from dockercomp.coordinator import defaults
from dockercomp.coordinator.service import Coordinator, CoordinatorSettings
from dockercomp.coordinator.store import Store
from tests.support.rules import Rules

# Workers of one volunteer, under its capacity cap (coordinator Caps), each of capacity 1.
FLEET = 2_000


def _counting(rules: Rules) -> list[int]:
    """Every worker id whose leases the next rounds count."""
    counted: list[int] = []
    leases = rules.ledger.leases
    original = leases.count
    leases.count = lambda worker_id: counted.append(worker_id) or original(worker_id)  # type: ignore[method-assign]
    return counted


def test_after_one_result_the_round_looks_at_that_worker_only() -> None:
    # Given a fleet where every worker holds the one task it has room for, and more waiting
    rules = Rules()
    for i in range(FLEET):
        rules.online(f"w{i:04d}")
    job = rules.submit([[i, i] for i in range(FLEET + 10)])
    sent = rules.dispatch()
    assert len(sent) == FLEET and all(len(tasks) == 1 for tasks in sent.values())

    # When one worker answers
    name, [task] = next(iter(sent.items()))
    rules.answer(name, task, 2 * int(task.args[0]))
    counted = _counting(rules)
    again = rules.dispatch()

    # Then the next task goes to it, and the round counted a handful of leases, not 2,000
    assert list(again) == [name]
    assert len(counted) <= 4, len(counted)
    assert rules.states(job).count("done") == 1


def test_a_full_fleet_is_served_fairly_in_turn_as_results_come_back() -> None:
    # Given 5 workers of capacity 1, each holding a task, and 20 more tasks waiting
    rules = Rules()
    for i in range(5):
        rules.online(f"w{i}")
    job = rules.submit([[i, i] for i in range(25)])
    held: dict[str, Task] = {name: tasks[0] for name, tasks in rules.dispatch().items()}

    # When they answer in any order, round after round
    served: dict[str, int] = {name: 1 for name in held}
    while held:
        for name in sorted(held, reverse=True):
            rules.answer(name, held.pop(name), 0)
        for name, tasks in rules.dispatch().items():
            held[name] = tasks[0]
            served[name] += 1

    # Then every task is done, each worker having taken exactly its share
    assert rules.states(job) == ["done"] * 25
    assert sorted(served.values()) == [5] * 5


def test_the_worker_census_is_kept_until_a_presence_changes_it() -> None:
    from dockercomp.broker.messages import OfflineReason
    from dockercomp.coordinator.status import worker_census

    rules = Rules()
    for i in range(3):
        rules.online(f"w{i}", capacity=2)
    # Asked twice with nothing in between, it is counted once (the status summary asks twice a second)
    first = rules.workers.census()
    assert rules.workers.census() is first
    assert (first[0]["online"], first[1]) == (3, 6)
    # After a will, a pause and a bigger worker, it is counted again, and matches a fresh count
    rules.offline("w0", OfflineReason.LOST)
    rules.online("w1", capacity=5, reconnect=True)
    rules.online("w3", capacity=1)
    again = rules.workers.census()
    assert again is not first and again == worker_census(list(rules.workers))
    assert (again[0]["online"], again[0]["lost"], again[1]) == (3, 1, 2 + 5 + 1)


class _Wire:
    def __init__(self) -> None:
        self.topics: list[str] = []

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        self.topics.append(topic)


def test_worker_statuses_go_out_at_most_a_burst_at_a_time_oldest_change_first() -> None:
    from dockercomp.coordinator.status import StatusPublisher

    # Given 2,500 workers that all changed, the first of them twice
    rules = Rules()
    for i in range(2_500):
        rules.online(f"w{i:04d}")
    status = StatusPublisher(rules.topics, interval=0.5, burst=1_000)
    ids = sorted(rules.workers.by_id)
    for worker_id in ids:
        status.worker_changed(worker_id)
    status.worker_changed(ids[0])

    # When three publications are due
    wire = _Wire()
    published: list[list[str]] = []
    for tick in range(4):
        before = len(wire.topics)
        if status.due(1000.0 + tick):
            status.publish(wire, rules.workers.by_id, {}, lambda worker_id: 0, dict, 1000.0 + tick)  # type: ignore[arg-type]
        published.append([t for t in wire.topics[before:] if "/status/workers/" in t])

    # Then 1,000, 1,000 and 500 worker statuses go out, each worker once, in the order they changed
    assert [len(p) for p in published] == [1_000, 1_000, 500, 0]
    sent = [t.rsplit("/", 1)[-1] for p in published for t in p]
    assert sent == [f"w{i:04d}" for i in range(2_500)]
    assert not status.pending


def test_a_small_job_on_a_big_idle_fleet_looks_at_the_workers_it_uses_not_the_fleet() -> None:
    # Given 2,000 idle workers and a job of 100 tasks
    rules = Rules()
    for i in range(FLEET):
        rules.online(f"w{i:04d}")
    job = rules.submit([[i, i] for i in range(100)])
    counted = _counting(rules)

    # When a round deals them
    sent = rules.dispatch()

    # Then every task went out, one per worker, and the round counted the leases of a few
    # hundred workers at most (it walked the fleet until it had enough), not 2,000
    assert sum(len(tasks) for tasks in sent.values()) == 100 and len(sent) == 100
    assert len(counted) <= 400, len(counted)

    # And the next job's tasks go to the workers after them, round-robin
    rules.submit([[i, i] for i in range(100)])
    more = rules.dispatch()
    assert not set(more) & set(sent)
    assert rules.states(job) == ["assigned"] * 100


def test_a_round_looks_at_the_active_jobs_not_at_every_job_ever_finished(monkeypatch) -> None:  # noqa: ANN001
    # Given a coordinator that finished 200 one-task jobs (months of a scientist's submissions)
    from dockercomp.coordinator.dispatch import JobInfo

    rules = Rules()
    rules.online("w0")
    for i in range(200):
        rules.submit([[i, i]])
        [[task]] = rules.dispatch().values()
        rules.answer("w0", task, 2 * i)
        rules.flush()
    assert rules.jobs.active() == [] and len(rules.jobs.by_id) == 200

    # When a new job comes, and rounds run while it is served
    job = rules.submit([[1, 1], [2, 2], [3, 3]])
    looked: list[int] = []
    state_of = JobInfo.active
    monkeypatch.setattr(JobInfo, "active", property(lambda self: looked.append(self.id) or state_of.fget(self)))
    for _ in range(3):
        [[task]] = rules.dispatch().values()
        rules.answer("w0", task, 2 * int(task.args[0]))
        rules.flush()

    # Then it was the one active job until it finished, and the 201 jobs were looked at once for
    # the three rounds (the first call after the poll), not five or six times a round
    assert rules.states(job) == ["done"] * 3
    assert [j.id for j in rules.jobs.active()] == []
    assert len(looked) <= 3 * 201, len(looked)
    # and a poll, a completion or a reload (clear) shows the change at once
    again = rules.submit([[4, 4]])
    assert [j.id for j in rules.jobs.active()] == [again.id]
    rules.jobs.clear()
    assert rules.jobs.active() == []
    rules.jobs.poll()
    assert [j.id for j in rules.jobs.active()] == [again.id]


def test_a_poll_reads_the_rows_of_new_and_changed_jobs_only() -> None:
    # Given 50 jobs the engine holds, one of them still active
    rules = Rules()
    jobs = [rules.submit([[i, i]]) for i in range(50)]
    asked: list[list[int]] = []
    jobs_of = rules.store.jobs
    # (the memory store's marks are made from its every job: calls without ids are its own)
    rules.store.jobs = (  # type: ignore[method-assign]
        lambda ids=None: (ids is not None and asked.append(sorted(ids))) or jobs_of(ids))

    # When nothing changed, then a job is cancelled, one deleted and one submitted (as by the CLI)
    assert rules.jobs.poll() == []
    rules.store.cancel_job(jobs[3])
    rules.store.delete_job(jobs[7])
    new = rules.store.create_job("add", [[1, 1]])
    changed = rules.jobs.poll()

    # Then only the cancelled and the new job's rows were read, and the book shows all three changes
    assert asked == [[jobs[3].id, new.id]]
    assert sorted(job.id for job in changed) == [jobs[3].id, new.id]
    assert rules.jobs.by_id[jobs[3].id].state == "cancelled" and jobs[7].id not in rules.jobs.by_id
    left = [j.id for j in jobs if j.id not in (jobs[3].id, jobs[7].id)]
    assert [job.id for job in rules.jobs.active()] == left + [new.id]


def test_a_fleet_bigger_than_the_topic_cache_is_found_through_the_registry_not_parsed(monkeypatch) -> None:  # noqa: ANN001
    # Given an engine whose topic cache holds 4 topics, and 10 registered workers
    monkeypatch.setattr(defaults, "TOPIC_CACHE", 4)
    topics, broker = Topics(), MemoryBroker()
    coordinator = Coordinator(Store.open("memory://"), broker.connect("coordinator"), topics,
                              CoordinatorSettings(connect_timeout=1))
    coordinator.open()
    refs = [WorkerRef("v", f"w{i}") for i in range(10)]
    for ref in refs:
        presence = Presence(ref.worker, ref.volunteer, PresenceState.ONLINE, 1, None, host="h", version="0",
                            cpus=1, capacity=1, functions=("noop",), started=1.0)
        coordinator._on_message(topics.presence(ref), presence.encode(), False)
    while not coordinator._inbox.empty():
        coordinator.step()
    assert len(coordinator.workers.by_key) == 10
    parsed: list[str] = []
    original = Topics.parse_worker_topic
    monkeypatch.setattr(Topics, "parse_worker_topic",
                        lambda self, topic: parsed.append(topic) or original(self, topic))

    # When their result and presence topics come in, round after round
    for _ in range(2):
        for ref in refs:
            assert coordinator._parse_topic(topics.results(ref)) == WorkerTopic(ref, "results")
            assert coordinator._parse_topic(topics.presence(ref)) == WorkerTopic(ref, "presence")

    # Then none was parsed, and the cache stayed within its size
    assert parsed == [] and len(coordinator._topic_cache) <= 4
    # An unregistered worker's topic is parsed; what is no worker topic is still refused
    stranger = WorkerRef("v", "new")
    assert coordinator._parse_topic(topics.presence(stranger)) == WorkerTopic(stranger, "presence")
    assert parsed == [topics.presence(stranger)]
    for topic in (topics.results(refs[0]) + "/x", topics.results(refs[0])[:-len("results")] + "inbox",
                  "other/workers/v/w0/results"):
        with pytest.raises(InvalidTopic):
            coordinator._parse_topic(topic)
    coordinator.close()
