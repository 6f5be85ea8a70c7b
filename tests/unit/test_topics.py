"""Topic layout: every topic built in one place, names validated, worker topics parsed back."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.client import topic_matches_sub

from dockercomp.broker.defaults import MAX_NAME_LENGTH
from dockercomp.broker.errors import InvalidName, InvalidTopic
from dockercomp.broker.topics import Topics, WorkerRef, validate_name

ALICE_W1 = WorkerRef("alice", "w1")


def test_worker_topics_put_the_volunteer_on_its_own_level() -> None:
    topics = Topics()
    assert topics.presence(ALICE_W1) == "dockercomp/workers/alice/w1/presence"
    assert topics.tasks(ALICE_W1) == "dockercomp/workers/alice/w1/tasks"
    assert topics.results(ALICE_W1) == "dockercomp/workers/alice/w1/results"


def test_coordinator_and_status_topics() -> None:
    topics = Topics("lab")
    assert topics.coordinator_presence == "lab/coordinator/presence"
    assert topics.status_summary == "lab/status/summary"
    assert topics.status_job("17") == "lab/status/jobs/17"
    assert topics.status_worker(ALICE_W1) == "lab/status/workers/alice/w1"
    assert topics.all_status == "lab/status/#"


def test_coordinator_filters_match_every_worker_and_nothing_else() -> None:
    topics = Topics()
    bob = WorkerRef("bob", "w-2")
    for ref in (ALICE_W1, bob):
        assert topic_matches_sub(topics.all_presence, topics.presence(ref))
        assert topic_matches_sub(topics.all_results, topics.results(ref))
        assert not topic_matches_sub(topics.all_results, topics.tasks(ref))
        assert not topic_matches_sub(topics.all_presence, topics.results(ref))
    assert not topic_matches_sub(topics.all_presence, topics.coordinator_presence)


def test_an_acl_pattern_on_the_volunteer_level_confines_a_volunteer() -> None:
    # What `pattern write dockercomp/workers/%u/+/results` grants user alice.
    alice_may_write = "dockercomp/workers/alice/+/results"
    assert topic_matches_sub(alice_may_write, Topics().results(ALICE_W1))
    assert not topic_matches_sub(alice_may_write, Topics().results(WorkerRef("bob", "w1")))


def test_parse_worker_topic_round_trips() -> None:
    topics = Topics("lab")
    for kind, build in (("presence", topics.presence), ("tasks", topics.tasks), ("results", topics.results)):
        parsed = topics.parse_worker_topic(build(ALICE_W1))
        assert parsed.ref == ALICE_W1 and parsed.kind == kind


@pytest.mark.parametrize("topic", [
    "other/workers/alice/w1/presence",      # wrong root
    "dockercomp/workers/alice/presence",    # missing level
    "dockercomp/workers/alice/w1/status",   # unknown kind
    "dockercomp/workers/alice/w1/tasks/x",  # extra level
    "dockercomp/workers/al+ce/w1/tasks",    # invalid name
])
def test_parse_worker_topic_rejects_foreign_topics(topic: str) -> None:
    with pytest.raises(InvalidTopic):
        Topics().parse_worker_topic(topic)


@pytest.mark.parametrize("name", ["", "a/b", "a+b", "#", "$SYS", " w1", "-w1", "w 1", "lab.1", "a*b", "x" * (MAX_NAME_LENGTH + 1), 7, None])
def test_names_that_cannot_be_one_topic_level_are_refused(name: object) -> None:
    with pytest.raises(InvalidName) as caught:
        validate_name(name, "worker id")
    assert "worker id" in str(caught.value)


@pytest.mark.parametrize("name", ["w1", "W-1_x-2", "3f2a9c1b7d0e", "x" * MAX_NAME_LENGTH])
def test_valid_names_pass_unchanged(name: str) -> None:
    assert validate_name(name) == name


def test_worker_ref_validates_and_parses_its_key() -> None:
    assert WorkerRef.parse("alice/w1") == ALICE_W1
    assert ALICE_W1.key == "alice/w1" == str(ALICE_W1)
    with pytest.raises(InvalidName):
        WorkerRef("alice", "w/1")
    with pytest.raises(InvalidName):
        WorkerRef.parse("no-slash")


def test_names_a_broker_would_rewrite_are_refused_with_the_allowed_characters() -> None:
    # RabbitMQ's MQTT plugin maps '/' and '.' into each other: "lab.1" would be two levels there.
    for name, bad in (("lab.1", "'.'"), ("a*b", "'*'")):
        with pytest.raises(InvalidName) as caught:
            validate_name(name, "worker id")
        assert "letters, digits, '_' and '-' only" in str(caught.value) and bad in str(caught.value)
        assert "RabbitMQ" in str(caught.value)


def test_a_worker_topic_with_a_dotted_name_is_refused_as_a_bad_name() -> None:
    with pytest.raises(InvalidTopic) as caught:
        Topics().parse_worker_topic("dockercomp/workers/alice/lab.1/presence")
    assert isinstance(caught.value.__cause__, InvalidName)  # the coordinator counts these


@pytest.mark.parametrize("root", ["", "a/+", "#", "/abs", "my.project", "a/*"])
def test_bad_roots_are_refused(root: str) -> None:
    with pytest.raises(InvalidName):
        Topics(root)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_any_valid_name_is_exactly_one_safe_topic_level(name: str) -> None:
    try:
        validate_name(name)
    except InvalidName:
        return
    assert not set(name) & set("/+#$ \x00") and 0 < len(name) <= MAX_NAME_LENGTH
    topic = Topics().tasks(WorkerRef("v", name))
    assert Topics().parse_worker_topic(topic).ref.worker == name
