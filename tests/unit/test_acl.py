"""The generated access policy (broker/acl.py): who may read and write which topic. The same
files enforced by real Mosquitto and amqtt are tested in tests/system/test_security.py."""

from __future__ import annotations

import pytest

from dockercomp.broker.acl import Access, Acl, Role, render_acl

ACCOUNTS = {"coordinator": Role.COORDINATOR, "alice": Role.VOLUNTEER, "dash": Role.OBSERVER}


@pytest.mark.parametrize(("user", "topic", "access", "allowed"), [
    ("alice", "dockercomp/workers/alice/w1/presence", Access.WRITE, True),
    ("alice", "dockercomp/workers/alice/w1/results", Access.WRITE, True),
    ("alice", "dockercomp/workers/alice/w1/tasks", Access.READ, True),
    ("alice", "dockercomp/workers/alice/w1/tasks", Access.WRITE, False),
    ("alice", "dockercomp/workers/bob/w1/results", Access.WRITE, False),
    ("alice", "dockercomp/workers/bob/w1/tasks", Access.READ, False),
    ("alice", "dockercomp/workers/bob/w1/presence", Access.READ, False),
    ("alice", "dockercomp/status/workers/alice/w1", Access.READ, True),
    ("alice", "dockercomp/status/summary", Access.READ, False),
    ("alice", "dockercomp/coordinator/presence", Access.WRITE, False),
    ("coordinator", "dockercomp/workers/bob/w1/tasks", Access.WRITE, True),
    ("coordinator", "dockercomp/workers/bob/w1/results", Access.READ, True),
    ("coordinator", "dockercomp/workers/bob/w1/presence", Access.WRITE, True),
    ("coordinator", "dockercomp/status/summary", Access.WRITE, True),
    # issue 10 item 15: submit (as the coordinator account) wakes serve; nobody else may
    ("coordinator", "dockercomp/coordinator/nudge", Access.WRITE, True),
    ("coordinator", "dockercomp/coordinator/nudge", Access.READ, True),
    ("alice", "dockercomp/coordinator/nudge", Access.WRITE, False),
    ("dash", "dockercomp/coordinator/nudge", Access.WRITE, False),
    (None, "dockercomp/coordinator/nudge", Access.WRITE, False),
    ("dash", "dockercomp/status/jobs/1", Access.READ, True),
    ("dash", "dockercomp/status/jobs/1", Access.WRITE, False),
    ("dash", "dockercomp/workers/dash/w1/presence", Access.WRITE, False),  # deny beats the pattern
    ("dash", "dockercomp/workers/dash/w1/tasks", Access.READ, False),
    # issue 13: the dashboard shows whether the coordinator is up; observers cannot fake it
    ("dash", "dockercomp/coordinator/presence", Access.READ, True),
    ("dash", "dockercomp/coordinator/presence", Access.WRITE, False),
    (None, "dockercomp/coordinator/presence", Access.READ, True),
    (None, "dockercomp/coordinator/presence", Access.WRITE, False),
    (None, "dockercomp/status/summary", Access.READ, True),
    (None, "dockercomp/workers/x/y/presence", Access.READ, False),
    ("mallory", "$SYS/broker/clients/connected", Access.READ, False),
    # Rebirth requests: every worker reads them, only the coordinator writes them.
    ("alice", "dockercomp/coordinator/rebirth", Access.READ, True),
    ("alice", "dockercomp/coordinator/rebirth", Access.WRITE, False),
    ("coordinator", "dockercomp/coordinator/rebirth", Access.WRITE, True),
    ("dash", "dockercomp/coordinator/rebirth", Access.WRITE, False),
    (None, "dockercomp/coordinator/rebirth", Access.WRITE, False),
])
def test_the_generated_acl(user: str | None, topic: str, access: Access, allowed: bool) -> None:
    acl = Acl.parse(render_acl(ACCOUNTS))
    assert acl.allows(user, f"{user}/w1", topic, access) is allowed


def test_a_user_or_client_id_with_wildcards_gets_nothing_from_patterns() -> None:
    acl = Acl.parse(render_acl(ACCOUNTS))
    assert not acl.allows("alice", "alice/#", "dockercomp/workers/alice/w1/results", Access.WRITE)


def test_the_acl_follows_a_custom_topic_root() -> None:
    acl = Acl.parse(render_acl(ACCOUNTS, root="lab7"))
    assert acl.allows("alice", "c", "lab7/workers/alice/w1/results", Access.WRITE)
    assert not acl.allows("alice", "c", "dockercomp/workers/alice/w1/results", Access.WRITE)
