"""Status topics come back on their own (issue 15): a broker that keeps retained messages per node
and replays them only to exact-topic subscriptions (RabbitMQ) gives a new `status/#` observer
nothing, so an idle coordinator republishes the summary and its active jobs every refresh."""

from __future__ import annotations

from typing import Any

from dockercomp.broker.topics import Topics
from dockercomp.coordinator.dispatch import JobInfo
from dockercomp.coordinator.status import StatusPublisher
from dockercomp.coordinator.store import JobState


def _job(job_id: int, state: JobState) -> JobInfo:
    return JobInfo(job_id, f"job-{job_id}", "noop", 10.0, 3, state.value, 1, 5, 0.0, None)


class _Wire:
    def __init__(self) -> None:
        self.topics: list[str] = []

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        self.topics.append(topic)


def _publish_if_due(status: StatusPublisher, wire: _Wire, jobs: dict[int, Any], now: float) -> list[str]:
    before = len(wire.topics)
    if status.due(now):
        status.publish(wire, {}, jobs, lambda worker_id: 0, dict, now)  # type: ignore[arg-type]
    return wire.topics[before:]


def test_an_idle_coordinator_republishes_the_summary_and_active_jobs_every_refresh() -> None:
    # Given one active and one finished job, and a first publication of everything
    topics = Topics()
    status = StatusPublisher(topics, interval=0.5, refresh=10.0)
    jobs = {1: _job(1, JobState.ACTIVE), 2: _job(2, JobState.DONE)}
    status.job_changed(2)
    wire = _Wire()
    first = _publish_if_due(status, wire, jobs, 100.0)
    assert topics.status_summary in first and topics.status_job("2") in first

    # When nothing changes, nothing goes out until the refresh is due
    assert not status.pending
    assert [_publish_if_due(status, wire, jobs, t) for t in (101.0, 105.0, 109.9)] == [[], [], []]
    assert status.next_due() == 110.0

    # Then the summary and the active job again (not the finished one), and again 10 s later
    again = _publish_if_due(status, wire, jobs, 110.0)
    assert sorted(again) == sorted([topics.status_summary, topics.status_job("1")])
    assert _publish_if_due(status, wire, jobs, 115.0) == []
    assert topics.status_summary in _publish_if_due(status, wire, jobs, 120.0)
