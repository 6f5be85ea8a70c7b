"""The `coordinator` command line, as a scientist uses it.

Most tests drive the click commands in-process (CliRunner) against a real SQLite file; the
end-to-end test runs the real `coordinator` processes with a real broker and real agents.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from dockercomp.broker.messages import OfflineReason, Presence, PresenceState
from dockercomp.broker.topics import Topics, WorkerRef
from dockercomp.coordinator.cli import main
from dockercomp.coordinator.sqlstore import Worker
from dockercomp.coordinator.store import Store, WorkerState
from tests.support import REPO_ROOT, Watcher, connect_client, free_port, wait_until
from tests.support.brokers import BrokerProcess
from tests.support.processes import Processes

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "coordinator.db")


@pytest.fixture
def cli(db: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[CliRunner]:
    # Wide enough that tables are not cut; --db comes from the environment as for a user.
    monkeypatch.setenv("COLUMNS", "160")
    monkeypatch.setenv("DOCKERCOMP_DB", db)
    monkeypatch.delenv("DOCKERCOMP_BROKER", raising=False)
    yield CliRunner()


def run(cli: CliRunner, *args: str, input: str | bytes | None = None) -> Result:
    return cli.invoke(main, list(args), input=input, catch_exceptions=False)


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def job_names(cli: CliRunner) -> list[str]:
    result = run(cli, "status", "--json")
    if result.exit_code == 3 and "no coordinator database" in result.stderr:
        return []  # nothing was ever stored: not even the database was created
    assert result.exit_code == 0, result.output
    return [job["name"] for job in json.loads(result.stdout)]


# ------------------------------------------------------------------------------ submit
def test_submit_stores_one_task_per_line_and_prints_the_job(cli: CliRunner, tmp_path: Path) -> None:
    # Given an input file with a blank line among three argument lists
    path = write(tmp_path / "sums.txt", "[1, 2]\n\n[3, 4]\n  [5, 6]  \n")
    # When it is submitted
    result = run(cli, "submit", "add", path, "--job", "sums")
    # Then the job is named and its three tasks are stored in input order, pending
    assert result.exit_code == 0, result.output
    assert "Submitted job sums (id 1): 3 tasks of add" in result.stdout
    assert "dockercomp coordinator status sums --watch" in result.stdout
    rows = [json.loads(line) for line in run(cli, "results", "sums", "--json").stdout.splitlines()]
    assert [(r["index"], r["args"], r["state"]) for r in rows] == [
        (0, [1, 2], "pending"), (1, [3, 4], "pending"), (2, [5, 6], "pending"),
    ]  # fmt: skip


def test_submit_reads_stdin_and_prints_json(cli: CliRunner) -> None:
    result = run(cli, "submit", "count_primes", "-", "--timeout", "5", "--max-attempts", "2", "--json",
                 input="[0, 10]\n[10, 20]\n")  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["name"] == "job-1" and data["job_id"] == 1
    assert data["tasks"] == 2 and data["function"] == "count_primes"
    assert data["timeout"] == 5.0 and data["max_attempts"] == 2


@pytest.mark.parametrize(
    ("content", "line", "why"),
    [
        ("[1, 2]\n[3, 4]\n[5, \n", "line 3", "not valid JSON"),
        ("[1, 2]\n\n{\"a\": 1}\n", "line 3", "expected a JSON array"),
        ("[1, 2]\n\"text\"\n", "line 2", "got a string"),
        ("[NaN]\n", "line 1", "NaN"),
        ("[1e999]\n", "line 1", "too large"),
        ("[1]\n" + "[" * 40 + "]" * 40 + "\n", "line 2", "nested deeper"),
        ("[\"" + "x" * 300_000 + "\"]\n", "line 1", "at most"),
    ],
)
def test_a_bad_line_is_named_and_nothing_is_stored(cli: CliRunner, tmp_path: Path, content: str,
                                                   line: str, why: str) -> None:  # fmt: skip
    path = write(tmp_path / "bad.txt", content)
    result = run(cli, "submit", "add", path, "--job", "bad")
    assert result.exit_code == 2
    assert f"bad.txt, {line}: " in result.stderr and why in result.stderr
    assert "nothing was submitted" in result.stderr
    assert "Traceback" not in result.output
    assert job_names(cli) == []


def test_non_utf8_and_empty_inputs_are_rejected(cli: CliRunner, tmp_path: Path) -> None:
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"[1, 2]\n[\xff\xfe]\n")
    result = run(cli, "submit", "add", str(binary))
    assert result.exit_code == 2 and "line 2: not UTF-8" in result.stderr
    result = run(cli, "submit", "add", write(tmp_path / "empty.txt", "\n  \n"))
    assert result.exit_code == 2 and "no arguments found" in result.stderr
    result = run(cli, "submit", "add", str(tmp_path / "missing.txt"))
    assert result.exit_code == 2 and "cannot read" in result.stderr and "missing.txt" in result.stderr
    assert job_names(cli) == []


def test_submit_rejects_bad_options_without_storing(cli: CliRunner, tmp_path: Path) -> None:
    path = write(tmp_path / "in.txt", "[1, 2]\n")
    assert run(cli, "submit", "add", path, "--job", "a/b").exit_code == 2
    assert run(cli, "submit", "add", path, "--timeout", "0").exit_code == 2
    assert run(cli, "submit", "add", path, "--max-attempts", "0").exit_code == 2
    assert job_names(cli) == []
    # A name can be used once
    assert run(cli, "submit", "add", path, "--job", "once").exit_code == 0
    again = run(cli, "submit", "add", path, "--job", "once")
    assert again.exit_code == 2 and "already exists" in again.stderr
    assert job_names(cli) == ["once"]


# ------------------------------------------------------------------------------ status
def test_status_lists_jobs_and_shows_one_with_a_bar(cli: CliRunner, tmp_path: Path) -> None:
    path = write(tmp_path / "in.txt", "[1, 2]\n[3, 4]\n")
    run(cli, "submit", "add", path, "--job", "first")
    run(cli, "submit", "add", path, "--job", "second")

    table = run(cli, "status")
    assert table.exit_code == 0
    assert "first" in table.stdout and "second" in table.stdout and "0/2 0%" in table.stdout
    assert "No worker is online" in table.stdout

    one = run(cli, "status", "second")
    assert "Job second (id 2) · add · active" in one.stdout
    assert "done 0 · failed 0 · running 0 · queued 0 · pending 2 · cancelled 0" in one.stdout

    data = json.loads(run(cli, "status", "2", "--json").stdout)
    assert (data["name"], data["total"], data["pending"], data["percent"]) == ("second", 2, 2, 0.0)


def test_status_of_an_empty_store_says_how_to_start(cli: CliRunner, db: str) -> None:
    Store.open(db).close()  # as `serve` leaves it before the first submit
    result = run(cli, "status")
    assert result.exit_code == 0 and "No jobs yet" in result.stdout
    assert json.loads(run(cli, "status", "--json").stdout) == []


@pytest.mark.parametrize("command", ["status", "results", "cancel", "retry"])
def test_an_unknown_job_lists_the_known_ones(cli: CliRunner, tmp_path: Path, command: str) -> None:
    run(cli, "submit", "add", write(tmp_path / "in.txt", "[1, 2]\n"), "--job", "known")
    result = run(cli, command, "nope")
    assert result.exit_code == 3
    assert result.stderr.startswith("error: no job 'nope'") and "known jobs: known" in result.stderr
    assert "Traceback" not in result.output


def test_status_watch_ends_when_the_job_is_finished(cli: CliRunner, tmp_path: Path) -> None:
    run(cli, "submit", "add", write(tmp_path / "in.txt", "[1, 2]\n"), "--job", "w")
    run(cli, "cancel", "w")
    result = run(cli, "status", "w", "--watch", "--interval", "0.05", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout.splitlines()[-1])["cancelled"] == 1


def test_results_formats_hold_every_field(cli: CliRunner, tmp_path: Path) -> None:
    run(cli, "submit", "add", write(tmp_path / "in.txt", "[1, 2]\n[\"a\", {\"b\": [1]}]\n"), "--job", "f")
    jsonl = tmp_path / "out.jsonl"
    result = run(cli, "results", "f", "-o", str(jsonl))
    assert result.exit_code == 0 and "Wrote 2 results of job f" in result.stderr
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert set(rows[0]) == {"index", "task_id", "args", "state", "value", "worker", "attempts", "elapsed", "errors"}
    assert rows[1]["args"] == ["a", {"b": [1]}]
    out = run(cli, "results", "f", "--format", "csv").stdout
    parsed = list(csv.DictReader(io.StringIO(out)))
    assert [json.loads(r["args"]) for r in parsed] == [[1, 2], ["a", {"b": [1]}]]
    assert run(cli, "results", "f", "--format", "table", "-o", str(tmp_path / "x")).exit_code == 2


# ------------------------------------------------------------------------------ cancel / retry
def test_cancel_and_retry(cli: CliRunner, tmp_path: Path) -> None:
    run(cli, "submit", "add", write(tmp_path / "in.txt", "[1, 2]\n[3, 4]\n"), "--job", "c")
    result = run(cli, "cancel", "c")
    assert result.exit_code == 0 and "Cancelled 2 unfinished tasks of job c" in result.stdout
    assert "Nothing to cancel" in run(cli, "cancel", "c").stdout
    assert json.loads(run(cli, "status", "c", "--json").stdout)["state"] == "cancelled"
    assert json.loads(run(cli, "retry", "c", "--json").stdout) == {"job": "c", "retried": 0}
    assert "Nothing to retry" in run(cli, "retry", "c").stdout


# ------------------------------------------------------------------------------ workers / purge
def add_worker(db: str, name: str, state: WorkerState, lost_ago: float | None = None) -> None:
    """Given: a worker the coordinator registered earlier (as `serve` would have)."""
    store = Store.open(db)
    now = time.time()
    Worker.create(key=f"local/{name}", volunteer="local", name=name, state=state.value, host="lab-pc",
                  capacity=2, functions='["add", "sleep"]', first_seen=now - 100, last_seen=now - 5,
                  lost_at=None if lost_ago is None else now - lost_ago)  # fmt: skip
    store.close()


def test_workers_table_and_json(cli: CliRunner, db: str) -> None:
    Store.open(db).close()
    assert "No worker has been seen yet" in run(cli, "workers").stdout
    add_worker(db, "w1", WorkerState.ONLINE)
    add_worker(db, "w2", WorkerState.LOST, lost_ago=1)
    table = run(cli, "workers").stdout
    assert "local/w1" in table and "online" in table and "local/w2" in table and "lost" in table
    data = json.loads(run(cli, "workers", "--json").stdout)
    assert [(w["key"], w["state"], w["capacity"], w["in_flight"], w["functions"]) for w in data] == [
        ("local/w1", "online", 2, 0, ["add", "sleep"]), ("local/w2", "lost", 2, 0, ["add", "sleep"]),
    ]  # fmt: skip


def retained_presence(url: str, topic: str) -> bytes | None:
    """The retained message on `topic` right now (None when there is none).

    No guessing how long a retained message takes to come: after the SUBACK, a plain (not
    retained) marker is published on the same topic, and Mosquitto sends a subscriber the
    retained message before anything published later. The marker first means: none.
    """
    marker = b"not retained: end of the retained messages"
    with Watcher(url, topic) as watcher:
        client = connect_client(url)
        try:
            client.publish(topic, marker, qos=1).wait_for_publish(10)
        finally:
            client.disconnect()
            client.loop_stop()
        first = watcher.wait_for(lambda m: m.retain or m.payload == marker)
    return first.payload if first.retain else None


def test_purge_marks_lost_workers_purged_and_clears_their_retained_presence(
    cli: CliRunner, db: str, mosquitto: BrokerProcess
) -> None:
    # Given a lost worker whose will left a retained offline presence on the broker
    add_worker(db, "gone", WorkerState.LOST, lost_ago=60)
    add_worker(db, "alive", WorkerState.ONLINE)
    topics = Topics()
    will = Presence("gone", "local", PresenceState.OFFLINE, seq=7, reason=OfflineReason.LOST).encode()
    client = connect_client(mosquitto.url)
    client.publish(topics.presence(WorkerRef("local", "gone")), will, qos=1, retain=True).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()
    assert retained_presence(mosquitto.url, topics.presence(WorkerRef("local", "gone"))) == will
    # When the scientist purges now
    result = run(cli, "purge", "--broker", mosquitto.url)
    # Then the worker is purged in the store and its retained presence is gone
    assert result.exit_code == 0, result.output
    assert "Purged 1 lost worker: local/gone" in result.stdout and "Cleared their retained presence" in result.stdout
    states = {w["key"]: w["state"] for w in json.loads(run(cli, "workers", "--json").stdout)}
    assert states == {"local/gone": "purged", "local/alive": "online"}
    assert retained_presence(mosquitto.url, topics.presence(WorkerRef("local", "gone"))) is None
    assert "No lost worker to purge" in run(cli, "purge", "--broker", mosquitto.url).stdout


def test_purge_with_the_broker_down_purges_the_store_and_says_what_is_left(cli: CliRunner, db: str) -> None:
    add_worker(db, "gone", WorkerState.LOST, lost_ago=60)
    result = run(cli, "purge", "--broker", f"mqtt://127.0.0.1:{free_port()}", "--timeout", "0.5")
    assert result.exit_code == 5
    assert "Purged 1 lost worker: local/gone" in result.stdout
    assert "connection refused" in result.stderr
    assert "mosquitto_pub" in result.stderr and "dockercomp/workers/local/gone/presence" in result.stderr
    assert [w["state"] for w in json.loads(run(cli, "workers", "--json").stdout)] == ["purged"]


def test_a_bad_broker_url_is_a_usage_error(cli: CliRunner, db: str) -> None:
    Store.open(db).close()
    result = run(cli, "purge", "--broker", "http://example.org")
    assert result.exit_code == 2 and "mqtt://" in result.stderr


# ------------------------------------------------------------------------------ store problems
def test_a_locked_database_says_so(cli: CliRunner, db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dockercomp.coordinator.store

    monkeypatch.setattr(dockercomp.coordinator.store, "SQLITE_BUSY_TIMEOUT_MS", 100)
    Store.open(db).close()
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
    try:
        result = run(cli, "submit", "add", write(tmp_path / "in.txt", "[1, 2]\n"))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert result.exit_code == 4
    assert "locked" in result.stderr and "Traceback" not in result.output


def test_an_unusable_database_path_says_what_to_do(cli: CliRunner, tmp_path: Path) -> None:
    result = run(cli, "submit", "add", "--db", str(tmp_path / "no" / "such" / "dir" / "x.db"), input="[1]\n")
    assert result.exit_code == 4 and "does not exist" in result.stderr


@pytest.mark.parametrize("command", [["status"], ["status", "j"], ["workers"], ["results", "j"], ["show", "j", "0"],
                                     ["cancel", "j"], ["retry", "j"], ["delete", "j"], ["purge"],
                                     ["volunteers", "stats"], ["volunteers", "release", "mallory"]])
def test_only_submit_and_serve_create_a_database(cli: CliRunner, tmp_path: Path, db: str, command: list[str]) -> None:
    # Given no database where the command looks (here $DOCKERCOMP_DB; by default ./coordinator.db)
    result = run(cli, *command)
    # Then it fails naming the path and how to point at the right one, and creates nothing
    assert result.exit_code == 3, result.output
    assert f"no coordinator database at {db}" in result.stderr and "--db" in result.stderr
    assert "DOCKERCOMP_DB" in result.stderr
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ end to end
def coordinator_cli(*args: str, env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """The real `coordinator` command, as a separate process."""
    return subprocess.run([sys.executable, "-m", "dockercomp.coordinator", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO_ROOT)  # fmt: skip


def test_end_to_end_submit_watch_results_workers(
    cli: CliRunner, mosquitto: BrokerProcess, tmp_path: Path, db: str
) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "COLUMNS": "160",
           "DOCKERCOMP_DB": db, "DOCKERCOMP_BROKER": mosquitto.url}  # fmt: skip
    # Given jobs submitted by the real command before anything runs (durable on their own)
    lines = "".join(f"[{i}, {i * 10}]\n" for i in range(20))
    submitted = coordinator_cli("submit", "add", write(tmp_path / "pairs.txt", lines), "--job", "pairs", env=env)
    assert submitted.returncode == 0, submitted.stderr
    assert "Submitted job pairs (id 1): 20 tasks of add" in submitted.stdout
    broken = write(tmp_path / "broken.txt", "[1, 2]\n[\"a\", 1]\n")
    assert run(cli, "submit", "add", broken, "--job", "broken", "--max-attempts", "1").exit_code == 0
    # When the coordinator and two agents run
    processes = Processes(mosquitto.url, tmp_path / "logs")
    processes.serve(db, options=())
    for name in ("w1", "w2"):
        processes.agent(name)
    try:
        # Then `status --watch` follows the job to its end
        watched = coordinator_cli("status", "pairs", "--watch", "--interval", "0.1", "--json", env=env)
        assert watched.returncode == 0, watched.stderr
        assert json.loads(watched.stdout.splitlines()[-1])["done"] == 20
        # and the results carry each value and the worker that computed it
        out = tmp_path / "pairs.csv"
        fetched = coordinator_cli("results", "pairs", "-o", str(out), env=env)
        assert fetched.returncode == 0, fetched.stderr
        assert "Wrote 20 results of job pairs" in fetched.stderr
        rows = list(csv.DictReader(io.StringIO(out.read_text())))
        assert [json.loads(r["value"]) for r in rows] == [i + i * 10 for i in range(20)]
        assert {r["worker"] for r in rows} <= {"local/w1", "local/w2"}
        assert all(r["state"] == "done" and r["attempts"] == "1" and float(r["elapsed"]) >= 0 for r in rows)
        table = run(cli, "results", "pairs").stdout
        assert "Results of pairs (20 done, 0 failed, 20 tasks)" in table and "local/w" in table
        # and a task that raised is failed, with the reason
        watched_broken = run(cli, "status", "broken", "--watch", "--interval", "0.05", "--json")
        final = json.loads(watched_broken.stdout.splitlines()[-1])
        assert (final["failed"], final["state"]) == (1, "failed")  # the job says it ended with failures
        assert watched_broken.exit_code == 12  # Exit.JOB_FAILED: a script notices
        assert "failed" in run(cli, "status", "broken").stdout.splitlines()[0]
        # and the failed attempt's traceback can be read
        errors = run(cli, "results", "broken", "--errors")
        assert "Tasks with failed attempts of broken" in errors.stdout and "show broken INDEX" in errors.stdout
        assert [json.loads(line)["index"] for line in run(cli, "results", "broken", "--errors", "--json").stdout.splitlines()] == [1]
        shown = run(cli, "show", "broken", "1")
        assert shown.exit_code == 0 and "attempt 1 on local/w" in shown.stdout
        assert "Traceback (most recent call last)" in shown.stdout and "TypeError" in shown.stdout
        detail = json.loads(run(cli, "show", "broken", "1", "--json").stdout)
        assert "Traceback" in detail["attempt_list"][0]["error"]["traceback"]
        assert run(cli, "show", "broken", "7").exit_code == 3
        failed = [json.loads(line) for line in run(cli, "results", "broken", "--json").stdout.splitlines()]
        assert [r["state"] for r in failed] == ["done", "failed"]
        assert failed[1]["errors"][0]["type"] == "TypeError"
        assert failed[1]["errors"][0]["worker"] in ("local/w1", "local/w2")
        assert "TypeError" in run(cli, "results", "broken").stdout
        # and `workers` shows both online with the work they did
        workers = json.loads(run(cli, "workers", "--json").stdout)
        assert {w["key"]: w["state"] for w in workers} == {"local/w1": "online", "local/w2": "online"}
        assert sum(w["tasks_done"] for w in workers) == 21
        live = run(cli, "workers").stdout
        assert "local/w1" in live and "now" in live and "last known" not in live
        assert "not running" not in run(cli, "status").stdout
        processes.stop("serve")  # first, so the agents' goodbyes go unheard: "online" is last known
    finally:
        processes.stop_all()
    # When `serve` has stopped, `workers` and `status` say so and show the states as last known
    stopped = run(cli, "workers").stdout
    assert "The coordinator is not running: it stopped" in stopped
    assert "(last known)" in stopped and "online?" in stopped and " now" not in stopped, stopped
    assert "The coordinator is not running: it stopped" in run(cli, "status").stdout
    assert "Workers as last known:" in run(cli, "status").stdout


# ------------------------------------------------------------------------------ first use (issue 10)
def wait_online(cli: CliRunner) -> None:
    """Until `workers` shows a worker online (serve may not have created the database yet)."""
    def seen() -> bool:
        listed = run(cli, "workers", "--json")
        return listed.exit_code == 0 and any(w["state"] == "online" for w in json.loads(listed.stdout))

    wait_until(seen, timeout=90, interval=0.2)


def test_submit_warns_when_no_known_worker_offers_the_function(cli: CliRunner, db: str) -> None:
    Store.open(db).close()
    add_worker(db, "w1", WorkerState.ONLINE)  # offers add and sleep
    # When a job names a function no worker offers (a typo)
    result = run(cli, "submit", "count_prime", "-", "--job", "typo", input="[0, 100]\n")
    # Then it is stored, with a warning that names what the workers offer
    assert result.exit_code == 0 and "Submitted job typo" in result.stdout
    assert "warning: no known worker offers 'count_prime' (known workers offer: add, sleep)" in result.stderr
    # and `status` says why it does not move
    assert "Stalled: no online worker offers 'count_prime' (they offer: add, sleep)" in run(cli, "status", "typo").stdout
    assert "Stalled: job typo: no online worker offers 'count_prime'" in run(cli, "status").stdout
    # while a function a worker offers gets no warning
    assert "warning" not in run(cli, "submit", "add", "-", input="[1, 2]\n").stderr


def test_a_cancelled_job_never_shows_100_percent(cli: CliRunner) -> None:
    run(cli, "submit", "add", "-", "--job", "c", input="[1, 2]\n[3, 4]\n")
    run(cli, "cancel", "c")
    data = json.loads(run(cli, "status", "c", "--json").stdout)
    assert (data["state"], data["cancelled"], data["percent"]) == ("cancelled", 2, 0.0)
    assert "0/2 0%" in run(cli, "status", "c").stdout and "100%" not in run(cli, "status").stdout


def test_results_json_is_one_document_and_jsonl_one_object_per_line(cli: CliRunner, tmp_path: Path) -> None:
    run(cli, "submit", "add", "-", "--job", "f", input="[1, 2]\n[3, 4]\n")
    assert run(cli, "results", "f", "-o", str(tmp_path / "r.json")).exit_code == 0
    document = json.loads((tmp_path / "r.json").read_text())
    assert [row["args"] for row in document] == [[1, 2], [3, 4]]
    assert run(cli, "results", "f", "-o", str(tmp_path / "r.jsonl")).exit_code == 0
    lines = (tmp_path / "r.jsonl").read_text().splitlines()
    assert [json.loads(line)["args"] for line in lines] == [[1, 2], [3, 4]]
    assert json.loads(run(cli, "results", "f", "--format", "json").stdout)[1]["index"] == 1


def test_tables_are_not_cut_when_piped(cli: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")  # what a pipe used to get
    name = "a-rather-long-job-name-for-the-lab-notebook-2026-12-01"
    run(cli, "submit", "add", "-", "--job", name, input="[1, 2]\n")
    table = run(cli, "status").stdout
    assert name in table and "…" not in table
    assert max(len(line) for line in table.splitlines()) > 80


def test_delete_and_replace_a_job(cli: CliRunner, db: str) -> None:
    run(cli, "submit", "add", "-", "--job", "cell", input="[1, 2]\n")
    # a second submit under the same name is refused, unless it replaces the job
    assert run(cli, "submit", "add", "-", "--job", "cell", input="[3, 4]\n").exit_code == 2
    bad = run(cli, "submit", "add", "-", "--job", "cell", "--replace", input="[3, 4]\n\"x\"\n")
    assert bad.exit_code == 2 and "line 2" in bad.stderr
    assert [json.loads(line)["args"] for line in run(cli, "results", "cell", "--json").stdout.splitlines()] == [[1, 2]]
    replaced = run(cli, "submit", "add", "-", "--job", "cell", "--replace", "--json", input="[3, 4]\n[5, 6]\n")
    assert replaced.exit_code == 0 and json.loads(replaced.stdout)["tasks"] == 2
    assert job_names(cli) == ["cell"]
    # delete removes it with its results
    deleted = run(cli, "delete", "cell")
    assert deleted.exit_code == 0 and "Deleted job cell" in deleted.stdout and "2 tasks" in deleted.stdout
    assert job_names(cli) == [] and run(cli, "delete", "cell").exit_code == 3
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM task").fetchone() == (0,)


def test_a_job_held_by_a_worker_is_not_deleted(cli: CliRunner, db: str) -> None:
    run(cli, "submit", "add", "-", "--job", "busy", input="[1, 2]\n")
    add_worker(db, "w1", WorkerState.ONLINE)
    store = Store.open(db)
    task_id = next(store.results(store.get_job("busy"))).task_id
    store.open_attempts([(task_id, 1, 1, time.time() + 60, "nonce")], time.time())
    store.close()
    result = run(cli, "delete", "busy")
    assert result.exit_code == 2 and "still has 1 task(s) on workers" in result.stderr
    assert "cancel" in result.stderr and job_names(cli) == ["busy"]


@pytest.mark.timeout(180)
def test_running_and_queued_are_shown_apart(cli: CliRunner, mosquitto: BrokerProcess, tmp_path: Path, db: str) -> None:
    # Given one agent running 1 task at a time with room for 3 more in its queue
    processes = Processes(mosquitto.url, tmp_path / "logs")
    processes.serve(db, options=())
    processes.agent("solo", concurrency=1, prefetch=3)
    try:
        wait_online(cli)
        # When it is handed 6 slow tasks (slow enough that none ends before we look)
        run(cli, "submit", "sleep", "-", "--job", "slow", "--timeout", "300", input="[60]\n" * 6)
        data = wait_until(lambda: (d := json.loads(run(cli, "status", "slow", "--json").stdout))["assigned"] == 4
                          and d, timeout=90, interval=0.1)
        # Then one runs and three wait in its queue
        assert (data["running"], data["queued"], data["pending"]) == (1, 3, 2)
        assert "running 1 · queued 3 · pending 2" in run(cli, "status", "slow").stdout
        [worker] = json.loads(run(cli, "workers", "--json").stdout)
        assert (worker["in_flight"], worker["running"], worker["queued"]) == (4, 1, 3)
        run(cli, "cancel", "slow")
    finally:
        processes.stop_all()


def test_serve_fails_a_job_no_worker_can_run_with_the_reason(
    cli: CliRunner, mosquitto: BrokerProcess, tmp_path: Path, db: str
) -> None:
    # Given `serve --fail-unroutable 1` and one agent online, which offers add but not count_prime
    processes = Processes(mosquitto.url, tmp_path / "logs")
    processes.serve(db, options=("--fail-unroutable", "1"))
    processes.agent("w1")
    try:
        wait_online(cli)
        run(cli, "submit", "count_prime", "-", "--job", "typo", input="[0, 100]\n[100, 200]\n")
        run(cli, "submit", "add", "-", "--job", "fine", input="[1, 2]\n")
        # When its function stays unoffered for a second, its tasks fail and the watch says so
        watched = run(cli, "status", "typo", "--watch", "--interval", "0.1", "--json")
        assert watched.exit_code == 12
        assert json.loads(watched.stdout.splitlines()[-1])["failed"] == 2
        rows = [json.loads(line) for line in run(cli, "results", "typo", "--json").stdout.splitlines()]
        assert [r["errors"][-1]["message"] for r in rows] == ["no online worker offers 'count_prime'"] * 2
        assert "Unroutable: no online worker offers" in run(cli, "results", "typo").stdout
        shown = run(cli, "show", "typo", "0").stdout
        assert "Never sent to a worker." in shown and "Unroutable: no online worker offers 'count_prime'" in shown
        # while a job a worker can run is not touched
        assert run(cli, "status", "fine", "--watch", "--interval", "0.1").exit_code == 0
    finally:
        processes.stop_all()


def test_with_the_broker_down_worker_states_are_last_known(
    cli: CliRunner, mosquitto: BrokerProcess, tmp_path: Path, db: str
) -> None:
    # Given `serve` and an agent on a broker
    processes = Processes(mosquitto.url, tmp_path / "logs")
    processes.serve(db, options=())
    processes.agent("w1")
    try:
        wait_online(cli)
        assert "last known" not in run(cli, "workers").stdout
        # When the broker dies (no will fires: the store keeps the agent online; serve keeps
        # running and says in its heartbeat that it is cut off)
        mosquitto.kill()
        shown = wait_until(lambda: "not connected to its broker" in (out := run(cli, "workers").stdout) and out,
                           timeout=30, interval=0.2)
        # Then `workers` no longer claims the agent is online now
        assert "online?" in shown and "(last known)" in shown and mosquitto.url in shown, shown
        assert "not connected to its broker" in run(cli, "status").stdout
    finally:
        processes.stop_all()
