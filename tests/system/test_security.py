"""Running in public: accounts, per-volunteer ACLs, revocation and TLS, on real brokers.

Mosquitto runs the shipped mosquitto.conf policy unchanged (only paths and ports moved) and
amqtt runs `dockercomp broker serve --password-file --acl-file` on the same generated files; the
accounts and certificates are made by `dockercomp coordinator volunteers` / `dockercomp broker certs`.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from dockercomp.broker.acl import Role
from dockercomp.broker.connection import MqttConnection, Will
from dockercomp.broker.messages import OfflineReason, Outcome, Presence, PresenceState, Result, Task, TaskError
from dockercomp.broker.passwords import PasswordFile
from dockercomp.broker.settings import BrokerSettings
from dockercomp.broker.topics import Topics, WorkerRef
from dockercomp.broker.accounts import Accounts, Credentials, Reloader
from dockercomp.broker.certs import certificate_hosts
from dockercomp.broker.cli import certs as certs_cli
from dockercomp.coordinator.cli import volunteers as volunteers_cli
from dockercomp.coordinator.service import Coordinator, CoordinatorSettings
from dockercomp.coordinator.store import TaskState
from tests.support import require, wait_until
from tests.support.brokers import MOSQUITTO_CONF, MosquittoProcess, find_mosquitto
from tests.support.agents import FakeAgent
from tests.support.processes import Processes, finished
from tests.support.security import (
    SecureBroker,
    connected,
    make_config,
    prove_subscribed,
    refusal,
)

pytestmark = pytest.mark.timeout(60)
TOPICS = Topics()
FAST = CoordinatorSettings(lease_margin=30, lease_check=0.2, poll_interval=0.1, status_interval=0.2,
                           connect_timeout=10)


# --------------------------------------------------------------------------- who gets in
def test_anonymous_client_is_refused(secure_broker: SecureBroker) -> None:
    assert "Not authorized" in refusal(secure_broker.url())


def test_wrong_password_is_refused(secure_broker: SecureBroker) -> None:
    alice = secure_broker.add("alice")
    assert "Not authorized" in refusal(secure_broker.url(alice, password="guess"))
    assert refusal(secure_broker.url(alice)) == ""


def test_revoked_volunteer_is_disconnected_and_cannot_come_back(secure_broker: SecureBroker) -> None:
    alice = secure_broker.add("alice")
    bob = secure_broker.add("bob")
    alice_ref = WorkerRef("alice", "w1")
    online = Presence(worker="w1", volunteer="alice", state=PresenceState.ONLINE, seq=7, capacity=2)
    with connected(secure_broker.url(secure_broker.coordinator), "coord", TOPICS.all_presence) as coord, \
            connected(secure_broker.url(alice), "alice/w1") as worker, \
            connected(secure_broker.url(bob), "bob/w1") as bystander:
        worker.connection.publish(TOPICS.presence(alice_ref), online.encode(), retain=True)
        coord.wait_for(TOPICS.presence(alice_ref))
        coord.received.clear()

        # When: the scientist revokes alice with the CLI, which makes the broker reload.
        result = CliRunner().invoke(volunteers_cli, [
            "remove", "alice", "--dir", str(secure_broker.accounts.directory),
            "--pid-file", str(secure_broker.reloader.pid_file),
            "--broker", secure_broker.url(secure_broker.coordinator), "--json"])
        assert result.exit_code == 0, result.output
        outcome = json.loads(result.stdout)
        assert outcome["reloaded"].startswith("sent SIGHUP") and outcome["marked_lost"] == ["alice/w1"]

        # Then: her worker is cut off at once, and its reconnection attempts are refused ...
        wait_until(lambda: not worker.connection.connected, timeout=10)
        wait_until(lambda: "Not authorized" in worker.connection.last_error, timeout=10)
        assert "Not authorized" in refusal(secure_broker.url(alice))
        # ... the coordinator learns it is gone, as from its will (same seq, reason lost) ...
        gone = Presence.decode(coord.wait_for(TOPICS.presence(alice_ref)))
        assert (gone.state, gone.reason, gone.seq) == (PresenceState.OFFLINE, OfflineReason.LOST, 7)
        # ... and other volunteers are untouched.
        assert bystander.connection.connected
    assert "alice" not in [a.name for a in secure_broker.accounts.all()]


def test_observer_reads_status_only(secure_broker: SecureBroker) -> None:
    coordinator = secure_broker.coordinator
    watcher = secure_broker.add("dashboard", Role.OBSERVER)
    bob_ref = WorkerRef("bob", "w1")
    with connected(secure_broker.url(coordinator), "coord") as coord, \
            connected(secure_broker.url(watcher), "dash", "dockercomp/#") as dash:
        prove_subscribed(coord, dash, TOPICS.status_summary)
        coord.connection.publish(TOPICS.presence(bob_ref), b"presence", retain=True)
        coord.connection.publish(TOPICS.tasks(bob_ref), b"task")
        # An observer cannot write status either, nor register a worker of its own.
        dash.connection.publish(TOPICS.status_summary, b"forged status")
        dash.connection.publish(TOPICS.presence(WorkerRef("dashboard", "x")), b"forged presence")
        coord.connection.publish(TOPICS.status_job("1"), b"job status")
        dash.wait_for(TOPICS.status_job("1"))
    assert set(dash.topics()) == {TOPICS.status_summary, TOPICS.status_job("1")}
    assert b"forged status" not in [p for _, p in dash.received]


# --------------------------------------------------------------------------- ACL between volunteers
def test_a_worker_cannot_receive_another_volunteers_tasks(secure_broker: SecureBroker) -> None:
    alice, bob = secure_broker.add("alice"), secure_broker.add("bob")
    alice_ref, bob_ref = WorkerRef("alice", "w1"), WorkerRef("bob", "w1")
    with connected(secure_broker.url(secure_broker.coordinator), "coord") as coord, \
            connected(secure_broker.url(bob), "bob/w1", TOPICS.tasks(bob_ref)) as bob_worker, \
            connected(secure_broker.url(alice), "alice/w1", TOPICS.tasks(bob_ref), "dockercomp/#",
                      TOPICS.tasks(alice_ref)) as snoop:
        # Her subscriptions to bob's tasks and to everything were accepted (Mosquitto grants
        # them and filters each delivery); her own task topic proves they are all active.
        prove_subscribed(coord, snoop, TOPICS.tasks(alice_ref))
        coord.connection.publish(TOPICS.tasks(bob_ref), b"bob's task")
        coord.connection.publish(TOPICS.tasks(alice_ref), b"after bob's")
        bob_worker.wait_for(TOPICS.tasks(bob_ref))
        wait_until(lambda: snoop.topics().count(TOPICS.tasks(alice_ref)) >= 2 and
                   any(p == b"after bob's" for _, p in snoop.received))
        time.sleep(0.2)  # amqtt delivers to each subscriber in its own task: let stragglers land
    assert TOPICS.tasks(bob_ref) not in snoop.topics()
    assert all(payload != b"bob's task" for _, payload in snoop.received)


def _presence(ref: WorkerRef) -> bytes:
    return Presence(worker=ref.worker, volunteer=ref.volunteer, state=PresenceState.ONLINE, seq=1,
                    capacity=1, functions=("add",)).encode()


def _result(ref: WorkerRef, task: Task, value: object) -> bytes:
    return Result(task_id=task.task_id, attempt=task.attempt, worker=ref.worker, volunteer=ref.volunteer,
                  outcome=Outcome.OK, value=value, nonce=task.nonce).encode()


def test_forged_results_on_another_workers_topic_never_reach_the_store(
        secure_broker: SecureBroker, tmp_path: Path) -> None:
    # Given: a coordinator, and bob's worker holding a task whose ids the attacker knows.
    alice, bob = secure_broker.add("alice"), secure_broker.add("bob")
    bob_ref = WorkerRef("bob", "w1")
    engine = Coordinator.connect(secure_broker.url(secure_broker.coordinator), str(tmp_path / "c.db"), FAST).start()
    will_carrier = MqttConnection(BrokerSettings.from_url(secure_broker.url(alice)), "alice/w2")
    try:
        with connected(secure_broker.url(bob), "bob/w1", TOPICS.tasks(bob_ref)) as bob_worker:
            bob_worker.connection.publish(TOPICS.presence(bob_ref), _presence(bob_ref), retain=True)
            job = engine.store.create_job("add", [[20, 22]])
            task = Task.decode(bob_worker.wait_for(TOPICS.tasks(bob_ref)))

            # When: alice forges bob's result three ways: on his topic, through a will on his
            # topic, and on her own topic naming him.
            forged = _result(bob_ref, task, "forged")
            with connected(secure_broker.url(alice), "alice/w1") as mallory:
                mallory.connection.publish(TOPICS.results(bob_ref), forged)
                mallory.connection.publish(TOPICS.results(WorkerRef("alice", "w1")), forged)
                assert mallory.connection.flush(5)
            will_carrier.will_factory = lambda: Will(TOPICS.results(bob_ref), forged, qos=1, retain=False)
            will_carrier.start()
            will_carrier.wait_connected(10)
            will_carrier.drop()  # no DISCONNECT: the broker would publish the will

            # Then: the only message that reached the engine is the one on alice's own topic,
            # rejected as naming someone else; the task still waits for bob.
            wait_until(lambda: engine.rejections.counts["mismatch"] == 1)
            time.sleep(0.5)  # room for a forged result that should not exist to arrive
            assert sum(engine.rejections.counts.values()) == 1
            assert engine.store.progress(job).done == 0

            # And bob's genuine answer is accepted.
            bob_worker.connection.publish(TOPICS.results(bob_ref), _result(bob_ref, task, 42))
            wait_until(lambda: engine.store.progress(job).done == 1)
        [row] = list(engine.store.results(job))
        assert (row.value, row.worker, row.state) == (42, "bob/w1", TaskState.DONE.value)
    finally:
        will_carrier.close(timeout=1)
        engine.stop()


# --------------------------------------------------------------------------- unguessable attempts
ATTACK_TASKS = 20


@pytest.mark.timeout(120)
def test_results_guessed_before_dispatch_are_all_forged_and_none_is_accepted(
        secure_broker: SecureBroker, tmp_path: Path) -> None:
    # The field report's attack: task ids are sequential and attempts count from 1, so a
    # registered volunteer published results for (task_id, attempt) ahead of dispatch and 14
    # of 20 were accepted as the tasks reached her worker. Every task message now carries a
    # random nonce; a result must echo it.
    alice, mallory = secure_broker.add("alice"), secure_broker.add("mallory")
    mallory_ref = WorkerRef("mallory", "m1")
    settings = CoordinatorSettings(lease_margin=0.5, lease_check=0.1, poll_interval=0.1, status_interval=0.2,
                                   connect_timeout=10)
    engine = Coordinator.connect(secure_broker.url(secure_broker.coordinator), str(tmp_path / "c.db"), settings)
    procs = Processes(None, tmp_path / "logs")
    published = 0
    try:
        with connected(secure_broker.url(mallory), "mallory/m1", TOPICS.tasks(mallory_ref)) as attacker:
            def forge(task_id: str, attempt: int, nonce: str) -> None:
                nonlocal published
                attacker.connection.publish(TOPICS.results(mallory_ref), Result(
                    task_id, attempt, "m1", "mallory", Outcome.OK, "forged", nonce=nonce).encode(), qos=1)
                published += 1

            # Given: mallory's worker registered (it gets its share of the tasks), alice's real
            # agent, and a job whose task ids mallory can guess (a fresh database counts from 1).
            attacker.connection.publish(TOPICS.presence(mallory_ref), _presence(mallory_ref), retain=True)
            engine.start()
            procs.start("agent", ["dockercomp.agent.cli", "run", "--worker-id", "w1", "--concurrency", "2",
                                  "--keepalive", "5", "--health-file", str(tmp_path / "agent.health")],
                        env={"DOCKERCOMP_BROKER": secure_broker.url(alice)})
            wait_until(lambda: sum(w.state == "online" for w in engine.store.workers()) == 2, timeout=30)
            # A presence replayed from before the engine connected is no proof of life (rebirth):
            # mallory's worker announces itself again, live, as a real agent answering would.
            attacker.connection.publish(TOPICS.presence(mallory_ref), _presence(mallory_ref), retain=True)
            wait_until(lambda: (slot := engine.workers.get("mallory/m1")) is not None and slot.confirmed, timeout=30)

            # When: she publishes a result for every guessable (task_id, attempt) before dispatch ...
            guesses = [(str(task_id), attempt) for task_id in range(1, ATTACK_TASKS + 1) for attempt in (1, 2, 3)]
            for task_id, attempt in guesses:
                forge(task_id, attempt, "")
            job = engine.store.create_job("add", [[i, i] for i in range(ATTACK_TASKS)], timeout=1, max_attempts=20)
            assert [str(t) for t in sorted(engine.store.task_ids(job.id, ["pending", "assigned"]))] == [
                str(i) for i in range(1, ATTACK_TASKS + 1)]
            # ... again and again while the job runs, and answers each task she is sent with the
            # right worker and attempt but a guessed nonce.
            answered: set[bytes] = set()
            while engine.store.progress(job).done < ATTACK_TASKS:
                for task_id, attempt in guesses:
                    forge(task_id, attempt, "AAAAAAAAAAAAAAAAAAAAAA")
                for _, payload in list(attacker.received):
                    if payload not in answered:
                        answered.add(payload)
                        task = Task.decode(payload)
                        assert len(task.nonce) >= 22
                        forge(task.task_id, task.attempt, task.nonce[::-1])
                time.sleep(0.05)
                assert engine.running, engine.error
            assert attacker.connection.flush(10)
            assert answered, "mallory's worker was sent no task: the test proves nothing"

            # Then: none was accepted: every value is alice's, and right ...
            rows = list(engine.store.results(job))
            assert [(row.value, row.worker) for row in rows] == [(2 * i, "alice/w1") for i in range(ATTACK_TASKS)]
            # ... and every forgery is counted as forged, and held against mallory only.
            # (thousands of forgeries, each looked up in the store: on a loaded machine the engine
            # may still be working through them when the job is done)
            wait_until(lambda: sum(engine.rejections.snapshot().values()) >= published, timeout=60)
            counted = {kind: n for kind, n in engine.rejections.snapshot().items() if n}
            # The guesses sent before the job existed may be read before it is stored: no such
            # task yet ("unknown"); every later one is "forged".
            assert set(counted) <= {"forged", "unknown"} and sum(counted.values()) == published, counted
            assert counted.get("unknown", 0) <= len(guesses), counted
            assert engine.workers.get("mallory/m1").rejected == published  # type: ignore[union-attr]
            assert engine.workers.get("alice/w1").rejected == 0  # type: ignore[union-attr]
    finally:
        procs.stop_all()
        engine.stop()


# --------------------------------------------------------------------------- hostile presence
SINK_TASKS = 200


def _most_held_at_once(db: Path, volunteer: str) -> int:
    """The most attempts the volunteer's workers held open at one time, from the stored attempts."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT a.sent_at, a.finished_at FROM attempt a JOIN worker w ON w.id = a.worker_id "
                            "WHERE w.volunteer = ?", (volunteer,)).fetchall()
    events = sorted([(sent, 1) for sent, _ in rows] + [(finished, -1) for _, finished in rows if finished],
                    key=lambda event: (event[0], event[1]))  # a close before an open at the same instant
    held = most = 0
    for _, change in events:
        held += change
        most = max(most, held)
    return most


