"""Replication end to end (issue 11): real brokers (Mosquitto and amqtt), a real SQLite file,
real `dockercomp agent run` processes of four volunteers, one of them cheating through a
test task plugin (installed the way pip would: a module plus a dist-info with entry points).
The engine runs in this process so the tests can read its trust state.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from dockercomp.broker.acl import Role
from dockercomp.broker.messages import decode_status
from dockercomp.broker.topics import Topics
from dockercomp.coordinator.replication import Replication
from dockercomp.coordinator.service import Coordinator
from dockercomp.coordinator.store import Store
from dockercomp.coordinator.trust import Trust
from tests.support import REPO_ROOT, wait_until
from tests.support.plugins import install_package
from tests.support.processes import Processes, finished, online
from tests.support.security import SecureBroker, connected, prove_subscribed

pytestmark = pytest.mark.timeout(180)

# answer(x) is 10 x; a cheater's (CHEAT names a counter file) is wrong for every third answer
# it gives: about a third of its tasks, never ten right in a row, so it cannot earn trust by
# luck and make the adaptive test flaky (a file, as the agent may run tasks in several processes).
PLUGIN_MODULE = textwrap.dedent('''
    import fcntl
    import os

    def answer(x):
        path = os.environ.get("CHEAT")
        if not path:
            return 10 * x
        with open(path, "a+") as counter:
            fcntl.flock(counter, fcntl.LOCK_EX)
            counter.seek(0)
            n = int(counter.read() or 0) + 1
            counter.seek(0)
            counter.truncate()
            counter.write(str(n))
        return 10 * x + 1 if n % 3 == 0 else 10 * x

    def flaky(x):
        if os.environ.get("BROKEN"):
            raise RuntimeError("this machine is broken")
        return x
''')
PLUGIN_ENTRY_POINTS = "[dockercomp.tasks]\nanswer = trusttasks:answer\nflaky = trusttasks:flaky\n"
HONEST = ("h1", "h2", "h3")
TOPICS = Topics()


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_package(tmp_path_factory.mktemp("site"), "trusttasks", PLUGIN_MODULE, PLUGIN_ENTRY_POINTS)


def volunteers(procs: Processes, plugin_dir: Path, engine: Coordinator) -> None:
    """One cheater and three honest volunteers, one worker each. The cheater starts first: a
    fresh agent is slow to its first results, and one that came last could see the job done
    by the others before it answered enough to be judged."""
    path = f"{plugin_dir}:{REPO_ROOT}"
    for count, volunteer in enumerate(("cheat", *HONEST), start=1):
        procs.start(volunteer, ["dockercomp.agent.cli", "run", "--broker", procs.broker_url or "", "--volunteer",
                                volunteer, "--worker-id", "w", "--concurrency", "2", "--keepalive", "2"],
                    env={"PYTHONPATH": path, "CHEAT": str(procs.logs / "cheat.count") if volunteer == "cheat" else ""})
        online(engine.store, count)


def test_a_cheater_among_honest_volunteers_is_outvoted_quarantined_and_not_credited(
        engine: Coordinator, procs: Processes, plugin_dir: Path, tmp_path: Path) -> None:
    volunteers(procs, plugin_dir, engine)
    store = engine.store
    job = store.create_job("answer", [[i] for i in range(120)], replication=Replication.make(replicas=2, quorum=2))
    progress = finished(store, job, timeout=120)

    assert (progress.state, progress.done, progress.failed) == ("done", 120, 0)
    rows = list(store.results(job))
    assert [r.value for r in rows] == [10 * i for i in range(120)]  # every accepted value is right
    cheats = [(r.args[0], rep) for r in rows for rep in r.replicas if rep["worker"] == "cheat/w"]
    assert any(rep["outcome"] == "invalid" for _, rep in cheats)
    for x, rep in cheats:  # a wrong value is never validated; a right one may be
        assert rep["outcome"] == ("invalid" if rep["value"] != 10 * x else "ok"), (x, rep)
    assert all(rep["outcome"] == "ok" for r in rows for rep in r.replicas if rep["worker"] != "cheat/w")
    # the cheater is quarantined, with the reason, and no credit for a wrong value
    stats = {s.volunteer: s for s in store.volunteer_stats()}
    assert "invalid" in store.quarantines().get("cheat", ""), stats
    stats = {s.volunteer: s for s in store.volunteer_stats()}
    assert stats["cheat"].validated == sum(rep["outcome"] == "ok" for _, rep in cheats)
    assert stats["cheat"].invalid == sum(rep["outcome"] == "invalid" for _, rep in cheats)
    assert all(stats[h].validated > 0 and stats[h].invalid == 0 and stats[h].credit > 0 for h in HONEST)
    # quarantined: a new job goes to the honest ones only
    again = store.create_job("answer", [[i] for i in range(12)], replication=Replication.make(replicas=2, quorum=2))
    assert finished(store, again).done == 12
    assert all(rep["worker"] != "cheat/w" for r in store.results(again) for rep in r.replicas)

    # the CLI shows it: workers, status, the leaderboard; an operator lifts the quarantine
    db = str(tmp_path / "coordinator.db")
    assert "quarantined" in procs.cli("workers", "--db", db)
    assert "Volunteer cheat is quarantined (no new work): job 1:" in procs.cli("status", "--db", db)
    board = {row["volunteer"]: row for row in json.loads(procs.cli("volunteers", "stats", "--db", db, "--json"))}
    assert board["cheat"]["quarantined"] and board["cheat"]["credit"] == round(stats["cheat"].credit, 3)
    procs.cli("volunteers", "release", "cheat", "--db", db)
    wait_until(lambda: "cheat" not in engine.jobs.trust.quarantined)


def test_a_retry_never_goes_back_to_the_volunteer_that_just_failed_the_task(
        engine: Coordinator, procs: Processes, plugin_dir: Path) -> None:
    # given a broken volunteer with many fast slots (every task fails at once) and a sound one
    path = f"{plugin_dir}:{REPO_ROOT}"
    for count, (volunteer, slots, broken) in enumerate((("broken", "4", "1"), ("sound", "1", "")), start=1):
        procs.start(volunteer, ["dockercomp.agent.cli", "run", "--broker", procs.broker_url or "", "--volunteer",
                                volunteer, "--worker-id", "w", "--concurrency", slots, "--keepalive", "2"],
                    env={"PYTHONPATH": path, "BROKEN": broken})
        online(engine.store, count)
    store = engine.store
    job = store.create_job("flaky", [[i] for i in range(60)], max_attempts=2)
    progress = finished(store, job, timeout=120)
    # then every task the broken one failed was retried on the sound one, and succeeded
    rows = list(store.results(job))
    assert (progress.done, progress.failed) == (60, 0), [r.errors for r in rows if r.errors][:3]
    assert all(r.worker == "sound/w" for r in rows)
    assert any(r.errors for r in rows)  # the broken one did get (and fail) tasks


def test_adaptive_replication_falls_below_1_3_once_honest_volunteers_are_trusted(
        engine: Coordinator, procs: Processes, plugin_dir: Path) -> None:
    volunteers(procs, plugin_dir, engine)
    store = engine.store
    job = store.create_job("answer", [[i] for i in range(400)],
                           replication=Replication.make(replicas=2, quorum=2, adaptive=True))
    progress = finished(store, job, timeout=150)

    assert (progress.state, progress.done) == ("done", 400)
    rows = list(store.results(job))
    assert [r.value for r in rows] == [10 * i for i in range(400)]  # no wrong value accepted
    assert all(engine.jobs.trust.trusted(h) for h in HONEST)
    assert not engine.jobs.trust.trusted("cheat")
    # Trust is earned over the first tasks (ten validated results each, while prefetched tasks
    # were already sent replicated): the factor is that of the second half of the job, once
    # honest volunteers are trusted; spot checks keep it above 1.
    later = rows[200:]
    factor = sum(len(r.replicas) for r in later) / len(later)
    assert 1.0 < factor < 1.3, factor
    assert progress.replication is not None and progress.replication < 1.6, progress  # the whole job, in status


def test_a_volunteers_status_is_retained_for_itself_and_observers_only(secure_broker: SecureBroker) -> None:
    # given the engine's record of two volunteers, published by the coordinator's account
    alice, bob = secure_broker.add("alice"), secure_broker.add("bob")
    dashboard = secure_broker.add("dashboard", Role.OBSERVER)
    trust = Trust(Store.open("memory://"))
    trust.validated(1, "alice", 2.5)
    trust.invalid(1, "bob", 0.0)
    with connected(secure_broker.url(secure_broker.coordinator), "coord") as coord:
        trust.publish(coord.connection, TOPICS, 100.0)
        assert not trust.changed
        # retained: whoever connects afterwards gets it
        with connected(secure_broker.url(dashboard), "dash", "dockercomp/status/volunteers/#") as dash, \
                connected(secure_broker.url(alice), "alice/w1", "dockercomp/status/volunteers/#") as mine:
            status = decode_status(dash.wait_for(TOPICS.status_volunteer("bob")))
            assert (status["invalid"], status["trusted"], status["credit"]) == (1, False, 0)
            status = decode_status(mine.wait_for(TOPICS.status_volunteer("alice")))
            assert (status["validated"], status["credit"], status["streak"]) == (1, 2.5, 1)
            dash.wait_for(TOPICS.status_volunteer("alice"))
            # alice's subscription covers bob's topic too: the ACL filters each delivery
            prove_subscribed(coord, mine, TOPICS.status_volunteer("alice"))
            assert TOPICS.status_volunteer("bob") not in mine.topics()
    with connected(secure_broker.url(bob), "bob/w1", "dockercomp/status/volunteers/#") as his:
        assert decode_status(his.wait_for(TOPICS.status_volunteer("bob")))["volunteer"] == "bob"
