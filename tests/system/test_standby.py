"""A standby coordinator (issue 15): two `dockercomp coordinator serve` processes on one real
PostgreSQL database, real Mosquitto, real agent processes. One is active, the other waits and
writes nothing; kill -9 or freeze (SIGSTOP) the active one mid-job and the standby takes over
with nothing lost or counted twice; a frozen one that wakes (SIGCONT) steps down without
writing anything; the retained coordinator presence names the active one throughout.

Who wrote what is told by PostgreSQL itself: each `serve` connects with its own
application_name (libpq's $PGAPPNAME), and a row trigger on every table records the writer of
each row inserted, updated or deleted. A trigger sees only committed work (its own rows roll
back with the transaction), which is exactly what "wrote nothing" means.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dockercomp.broker.messages import decode_status
from dockercomp.broker.topics import Topics
from dockercomp.coordinator.store import JobRow, Store
from tests.support import Watcher, wait_until
from tests.support.brokers import BrokerProcess
from tests.support.processes import FAST_SERVE, Processes, finished, online

pytestmark = pytest.mark.timeout(240)

TOPICS = Topics()
TASKS = 240
# Issue 15: the standby is active within 10 s of the active one's death.
TAKEOVER_BOUND = 10.0

_AUDIT = """
CREATE TABLE write_audit (id BIGSERIAL PRIMARY KEY, app TEXT NOT NULL, tab TEXT NOT NULL, op TEXT NOT NULL);
CREATE FUNCTION audit_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO write_audit (app, tab, op) VALUES (current_setting('application_name'), TG_TABLE_NAME, TG_OP);
    RETURN NULL;
END $$;
"""


@pytest.fixture
def store(postgres_db: str) -> Iterator[Store]:
    """The coordinator's database, every table of it audited (who wrote each row)."""
    opened = Store.open(postgres_db)
    opened.bind()
    db = opened.db  # type: ignore[attr-defined]
    db.execute_sql(_AUDIT)
    tables = [name for (name,) in db.execute_sql(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' "
        "AND table_type = 'BASE TABLE' AND table_name <> 'write_audit'").fetchall()]
    assert {"task", "attempt", "result", "worker", "heartbeat"} <= set(tables)  # and the lead, from issue 15 on
    for table in tables:
        db.execute_sql(f'CREATE TRIGGER audit_{table} AFTER INSERT OR UPDATE OR DELETE ON "{table}" '
                       "FOR EACH ROW EXECUTE FUNCTION audit_write()")
    yield opened
    opened.close()


@pytest.fixture
def procs(mosquitto: BrokerProcess, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Processes]:
    running = Processes(mosquitto.url, tmp_path / "logs")
    yield running
    for process in running.running.values():  # a frozen one cannot hear SIGTERM
        process.send_signal(signal.SIGCONT)
    running.stop_all()
    if getattr(getattr(request.node, "report_call", None), "failed", False):
        print(running.log())


def serve(procs: Processes, db: str, name: str) -> subprocess.Popen[bytes]:
    """`coordinator serve` connecting to PostgreSQL as application `name`."""
    return procs.start(name, ["dockercomp.coordinator", "serve", "--broker", procs.broker_url or "", "--db", db,
                              *FAST_SERVE], env={"PGAPPNAME": name})


def writes(store: Store, app: str) -> int:
    """Rows `app` inserted, updated or deleted (committed)."""
    return int(store.db.execute_sql("SELECT count(*) FROM write_audit WHERE app = %s",  # type: ignore[attr-defined]
                                    (app,)).fetchone()[0])


def retained_presence(url: str) -> dict[str, Any]:
    with Watcher(url, TOPICS.coordinator_presence) as watcher:
        watcher.wait_count(1, timeout=5)
        return decode_status(watcher.messages[0].payload)


def presence_names(url: str, pid: int) -> bool:
    seen = retained_presence(url)
    return seen.get("state") == "online" and seen.get("pid") == pid