@pytest.mark.timeout(120)
def test_a_volunteer_announcing_huge_capacity_and_failing_everything_gets_only_its_capped_share(
        secure_mosquitto: SecureBroker, tmp_path: Path) -> None:
    # The field report: two fake workers of one volunteer announcing capacity 10**6 and answering
    # every task with an error failed 185 of 200 tasks in 1.1 s. The caps bound what such a
    # volunteer holds at any moment (here set low, as an operator may); which worker a retry goes
    # to is dispatch's rule (retries avoid the volunteer that failed the task).
    broker = secure_mosquitto
    alice, mallory = broker.add("alice"), broker.add("mallory")
    settings = CoordinatorSettings(lease_margin=30, lease_check=0.2, poll_interval=0.1, status_interval=0.2,
                                   connect_timeout=10, volunteer_max_capacity=2, volunteer_max_prefetch=0)
    db = tmp_path / "c.db"
    engine = Coordinator.connect(broker.url(broker.coordinator), str(db), settings).start()
    procs = Processes(None, tmp_path / "logs")
    sinks = [FakeAgent(MqttConnection(BrokerSettings.from_url(broker.url(mallory)), f"mallory/sink{i}"),
                       f"sink{i}", volunteer="mallory", capacity=10**6, prefetch=10**6, functions=("add",),
                       fail_with=lambda task: TaskError("RuntimeError", "nothing computed here"))
             for i in (1, 2)]
    try:
        for sink in sinks:
            sink.start()
        procs.start("agent", ["dockercomp.agent.cli", "run", "--worker-id", "w1", "--concurrency", "2",
                              "--keepalive", "5", "--health-file", str(tmp_path / "agent.health")],
                    env={"DOCKERCOMP_BROKER": broker.url(alice)})
        wait_until(lambda: sum(w.state == "online" for w in engine.store.workers()) == 3, timeout=30)
        granted = {w.key: (w.capacity, w.prefetch) for w in engine.store.workers()}
        assert granted["mallory/sink1"] == (2, 0) and granted["mallory/sink2"] == (0, 0)

        job = engine.store.create_job("add", [[i, i] for i in range(SINK_TASKS)])
        progress = finished(engine.store, job, timeout=90)
        assert engine.running, engine.error

        # Then: mallory never held more than her volunteer's cap at once (she asked for 2 * 10**6) ...
        assert _most_held_at_once(db, "mallory") <= 2
        assert sum(len(sink.received) for sink in sinks) > 0  # she did get her share, and failed it
        # ... every task ended, every value stored is right and alice's, and every failure was
        # mallory's, counted against her workers only.
        assert progress.done + progress.failed == SINK_TASKS
        rows = list(engine.store.results(job))
        assert all(row.value == 2 * row.index and row.worker == "alice/w1" for row in rows if row.state == "done")
        assert {e["worker"] for row in rows for e in row.errors} <= {"mallory/sink1", "mallory/sink2"}
        failed = {w.key: w.tasks_failed for w in engine.store.workers()}
        assert failed["alice/w1"] == 0 and failed["mallory/sink1"] + failed["mallory/sink2"] > 0
    finally:
        for sink in sinks:
            sink.transport.close(timeout=1)
        procs.stop_all()
        engine.stop()


