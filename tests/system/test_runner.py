"""The task process pool: real processes that return, raise, hang, crash and segfault. The task
functions it runs (registry, built-ins) are unit-tested in tests/unit/test_agent_tasks.py."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dockercomp.agent.runner import (
    CRASH_ERROR,
    RESULT_ERROR,
    SHUTDOWN_ERROR,
    TIMEOUT_ERROR,
    TOO_LARGE_ERROR,
    Finished,
    Job,
    Runner,
)
from dockercomp.agent.tasks import BUILTINS
from dockercomp.broker.messages import Outcome
from tests.support import wait_until

pytestmark = pytest.mark.timeout(60)

# Misbehaving task functions, written to a module the task processes import.
BAD_TASKS = textwrap.dedent('''
    import ctypes, os, time

    def divide(a, b):
        return a / b

    def exit_hard(code):
        os._exit(code)

    def segfault():
        ctypes.string_at(0)

    def returns_a_set():
        return {1, 2}

    def returns_too_much():
        return "x" * 300_000
    def returns_almost_too_much():
        return ["y" * 250_000, "z"]  # under MAX_PAYLOAD_BYTES; more than a socket buffer takes at once

    def pid():
        return os.getpid()

    def nap_then_pid(seconds):
        time.sleep(seconds)
        return os.getpid()

    def nap_span(seconds):
        # CLOCK_MONOTONIC is one clock for every process on the machine: spans compare.
        started = time.monotonic()
        time.sleep(seconds)
        return [os.getpid(), started, time.monotonic()]

    def mark_then_nap(path, seconds):
        open(path, "w").close()
        time.sleep(seconds)
        return path
''')


@pytest.fixture
def targets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    (tmp_path / "badtasks.py").write_text(BAD_TASKS)
    monkeypatch.syspath_prepend(str(tmp_path))  # spawn hands sys.path to the task processes
    names = ["divide", "exit_hard", "segfault", "returns_a_set", "returns_too_much", "returns_almost_too_much", "pid", "nap_then_pid",
             "mark_then_nap", "nap_span"]
    return {**BUILTINS, **{name: f"badtasks:{name}" for name in names}}


@pytest.fixture(params=[0, 2], ids=["no-prefetch", "prefetch-2"])
def runner(request: pytest.FixtureRequest, targets: dict[str, str]) -> Iterator[Runner]:
    """Two processes; every behaviour holds whether or not each process is sent tasks ahead."""
    pool = Runner(targets, concurrency=2, prefetch=request.param)
    pool.start()
    yield pool
    pool.stop()


def run_all(runner: Runner, *jobs: Job, timeout: float = 20.0) -> dict[object, Finished]:
    """Submit jobs, poll until each has finished; results by job key."""
    for job in jobs:
        runner.submit(job)
    done: dict[object, Finished] = {}
    deadline = time.monotonic() + timeout
    while len(done) < len(jobs):
        assert time.monotonic() < deadline, f"only {sorted(map(str, done))} of {len(jobs)} finished"
        for finished in runner.poll(0.2):
            done[finished.key] = finished
    return done


def test_a_function_result_comes_back_with_its_elapsed_time(runner: Runner) -> None:
    done = run_all(runner, Job("a", "add", [2, 3]), Job("p", "count_primes", [0, 100_000]))
    assert done["a"].outcome is Outcome.OK and done["a"].value == 5
    assert done["p"].value == 9592
    assert 0 <= done["a"].elapsed < 5


def test_an_exception_becomes_an_error_with_type_message_and_traceback(runner: Runner) -> None:
    error = run_all(runner, Job("e", "divide", [1, 0]))["e"]
    assert error.outcome is Outcome.ERROR
    assert error.error is not None
    assert error.error.type == "ZeroDivisionError"
    assert error.error.message == "division by zero"
    assert "in divide" in error.error.traceback and "return a / b" in error.error.traceback
    assert "_child_main" not in error.error.traceback  # the scientist's frames only


def test_a_task_past_its_time_limit_is_killed_and_the_pool_goes_on(runner: Runner) -> None:
    started = time.monotonic()
    done = run_all(runner, Job("slow", "sleep", [30], timeout=0.5))
    assert time.monotonic() - started < 5
    assert done["slow"].outcome is Outcome.TIMEOUT
    assert done["slow"].error is not None and done["slow"].error.type == TIMEOUT_ERROR
    assert "0.5 s" in done["slow"].error.message
    assert 0.5 <= done["slow"].elapsed < 2
    # Both slots work afterwards.
    after = run_all(runner, Job(1, "add", [1, 1]), Job(2, "add", [2, 2]))
    assert [after[1].value, after[2].value] == [2, 4]


@pytest.mark.parametrize("job, how", [
    (Job("x", "exit_hard", [3]), "exited with code 3"),
    (Job("x", "segfault", []), "killed by signal SIGSEGV"),
])
def test_a_task_that_kills_its_process_is_reported_crashed_and_replaced(runner: Runner, job: Job, how: str) -> None:
    old = set(runner.pids())
    crashed = run_all(runner, job)["x"]
    assert crashed.outcome is Outcome.CRASHED
    assert crashed.error is not None and crashed.error.type == CRASH_ERROR and how in crashed.error.message
    after = run_all(runner, *(Job(i, "add", [i, 1]) for i in range(4)))
    assert [after[i].value for i in range(4)] == [1, 2, 3, 4]
    assert runner.crashes == 1
    assert set(runner.pids()) != old and len(runner.pids()) == 2


def test_every_task_of_a_crash_storm_is_answered(runner: Runner) -> None:
    jobs = [Job(i, "exit_hard" if i % 2 else "add", [1] if i % 2 else [i, 0]) for i in range(10)]
    done = run_all(runner, *jobs)
    assert [done[i].outcome for i in range(10)] == [Outcome.OK, Outcome.CRASHED] * 5
    assert [done[i].value for i in range(0, 10, 2)] == [0, 2, 4, 6, 8]


def test_results_that_cannot_be_sent_are_errors(runner: Runner) -> None:
    done = run_all(runner, Job("set", "returns_a_set"), Job("big", "returns_too_much"))
    assert done["set"].outcome is Outcome.ERROR and done["set"].error.type == RESULT_ERROR  # type: ignore[union-attr]
    assert "set" in done["set"].error.message  # type: ignore[union-attr]
    assert done["big"].outcome is Outcome.ERROR and done["big"].error.type == TOO_LARGE_ERROR  # type: ignore[union-attr]


def test_a_result_near_the_size_limit_comes_back_whole_among_small_ones(runner: Runner) -> None:
    # The process writes its replies itself (process._sender): one bigger than the socket's
    # buffer goes out in several writes, and the replies around it stay whole and in order.
    done = run_all(runner, Job("a", "add", [1, 2]), Job("big", "returns_almost_too_much"), Job("b", "add", [3, 4]),
                   Job("c", "add", [5, 6]))
    assert done["big"].outcome is Outcome.OK and done["big"].value == ["y" * 250_000, "z"]
    assert [done[k].value for k in "abc"] == [3, 7, 11]


def test_tasks_run_in_parallel_up_to_the_concurrency_and_queue_beyond(runner: Runner) -> None:
    wait_until(lambda: runner.poll(0.05) == [] and runner.ready_processes == 2, timeout=30)
    done = run_all(runner, *(Job(i, "nap_span", [1.0]) for i in range(4)))
    spans = [done[i].value for i in range(4)]
    # Judged by when each task ran, not by the total time (which a busy machine stretches):
    # two at a time, never more, never fewer (not four in a row nor four at once).
    most_at_once = max(sum(start <= at < end for _, start, end in spans) for _, at, _ in spans)
    assert most_at_once == 2, spans
    assert len({pid for pid, _, _ in spans}) == 2  # the same two long-lived processes


def test_the_time_limit_does_not_include_starting_the_process(targets: dict[str, str]) -> None:
    pool = Runner(targets, concurrency=1)
    pool.start()  # spawning and importing takes longer than this task's whole limit
    try:
        # noop, not a short sleep: the whole 0.1 s is slack for a busy machine to deliver it in.
        done = run_all(pool, Job("quick", "noop", [], timeout=0.1))
    finally:
        pool.stop()
    assert done["quick"].outcome is Outcome.OK


def test_many_tiny_tasks_are_cheap(runner: Runner) -> None:
    run_all(runner, Job("warm", "noop"))
    started = time.monotonic()
    done = run_all(runner, *(Job(i, "noop") for i in range(2000)))
    rate = len(done) / (time.monotonic() - started)
    assert all(f.outcome is Outcome.OK for f in done.values())
    assert rate > 1000, f"only {rate:.0f} tasks/s"


def test_a_poll_names_the_wake_up_descriptors_that_were_readable(runner: Runner) -> None:
    """The agent reads only those (a read that finds nothing is a system call for nothing)."""
    quiet_r, quiet_w = os.pipe()
    loud_r, loud_w = os.pipe()
    try:
        run_all(runner, Job("warm", "noop"))
        os.write(loud_w, b"x")
        assert runner.poll(1.0, wake=(quiet_r, loud_r)) == [] and runner.woken == [loud_r]
        os.read(loud_r, 1)
        runner.submit(Job("answer", "noop"))
        finished = wait_until(lambda: runner.poll(0.5, wake=(quiet_r, loud_r)))
        assert [f.key for f in finished] == ["answer"] and runner.woken == []  # a task's answer wakes no one else
    finally:
        runner.poll(0.0)  # unwatched before they close
        for fd in (quiet_r, quiet_w, loud_r, loud_w):
            os.close(fd)


def test_ctrl_c_in_the_terminal_does_not_kill_running_tasks(runner: Runner) -> None:
    runner.submit(Job("nap", "nap_then_pid", [0.5]))
    wait_until(lambda: runner.poll(0.05) == [] and runner.running == ["nap"])
    for pid in runner.pids():
        os.kill(pid, signal.SIGINT)  # what a terminal's Ctrl-C sends the whole process group
    finished = wait_until(lambda: runner.poll(0.1))
    assert finished[0].key == "nap" and finished[0].outcome is Outcome.OK


def test_draining_helpers_drop_queued_and_kill_running(runner: Runner) -> None:
    for i in range(4):
        runner.submit(Job(i, "sleep", [30]))
    wait_until(lambda: runner.poll(0.05) == [] and len(runner.running) == 2)
    assert [job.key for job in runner.drop_queued()] == [2, 3]
    killed = runner.kill_running("grace period over")
    assert sorted(f.key for f in killed) == [0, 1]  # type: ignore[type-var]
    assert all(f.outcome is Outcome.RELEASED and f.error.type == SHUTDOWN_ERROR for f in killed)  # type: ignore[union-attr]
    assert runner.pids() == []


# --- tasks sent ahead to a busy process (prefetch) ------------------------------------------------------


@pytest.fixture
def one_process(targets: dict[str, str]) -> Iterator[Runner]:
    """One process that may hold three tasks beyond the one it runs."""
    pool = Runner(targets, concurrency=1, prefetch=3)
    pool.start()
    wait_until(lambda: pool.poll(0.05) == [] and pool.ready_processes == 1, timeout=30)
    yield pool
    pool.stop()


def test_a_task_sent_ahead_gets_its_whole_time_limit_from_when_it_starts(one_process: Runner) -> None:
    # Each waits ~0.3 s behind the one before; a limit counted from sending would kill them.
    jobs = [Job(i, "nap_then_pid", [0.3], timeout=0.6) for i in range(4)]
    done = run_all(one_process, *jobs)
    assert [done[i].outcome for i in range(4)] == [Outcome.OK] * 4
    assert len({done[i].value for i in range(4)}) == 1  # all ran in the one process, none restarted


def test_a_timeout_is_charged_to_the_running_task_and_those_behind_it_run_again(one_process: Runner) -> None:
    old = one_process.pids()
    done = run_all(one_process, Job("slow", "sleep", [30], timeout=0.5), Job("a", "add", [1, 2]), Job("p", "pid"))
    assert done["slow"].outcome is Outcome.TIMEOUT and done["slow"].error.type == TIMEOUT_ERROR  # type: ignore[union-attr]
    assert (done["a"].outcome, done["a"].value) == (Outcome.OK, 3)
    assert done["p"].value not in old  # in the replacement process: the killed one never ran it


def test_a_crash_is_charged_to_the_running_task_and_those_behind_it_run_again(one_process: Runner) -> None:
    done = run_all(one_process, Job("first", "add", [1, 1]), Job("boom", "exit_hard", [5]),
                   *(Job(i, "add", [i, 10]) for i in range(3)))
    assert done["first"].value == 2
    crashed = done["boom"]
    assert crashed.outcome is Outcome.CRASHED and "exited with code 5" in crashed.error.message  # type: ignore[union-attr]
    assert [(done[i].outcome, done[i].value) for i in range(3)] == [(Outcome.OK, i + 10) for i in range(3)]
    assert one_process.crashes == 1


def test_draining_takes_back_tasks_sent_ahead_and_they_never_run(one_process: Runner) -> None:
    one_process.submit(Job("nap", "nap_then_pid", [0.5]))
    for i in range(3):  # a task that ran anyway would be reported (and answered by the agent)
        one_process.submit(Job(i, "add", [i, 1]))
    wait_until(lambda: one_process.poll(0.05) == [] and one_process.running == ["nap"])
    assert one_process.queued == 3

    dropped = one_process.drop_queued()
    assert [job.key for job in dropped] == [0, 1, 2]
    finished: list[Finished] = []
    wait_until(lambda: finished.extend(one_process.poll(0.1)) or one_process.idle, timeout=10)
    assert [f.key for f in finished] == ["nap"]
    # The same process goes on taking work: nothing new is skipped.
    assert run_all(one_process, Job("after", "add", [2, 2]))["after"].value == 4
    assert one_process.crashes == 0


def test_a_task_taken_back_after_it_started_is_still_answered(one_process: Runner, tmp_path: Path) -> None:
    mark = str(tmp_path / "second started")
    one_process.submit(Job("first", "nap_then_pid", [0.3]))
    one_process.submit(Job("second", "mark_then_nap", [mark, 0.3]))
    wait_until(lambda: one_process.poll(0.05) == [] and one_process.running == ["first"])
    # The agent does not look while the process finishes the first task and starts the second.
    wait_until(lambda: os.path.exists(mark))

    assert [job.key for job in one_process.drop_queued()] == ["second"]  # it looks queued from here
    finished: list[Finished] = []
    wait_until(lambda: finished.extend(one_process.poll(0.1)) or one_process.idle, timeout=10)
    assert [(f.key, f.outcome) for f in finished] == [("first", Outcome.OK), ("second", Outcome.OK)]


def test_a_big_task_waits_in_the_agent_rather_than_block_it_behind_a_busy_process(targets: dict[str, str]) -> None:
    pool = Runner(targets, concurrency=1, prefetch=3, send_ahead_bytes=64 * 1024)
    pool.start()
    try:
        pool.submit(Job("nap", "nap_then_pid", [1.0]))
        wait_until(lambda: pool.poll(0.05) == [] and pool.running == ["nap"], timeout=30)
        big = "x" * 1_000_000  # more than a socket holds: writing it ahead would block until the nap ends
        for i in range(3):
            pool.submit(Job(i, "sha256", [big]))
        started = time.monotonic()
        assert pool.poll(0.05) == []
        assert time.monotonic() - started < 0.5  # the loop stays responsive while the nap runs
        done: dict[object, Finished] = {}
        wait_until(lambda: done.update({f.key: f for f in pool.poll(0.2)}) or len(done) == 4, timeout=20)
    finally:
        pool.stop()
    assert all(f.outcome is Outcome.OK for f in done.values())
    assert done[0].value == hashlib.sha256(big.encode()).hexdigest()


def test_tasks_are_spread_over_the_processes_before_any_is_sent_ahead(targets: dict[str, str]) -> None:
    pool = Runner(targets, concurrency=2, prefetch=4)
    pool.start()
    try:
        wait_until(lambda: pool.poll(0.05) == [] and pool.ready_processes == 2, timeout=30)
        done = run_all(pool, *(Job(i, "nap_then_pid", [0.2]) for i in range(4)))
    finally:
        pool.stop()
    pids = [done[i].value for i in range(4)]
    assert len(set(pids)) == 2 and pids.count(pids[0]) == 2


def test_many_tiny_tasks_sent_ahead_are_each_answered_once_and_cheaply(targets: dict[str, str]) -> None:
    pool = Runner(targets, concurrency=2, prefetch=8)
    pool.start()
    try:
        run_all(pool, Job("warm", "noop"))
        for i in range(4000):
            pool.submit(Job(i, "add", [i, 1]))
        started = time.monotonic()
        answers: list[Finished] = []
        while len(answers) < 4000 and time.monotonic() - started < 20:
            answers.extend(pool.poll(0.2))
        rate = len(answers) / (time.monotonic() - started)
        answers.extend(pool.poll(0.1))  # nothing more may come
    finally:
        pool.stop()
    assert sorted((f.key, f.value) for f in answers) == [(i, i + 1) for i in range(4000)]  # type: ignore[type-var]
    assert rate > 1000, f"only {rate:.0f} tasks/s"


def test_plain_fork_is_refused() -> None:
    with pytest.raises(ValueError, match="fork"):
        Runner(BUILTINS, 1, start_method="fork")


def test_task_processes_die_with_a_killed_agent(tmp_path: Path) -> None:
    script = textwrap.dedent('''
        import sys, time
        from dockercomp.agent.runner import Runner, Job
        from dockercomp.agent.tasks import BUILTINS
        if __name__ == "__main__":
            pool = Runner(BUILTINS, 2)
            pool.start()
            pool.submit(Job(1, "sleep", [60], timeout=120))
            while not pool.running:
                pool.poll(0.05)
            print(*pool.pids(), flush=True)
            time.sleep(60)
    ''')
    (tmp_path / "agent_like.py").write_text(script)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]), *sys.path]))
    process = subprocess.Popen([sys.executable, str(tmp_path / "agent_like.py")], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stdout is not None
        pids = [int(p) for p in process.stdout.readline().split()]
        assert len(pids) == 2
        process.kill()  # kill -9: no cleanup code runs in the parent
        process.wait()

        def gone(pid: int) -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            # A zombie waiting for init to reap it is gone too.
            return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"

        wait_until(lambda: all(gone(pid) for pid in pids), timeout=5)
    finally:
        process.kill()
        process.wait()
