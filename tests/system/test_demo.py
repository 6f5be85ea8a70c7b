"""`make demo` end to end: embedded broker, real coordinator and agent processes, a PNG.

Each run is tagged with DOCKERCOMP_DEMO_RUN in its environment, inherited by every process it
starts (and theirs), so "no process left behind" is checked by looking for that tag in /proc.
"""

from __future__ import annotations

import json
import os
import re
import signal
import urllib.request
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from PIL import Image

from dockercomp.coordinator.api import Client
from dockercomp.demo.run import RUN_ID_ENV
from tests.support import REPO_ROOT, wait_until

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]
# Seconds a process of the demo may take to vanish after the demo has ended.
LEFTOVER_GRACE = 5.0


def tagged_processes(run_id: str) -> list[int]:
    """Pids of live processes whose environment carries this run's tag."""
    tag = f"{RUN_ID_ENV}={run_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if tag in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":  # a zombie is already dead, waiting for its parent
                    found.append(int(entry.name))
        except OSError:
            continue  # exited while we looked, or not ours to read
    return found


def nothing_left(run_id: str) -> list[int]:
    """Pids of the run still alive after a short grace: the demo SIGKILLs what did not stop,
    and a killed process only disappears once the kernel has run its exit (on a busy machine,
    a moment after the demo itself ended). A leaked process stays, and is returned."""
    try:
        wait_until(lambda: not tagged_processes(run_id), timeout=LEFTOVER_GRACE, interval=0.05)
    except TimeoutError:
        pass
    return tagged_processes(run_id)


def start_demo(out: Path, *args: str) -> tuple[subprocess.Popen[str], str]:
    run_id = uuid.uuid4().hex
    # PYTHONFAULTHANDLER: a demo that hangs prints every thread's stack when finish() aborts it.
    env = {**os.environ, RUN_ID_ENV: run_id, "PYTHONPATH": str(REPO_ROOT), "COLUMNS": "120",
           "PYTHONFAULTHANDLER": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "dockercomp.demo", "--out", str(out), *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT,
    )  # fmt: skip
    return process, run_id


def finish(process: subprocess.Popen[str], timeout: float = 90) -> str:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)  # faulthandler writes the stacks, then it dies
        try:
            output, _ = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        pytest.fail(f"the demo did not end within {timeout} s:\n{output}", pytrace=False)
    return output


def test_demo_draws_the_picture_records_every_tile_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "demo-out"
    # When the demo runs with its defaults (8x8 tiles of 64 px, 4 agents)
    process, run_id = start_demo(out)
    output = finish(process)
    # Then it succeeds and both pictures have the full size
    assert process.returncode == 0, output
    for name in ("mandelbrot.png", "workers.png"):
        with Image.open(out / name) as image:
            assert image.size == (512, 512)
    with Image.open(out / "mandelbrot.png") as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is not None and len(colours) > 20  # a picture, not a blank
        assert image.getpixel((310, 256)) == (0, 0, 0)  # inside the set: black
    # and every tile was computed by one of the demo's workers, as its store records
    with Client(str(out / "demo.db")) as client:
        rows = client.job("mandelbrot").results()
    assert len(rows) == 64
    assert all(row.state == "done" for row in rows)
    workers = {row.worker for row in rows}
    assert workers <= {f"local/demo-{n}" for n in range(1, 5)} and len(workers) >= 2
    # and the table says who computed what
    assert "Who computed what: 64 tiles" in output
    for worker in workers:
        assert worker in output
    # and it said where to watch it live (issue 13)
    assert re.search(r"Watch it live: open http://127\.0\.0\.1:\d+/ in a browser", output)
    # and no process of the run is left
    assert nothing_left(run_id) == []


def test_keep_leaves_the_broker_coordinator_and_dashboard_up_until_ctrl_c(tmp_path: Path) -> None:
    # Given a small demo run with --keep
    process, run_id = start_demo(tmp_path / "out", "--keep", "--tiles", "2", "--workers", "2")
    assert process.stdout is not None
    seen: list[str] = []
    for line in process.stdout:  # bounded by the module's timeout
        seen.append(line)
        if "Ctrl-C stops everything" in line:
            break
    output = "".join(seen)
    assert "Kept up (--keep)" in output, output
    # Then after the job the dashboard still serves its page, pointing at the live broker
    page_url = re.search(r"dashboard (http://\S+/)", output.replace("\n", " "))
    assert page_url, output
    with urllib.request.urlopen(page_url.group(1), timeout=10) as page:
        assert b"dockercomp dashboard" in page.read()
    with urllib.request.urlopen(page_url.group(1) + "config.json", timeout=10) as config:
        ws_url = json.loads(config.read())["ws_url"]
    assert ws_url.startswith("ws://127.0.0.1:")
    # and the coordinator and both agents are still running
    assert len(tagged_processes(run_id)) >= 4  # demo, coordinator, 2 agents
    # When the scientist presses Ctrl-C: a normal end, and nothing is left
    process.send_signal(signal.SIGINT)
    rest = finish(process, timeout=30)
    assert process.returncode == 0, output + rest
    assert nothing_left(run_id) == []


def test_ctrl_c_stops_the_demo_and_every_process_it_started(tmp_path: Path) -> None:
    out = tmp_path / "demo-out"
    # Given a demo busy with a long job
    process, run_id = start_demo(out, "--max-iter", "20000", "--tiles", "16", "--tile-size", "32")
    db = out / "demo.db"
    wait_until(lambda: len(tagged_processes(run_id)) >= 6, timeout=30)  # demo, coordinator, 4 agents
    wait_until(lambda: db.exists() and b"assigned" in _task_states(db), timeout=30)
    # When the scientist presses Ctrl-C
    process.send_signal(signal.SIGINT)
    output = finish(process, timeout=30)
    # Then the demo says so, exits 130, and nothing it started is left
    assert process.returncode == 130, output
    assert "Interrupted" in output
    assert nothing_left(run_id) == []


def test_a_failed_demo_still_cleans_up(tmp_path: Path) -> None:
    # Given a job that cannot finish in the time allowed
    process, run_id = start_demo(tmp_path / "out", "--max-iter", "50000", "--timeout", "2")
    output = finish(process)
    # Then the demo fails with a reason, and leaves no process
    assert process.returncode == 1, output
    assert "did not finish within 2 s" in output
    assert nothing_left(run_id) == []


def _task_states(db: Path) -> bytes:
    """Task states in the demo's store, read with sqlite3 so no peewee binding is disturbed."""
    import sqlite3

    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as connection:
            return " ".join(state for (state,) in connection.execute("SELECT DISTINCT state FROM task")).encode()
    except sqlite3.Error:
        return b""