def active_pid(store: Store) -> int | None:
    lead = store.lead()
    return lead.pid if lead is not None and not lead.expired else None


def connected(store: Store, app: str) -> bool:
    """Whether `app` has a session on the database (it opened the store)."""
    return bool(store.db.execute_sql(  # type: ignore[attr-defined]
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app,)).fetchone()[0])


def start_pair(procs: Processes, store: Store, url: str, db: str) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]:
    """serve-a active (its presence retained), then serve-b on the same database. (Nothing
    here needs the standby's code: on the code before it, both dispatched from here on.)"""
    first = serve(procs, db, "serve-a")
    wait_until(lambda: presence_names(url, first.pid), timeout=30)
    second = serve(procs, db, "serve-b")
    wait_until(lambda: connected(store, "serve-b"), timeout=30)
    return first, second


def start_job(procs: Processes, store: Store) -> JobRow:
    for name in ("w0", "w1", "w2"):
        procs.agent(name, concurrency=2)
    online(store, 3)
    job = store.create_job("sleep", [[0.05 + i / 1e6] for i in range(TASKS)], timeout=30)
    wait_until(lambda: store.progress(job).done >= TASKS // 5, timeout=60)
    return job


def nothing_lost_or_counted_twice(store: Store, job: JobRow) -> None:
    progress = finished(store, job, timeout=90)
    assert (progress.done, progress.failed) == (TASKS, 0)
    assert [r.value for r in store.results(job)] == [0.05 + i / 1e6 for i in range(TASKS)]
    db = store.db  # type: ignore[attr-defined]
    per_task = db.execute_sql(
        "SELECT t.id, t.attempts, (SELECT count(*) FROM result r WHERE r.task_id = t.id),"
        " (SELECT count(*) FROM attempt a WHERE a.task_id = t.id AND a.outcome = 'ok'),"
        " (SELECT count(*) FROM attempt a WHERE a.task_id = t.id),"
        " (SELECT coalesce(max(a.number), 0) FROM attempt a WHERE a.task_id = t.id)"
        " FROM task t WHERE t.job_id = %s", (job.id,)).fetchall()
    assert len(per_task) == TASKS
    # One accepted result and one ok attempt per task; the attempt counter counts each attempt once.
    assert all(results == 1 and ok == 1 for _, _, results, ok, _, _ in per_task), per_task
    assert all(counter == rows == highest for _, counter, _, _, rows, highest in per_task), per_task
    assert sum(w.tasks_done for w in store.workers()) == TASKS


@pytest.mark.postgres
@pytest.mark.parametrize("host", ["same host", "another host"])
def test_kill_9_of_the_active_coordinator_mid_job_the_standby_takes_over(
        store: Store, procs: Processes, mosquitto: BrokerProcess, postgres_db: str, host: str) -> None:
    first, second = start_pair(procs, store, mosquitto.url, postgres_db)
    if host == "another host":
        # As if serve-a ran elsewhere: the standby cannot see its process die, and must wait
        # for its lease to run out (the active one's renewals never rewrite the host).
        store.db.execute_sql("UPDATE coordinator_lead SET host = 'elsewhere'")  # type: ignore[attr-defined]
    job = start_job(procs, store)
    # The standby never wrote a row while the active one ran the job (two engines would both dispatch).
    assert writes(store, "serve-a") > 0
    assert writes(store, "serve-b") == 0
    assert active_pid(store) == first.pid and "standby: coordinator" in procs.log("serve-b")

    procs.kill("serve-a")
    killed = time.monotonic()
    # Mid-job: tasks pending, and attempts the dead one opened that its successor must close.
    assert store.progress(job).done < TASKS and sum(store.inflight().values()) > 0
    wait_until(lambda: active_pid(store) == second.pid, timeout=TAKEOVER_BOUND)
    wait_until(lambda: presence_names(mosquitto.url, second.pid),
               timeout=max(1.0, TAKEOVER_BOUND - (time.monotonic() - killed)))
    print(f"kill -9 ({host}): the standby's presence was retained {time.monotonic() - killed:.1f} s later")

    nothing_lost_or_counted_twice(store, job)
    assert store.lead().epoch == 2  # type: ignore[union-attr]
    assert presence_names(mosquitto.url, second.pid)
    assert "Active coordinator: pid %d" % second.pid in procs.cli("workers", "--db", postgres_db)


@pytest.mark.postgres
def test_a_frozen_active_coordinator_is_replaced_and_steps_down_without_writing_when_it_wakes(
        store: Store, procs: Processes, mosquitto: BrokerProcess, postgres_db: str) -> None:
    first, second = start_pair(procs, store, mosquitto.url, postgres_db)
    job = start_job(procs, store)
    assert writes(store, "serve-b") == 0

    assert active_pid(store) == first.pid and "standby: coordinator" in procs.log("serve-b")

    first.send_signal(signal.SIGSTOP)  # a network-style freeze: its connections stay open
    frozen_at = time.monotonic()
    # Its process still exists: the standby waits for the lease to run out (5 s), as on another host.
    wait_until(lambda: active_pid(store) == second.pid, timeout=TAKEOVER_BOUND)
    nothing_lost_or_counted_twice(store, job)
    # The active one puts its own presence back over the frozen one's retained "online". Both
    # use the root's one client id, so the broker closed the frozen one's connection when the
    # standby took its session over; should a will of the frozen one still come (keepalive
    # 10 s x 1.5), the active one puts its presence back again: past that, it still names it.
    wait_until(lambda: presence_names(mosquitto.url, second.pid), timeout=10)
    time.sleep(max(0.0, 16 - (time.monotonic() - frozen_at)))
    wait_until(lambda: presence_names(mosquitto.url, second.pid), timeout=10)
    before = writes(store, "serve-a")

    first.send_signal(signal.SIGCONT)
    wait_until(lambda: "stepping down without writing anything" in procs.log("serve-a"), timeout=30)
    # It starts over as the standby (same pid), and says who is active.
    wait_until(lambda: f"(pid {second.pid} on" in procs.log("serve-a").split("stepping down")[-1], timeout=30)
    time.sleep(2)  # room for a late write to show

    assert first.poll() is None
    assert writes(store, "serve-a") == before
    assert active_pid(store) == second.pid
    assert presence_names(mosquitto.url, second.pid)
    # Still a working pair: more work goes through the active one.
    more = store.create_job("sleep", [[0.01]] * 20, timeout=30)
    assert finished(store, more, timeout=60).done == 20
    assert writes(store, "serve-a") == before


def test_on_sqlite_a_second_serve_waits_and_takes_over_when_the_first_stops(
        procs: Processes, mosquitto: BrokerProcess, tmp_path: Path) -> None:
    # One machine, one SQLite file: before the standby, both dispatched (each job's tasks could
    # be sent twice). Now the second one waits, writing nothing, until the first stops.
    db = str(tmp_path / "lab.db")
    first = serve(procs, db, "serve-a")
    wait_until(lambda: presence_names(mosquitto.url, first.pid), timeout=30)
    store = Store.open(db)
    second = serve(procs, db, "serve-b")
    wait_until(lambda: "standby: coordinator" in procs.log("serve-b"), timeout=30)
    assert f"(pid {first.pid} on" in procs.log("serve-b")
    time.sleep(2.5)  # more than a heartbeat interval: a second engine would have written its own
    assert store.heartbeat().pid == first.pid  # type: ignore[union-attr]
    assert retained_presence(mosquitto.url)["pid"] == first.pid

    procs.stop("serve-a")  # a clean stop hands over at once: no lease to wait out

    wait_until(lambda: presence_names(mosquitto.url, second.pid), timeout=TAKEOVER_BOUND)
    assert store.lead().epoch == 2 and store.lead().pid == second.pid  # type: ignore[union-attr]
    procs.agent("w0")
    job = store.create_job("sleep", [[0.01]] * 10, timeout=30)
    assert finished(store, job, timeout=60).done == 10