# --------------------------------------------------------------------------- TLS
def test_tls_with_the_generated_ca_succeeds_and_without_it_fails_verification(
        secure_mosquitto: SecureBroker) -> None:
    alice = secure_mosquitto.add("alice")
    assert refusal(secure_mosquitto.tls_url(alice)) == ""
    assert refusal(secure_mosquitto.tls_url(alice, host="localhost")) == ""
    # The system trust store does not know our private CA.
    reason = refusal(secure_mosquitto.tls_url(alice, ca=False))
    assert "certificate not trusted" in reason and "?ca=" in reason


def test_tls_checks_the_host_name_against_the_certificate(secure_mosquitto: SecureBroker, tmp_path: Path) -> None:
    # Given: a certificate issued for another name only, signed by the CA the client trusts.
    alice = secure_mosquitto.add("alice")
    runner = CliRunner()
    result = runner.invoke(certs_cli, ["init", "--dir", str(secure_mosquitto.accounts.directory),
                                       "--host", "broker.example.org", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ca_created"] is False  # volunteers keep their ca.crt
    secure_mosquitto.process.stop()
    secure_mosquitto.process.start()
    assert certificate_hosts(secure_mosquitto.certs.server_cert) == ["broker.example.org"]
    # Then: reaching it as 127.0.0.1 fails, although the chain is trusted.
    assert "certificate not trusted" in refusal(secure_mosquitto.tls_url(alice))


def test_the_plain_listener_of_the_shipped_config_needs_an_account_too(secure_mosquitto: SecureBroker) -> None:
    # per_listener_settings is false: the policy covers 1883 as well as 8883.
    assert "Not authorized" in refusal(secure_mosquitto.url())
    assert "Not authorized" in refusal(secure_mosquitto.tls_url(secure_mosquitto.coordinator).replace(
        secure_mosquitto.coordinator.password, "wrong"))


# --------------------------------------------------------------------------- optional anonymous status
@pytest.fixture
def mosquitto_with_public_status(tmp_path: Path) -> Iterator[tuple[MosquittoProcess, Credentials]]:
    """The shipped config with the one change its comment offers: allow_anonymous true."""
    binary = find_mosquitto()
    require(binary, "the mosquitto binary", "apt-get install mosquitto (or run `make system`)")
    conf = tmp_path / "public-status.conf"
    text = MOSQUITTO_CONF.read_text()
    assert re.search(r"(?m)^allow_anonymous false$", text)
    conf.write_text(re.sub(r"(?m)^allow_anonymous false$", "allow_anonymous true", text))
    accounts, coordinator = make_config(tmp_path / "broker-config")
    broker = MosquittoProcess(tmp_path / "broker", binary=binary, source_conf=conf, security_dir=accounts.directory)
    broker.start()
    try:
        yield broker, coordinator
    finally:
        broker.stop()


def test_anonymous_clients_if_allowed_only_read_status(
        mosquitto_with_public_status: tuple[MosquittoProcess, Credentials]) -> None:
    broker, coordinator = mosquitto_with_public_status
    ref = WorkerRef("bob", "w1")
    coordinator_url = BrokerSettings(host=broker.host, port=broker.port, username=coordinator.name,
                                     password=coordinator.password).full_url
    with connected(coordinator_url, "coord", TOPICS.all_results, TOPICS.all_presence) as coord, \
            connected(broker.url, "", "dockercomp/#") as anonymous:
        prove_subscribed(coord, anonymous, TOPICS.status_summary)
        coord.connection.publish(TOPICS.tasks(ref), b"task")
        coord.connection.publish(TOPICS.presence(ref), b"presence")
        anonymous.connection.publish(TOPICS.results(ref), b"anonymous result")
        anonymous.connection.publish(TOPICS.presence(ref), b"anonymous presence")
        coord.connection.publish(TOPICS.status_job("1"), b"job status")
        anonymous.wait_for(TOPICS.status_job("1"))
        coord.wait_for(TOPICS.presence(ref))
        time.sleep(0.2)
    assert set(anonymous.topics()) == {TOPICS.status_summary, TOPICS.status_job("1")}
    assert [p for _, p in coord.received] == [b"presence"]


# --------------------------------------------------------------------------- the CLI
def test_volunteers_add_list_remove_and_the_install_command(tmp_path: Path) -> None:
    config = tmp_path / "broker-config"
    runner = CliRunner()
    assert runner.invoke(volunteers_cli, ["init", "--dir", str(config)]).exit_code == 0
    assert runner.invoke(certs_cli, ["init", "--dir", str(config), "--host", "broker.example.org"]).exit_code == 0

    added = runner.invoke(volunteers_cli, ["add", "alice", "--dir", str(config), "--json"])
    assert added.exit_code == 0, added.output
    info = json.loads(added.stdout)
    # The password works against the file the broker reads, and the URL carries it.
    assert PasswordFile(config / "passwd").check("alice", info["password"])
    assert info["install_command"] == (
        f"sh install_me.sh --broker mqtts://alice:{info['password']}@broker.example.org:8883 "
        "--ca-file ca.crt --yes")
    assert BrokerSettings.from_url(info["url"]).ca_file == "ca.crt"
    assert info["reloaded"] is None and "has NOT reloaded" in added.stderr  # nothing configured

    listed = json.loads(runner.invoke(volunteers_cli, ["list", "--dir", str(config), "--json"]).stdout)
    assert {(a["name"], a["role"]) for a in listed} == {
        ("alice", "volunteer"), ("coordinator", "coordinator"), ("local", "volunteer")}
    table = runner.invoke(volunteers_cli, ["list", "--dir", str(config)])
    assert "alice" in table.output and "coordinator" in table.output

    again = runner.invoke(volunteers_cli, ["add", "alice", "--dir", str(config)])
    assert again.exit_code == 2 and "exists already" in again.output
    removed = runner.invoke(volunteers_cli, ["remove", "alice", "--dir", str(config)])
    assert removed.exit_code == 0
    assert "alice" not in PasswordFile(config / "passwd").read()
    unknown = runner.invoke(volunteers_cli, ["remove", "alice", "--dir", str(config)])
    assert unknown.exit_code == 3 and "no account 'alice'" in unknown.output
    # The coordinator's .env holds a URL the coordinator can use as is.
    env = (config / "coordinator.env").read_text()
    assert PasswordFile(config / "passwd").check(
        "coordinator", BrokerSettings.from_url(env.split("=", 1)[1].strip()).password or "")
    assert (config / "coordinator.env").stat().st_mode & 0o077 == 0


def test_volunteers_cli_rejects_bad_names_and_says_what_to_do(tmp_path: Path) -> None:
    runner = CliRunner()
    config = str(tmp_path / "cfg")
    no_host = runner.invoke(volunteers_cli, ["add", "alice", "--dir", config])
    assert no_host.exit_code == 2 and "--host" in no_host.output
    wildcard = runner.invoke(volunteers_cli, ["add", "al+ce", "--dir", config, "--host", "h"])
    assert wildcard.exit_code == 2 and "letters, digits" in wildcard.output
    dotted = runner.invoke(volunteers_cli, ["add", "lab.1", "--dir", config, "--host", "h"])  # RabbitMQ splits it
    assert dotted.exit_code == 2 and "'_' and '-'" in dotted.output and "RabbitMQ" in dotted.output
    reserved = runner.invoke(volunteers_cli, ["add", "coordinator", "--dir", config, "--host", "h"])
    assert reserved.exit_code == 2 and "coordinator's account" in reserved.output
    stale = runner.invoke(volunteers_cli, ["add", "bob", "--dir", config, "--host", "h",
                                           "--pid-file", str(tmp_path / "missing.pid")])
    assert stale.exit_code == 5 and "is the broker running" in stale.output  # Exit.BROKER


def test_reload_command_failure_is_reported(tmp_path: Path) -> None:
    accounts = Accounts(tmp_path)
    accounts.add("alice")
    with pytest.raises(Exception, match="reload command 'false' failed"):
        Reloader(command="false").reload()


def test_broker_serve_refuses_half_a_security_setup(tmp_path: Path) -> None:
    from dockercomp.broker.cli import main as broker_cli

    runner = CliRunner()
    alone = runner.invoke(broker_cli, ["serve", "--port", "0", "--acl-file", str(tmp_path / "acl")])
    assert alone.exit_code == 2 and "need --password-file" in alone.output
    missing = runner.invoke(broker_cli, ["serve", "--port", "0", "--password-file", str(tmp_path / "passwd")])
    assert missing.exit_code == 2 and "dockercomp coordinator volunteers init" in missing.output
