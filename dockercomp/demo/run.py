"""`make demo` (`python -m dockercomp.demo`): the whole system on one machine, one command.

No Docker and no Mosquitto needed: an embedded broker (amqtt) runs in this process, the
coordinator (`dockercomp coordinator serve`) and 4 agents (`dockercomp agent run`) run as child processes. A
Mandelbrot image is cut into tiles, one task each; every tile is computed by whichever agent
the coordinator dispatched it to, and the store records which. The demo writes

    demo-out/mandelbrot.png   the picture, assembled from the tiles
    demo-out/workers.png      the same, each tile tinted with the colour of its worker
    demo-out/demo.db          the coordinator's store (`dockercomp coordinator results mandelbrot --db …`)
    demo-out/logs/            what the coordinator and each agent logged

prints who computed what, and serves the live dashboard (`dockercomp coordinator dashboard`)
on a local port while it runs. ``--keep`` keeps everything up after the job until Ctrl-C.
It leaves no process behind: children run in their own process groups, are stopped
(SIGTERM, then SIGKILL after a grace period) in a ``finally`` — also on Ctrl-C, SIGTERM or
failure — and die with the demo even if it is killed (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from dockercomp.broker.embedded import EmbeddedBroker, EmbeddedBrokerError
from dockercomp.coordinator.api import Client, Job
from dockercomp.coordinator.dashboard import Dashboard, DashboardSettings
from dockercomp.coordinator.errors import CoordinatorError
from dockercomp.coordinator.render import job_progress_bar
from dockercomp.coordinator.store import ResultRow
from dockercomp.exits import Exit

# The demo's job name in its store.
JOB_NAME = "mandelbrot"

# Environment variable set in every child (and inherited by grandchildren) to this run's id,
# so a test can check that no process of a run is left.
RUN_ID_ENV = "DOCKERCOMP_DEMO_RUN"

# Seconds a child gets to stop after SIGTERM before it is killed.
STOP_GRACE = 5.0

# Seconds between looks at the job's progress (and at the children's health).
POLL_INTERVAL = 0.2

# Lines of a dead child's log shown in the error.
LOG_TAIL_LINES = 15

# Exit codes, from the table every dockercomp command shares: the demo failed, or was interrupted.
EXIT_FAILED = Exit.FAILED
EXIT_INTERRUPTED = Exit.INTERRUPTED

REPO_ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger(__name__)


class DemoError(CoordinatorError):
    """The demo could not finish; the message says what went wrong and where to look."""


class Interrupted(Exception):
    """SIGTERM (or SIGINT) asked the demo to stop."""


@dataclass(frozen=True)
class DemoSettings:
    out: Path = Path("demo-out")  # where the pictures, store and logs go
    workers: int = 4  # local agents, one task at a time each
    tiles: int = 8  # tiles across and down
    tile_size: int = 64  # pixels per tile side
    max_iter: int = 200  # Mandelbrot iterations per pixel
    timeout: float = 120.0  # seconds the job may take before the demo gives up
    task_timeout: float = 60.0  # seconds one tile may take on a worker
    keepalive: int = 5  # agents' MQTT keepalive
    keep: bool = False  # after the job, keep the broker, coordinator, agents and dashboard up until Ctrl-C


@dataclass
class DemoReport:
    """What the demo produced, for the summary table and for tests."""

    image: Path
    workers_image: Path
    db: Path
    tiles: int
    seconds: float
    owners: dict[int, str]  # tile position -> worker key
    per_worker: dict[str, list[float]] = field(default_factory=dict)  # worker -> elapsed of each tile
    failed: list[int] = field(default_factory=list)  # tile positions without a value


# ------------------------------------------------------------------------------ children
def _pdeathsig_prefix() -> list[str]:
    """A tiny Python launcher that asks Linux to SIGTERM the child when the demo dies, then
    execs the real command. Done in the child itself (no preexec_fn, which is unsafe next to
    the broker's thread); skipped where prctl does not exist."""
    if not sys.platform.startswith("linux"):
        return []
    code = (
        "import ctypes,os,signal,sys;"
        "ctypes.CDLL(None,use_errno=True).prctl(1,signal.SIGTERM);"  # PR_SET_PDEATHSIG
        "os.getppid()!=int(sys.argv[1]) and sys.exit(1);"  # the demo died before prctl
        "os.execv(sys.argv[2],sys.argv[2:])"
    )
    return [sys.executable, "-c", code, str(os.getpid())]


class Children:
    """Child processes of the demo, each in its own process group, logging to a file."""

    def __init__(self, logs: Path, run_id: str) -> None:
        self.logs = logs
        self.env = dict(os.environ)
        self.env[RUN_ID_ENV] = run_id
        self.env["PYTHONUNBUFFERED"] = "1"
        # Importable from a checkout even when the package is not installed.
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), self.env.get("PYTHONPATH")]))
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._prefix = _pdeathsig_prefix()

    def start(self, name: str, argv: list[str]) -> None:
        with open(self.logs / f"{name}.log", "ab") as log_file:
            self.processes[name] = subprocess.Popen(
                [*self._prefix, *argv], stdin=subprocess.DEVNULL, stdout=log_file,
                stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
            )  # fmt: skip

    def exited(self, name: str) -> int | None:
        return self.processes[name].poll()

    def tail(self, name: str, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = (self.logs / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, names: list[str], grace: float = STOP_GRACE) -> None:
        """SIGTERM each (a graceful stop), SIGKILL what is left after ``grace``, then kill
        anything still in their process groups (e.g. an agent's pool processes)."""
        for name in names:
            process = self.processes.get(name)
            if process is not None and process.poll() is None:
                _signal_group(process.pid, signal.SIGTERM, whole_group=False)
        deadline = time.monotonic() + grace
        for name in names:
            process = self.processes.get(name)
            if process is None:
                continue
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s; killing it", name, grace)
            _signal_group(process.pid, signal.SIGKILL, whole_group=True)
            process.wait()

    def stop_all(self) -> None:
        self.stop(list(self.processes))


def _signal_group(pid: int, sig: signal.Signals, whole_group: bool) -> None:
    try:
        if whole_group:
            os.killpg(pid, sig)  # the child leads its own group (start_new_session)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# ------------------------------------------------------------------------------ the run
@contextmanager
def _stop_on_sigterm() -> Iterator[threading.Event]:
    """SIGTERM only sets a flag; the waiting loop turns it into Interrupted."""
    requested = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        requested.set()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield requested
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fresh_store(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def run_demo(settings: DemoSettings, console: Console) -> DemoReport:
    """Runs the whole demo; raises DemoError (or Interrupted) after cleaning up."""
    from dockercomp.demo import mandelbrot  # Pillow is only imported here and in _draw

    out = settings.out
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    db = out / "demo.db"
    _fresh_store(db)
    tiles = mandelbrot.plan_tiles(settings.tiles, settings.tiles, settings.tile_size, settings.max_iter)
    size = (settings.tiles * settings.tile_size, settings.tiles * settings.tile_size)

    children = Children(logs, run_id=os.environ.get(RUN_ID_ENV) or uuid.uuid4().hex)
    broker: EmbeddedBroker | None = None
    dashboard: Dashboard | None = None
    report: DemoReport | None = None
    with _stop_on_sigterm() as stop_requested, Client(str(db)) as client:
        try:
            try:
                # WebSockets too: the dashboard page connects to the broker from the browser.
                broker = EmbeddedBroker("127.0.0.1", 0, ws_port=0).start()
            except EmbeddedBrokerError as exc:
                raise DemoError(f"cannot start the embedded broker: {exc}") from None
            console.print(f"Embedded broker on [bold]{broker.url}[/]; starting a coordinator and "
                          f"{settings.workers} agents (logs in {logs}/)")  # fmt: skip
            dashboard = Dashboard(DashboardSettings(port=0, ws_url=broker.ws_url)).start()
            console.print(f"Watch it live: open [bold]{dashboard.url}[/] in a browser"
                          + ("" if settings.keep else " (it closes with the demo; --keep keeps it up: "
                                                      "make demo DEMO_ARGS=--keep)"))  # fmt: skip
            python = sys.executable
            children.start("coordinator", [python, "-m", "dockercomp.coordinator", "serve", "--broker", broker.url,
                                           "--db", str(db)])  # fmt: skip
            agents = [f"demo-{n}" for n in range(1, settings.workers + 1)]
            for agent in agents:
                children.start(agent, [
                    python, "-m", "dockercomp.agent.cli", "run", "--broker", broker.url, "--worker-id", agent,
                    "--concurrency", "1", "--keepalive", str(settings.keepalive), "--grace", "2",
                    "--health-file", str(logs / f"{agent}.health"),
                ])  # fmt: skip
            _await_workers(client, children, len(agents), settings.timeout, stop_requested)
            # Submitted once every agent is online, so the tiles are shared among all of them.
            job = client.submit("mandelbrot_tile", [t.args for t in tiles], name=JOB_NAME,
                                timeout=settings.task_timeout)  # fmt: skip
            started = time.monotonic()
            _follow(job, children, agents, settings.timeout, stop_requested, console)
            seconds = time.monotonic() - started
            rows = job.results()
            if settings.keep:
                report = _draw(rows, tiles, size, out, db, seconds, console)
                _hold(broker, dashboard, db, children, stop_requested, console)
        finally:
            children.stop_all()
            if dashboard is not None:
                dashboard.stop()
            if broker is not None:
                broker.stop()
    return report or _draw(rows, tiles, size, out, db, seconds, console)


def _draw(rows: list[ResultRow], tiles: list[Any], size: tuple[int, int], out: Path, db: Path, seconds: float,
          console: Console) -> DemoReport:
    """Both pictures, the table of who computed what, and where to look next."""
    from dockercomp.demo import mandelbrot

    report = _report(rows, out, db, seconds)
    values = {row.index: row.value for row in rows if row.state == "done"}
    escape = mandelbrot.escape_image(tiles, values, size)
    mandelbrot.coloured(escape).save(report.image)
    colours = mandelbrot.worker_colours(report.owners.values())
    mandelbrot.worker_map(escape, tiles, report.owners, colours).save(report.workers_image)
    console.print(_who_table(report, colours))
    if not report.failed:
        console.print(f"Wrote [bold]{report.image}[/] and [bold]{report.workers_image}[/] "
                      f"(each tile tinted by the worker that computed it).")  # fmt: skip
        console.print(f"Explore: {_dockercomp_command()} coordinator results {JOB_NAME} --db {report.db}")
    return report


def _hold(broker: EmbeddedBroker, dashboard: Dashboard, db: Path, children: Children,
          stop_requested: threading.Event, console: Console) -> None:
    """--keep: everything stays up for a look until Ctrl-C or SIGTERM (a normal end, not an
    interruption), or until the coordinator dies."""
    command = _dockercomp_command()
    console.print(f"Kept up (--keep): dashboard [bold]{dashboard.url}[/], broker {broker.url}, coordinator on {db}.\n"
                  f"More work: {command} coordinator submit count_primes FILE --db {db} --broker {broker.url}\n"
                  "Ctrl-C stops everything.")  # fmt: skip
    try:
        while not stop_requested.is_set():
            if children.exited("coordinator") is not None:
                raise DemoError("the coordinator exited:\n" + children.tail("coordinator"))
            time.sleep(POLL_INTERVAL)
    except KeyboardInterrupt:
        pass
    console.print("Stopping the demo's broker, coordinator and agents.")


def _check(children: Children, stop_requested: threading.Event) -> None:
    """Interrupted on SIGTERM; DemoError when the coordinator died."""
    if stop_requested.is_set():
        raise Interrupted()
    if children.exited("coordinator") is not None:
        raise DemoError("the coordinator exited:\n" + children.tail("coordinator"))


def _await_workers(client: Client, children: Children, count: int, timeout: float,
                   stop_requested: threading.Event) -> None:  # fmt: skip
    """Waits until the coordinator has registered ``count`` online workers."""
    deadline = time.monotonic() + timeout
    while sum(1 for w in client.workers() if w.state == "online") < count:
        _check(children, stop_requested)
        if time.monotonic() > deadline:
            raise DemoError(f"fewer than {count} agents came online within {timeout:.0f} s; "
                            f"see the logs in {children.logs}")  # fmt: skip
        time.sleep(POLL_INTERVAL)


def _follow(job: Job, children: Children, agents: list[str], timeout: float,
            stop_requested: threading.Event, console: Console) -> None:  # fmt: skip
    """Shows a progress bar until the job is finished; DemoError if the coordinator or every
    agent dies, or the job takes longer than ``timeout``."""
    deadline = time.monotonic() + timeout
    with job_progress_bar(job.name, job.total, console) as update:
        while True:
            progress = job.progress()
            update(progress)
            if progress.finished >= progress.total:
                return
            _check(children, stop_requested)
            if all(children.exited(agent) is not None for agent in agents):
                raise DemoError("every agent exited; the last one said:\n" + children.tail(agents[-1]))
            if time.monotonic() > deadline:
                raise DemoError(f"the job did not finish within {timeout:.0f} s "
                                f"({progress.finished}/{progress.total} tiles); see the logs")  # fmt: skip
            time.sleep(POLL_INTERVAL)


def _report(rows: list[ResultRow], out: Path, db: Path, seconds: float) -> DemoReport:
    report = DemoReport(image=out / "mandelbrot.png", workers_image=out / "workers.png", db=db,
                        tiles=len(rows), seconds=seconds, owners={})  # fmt: skip
    for row in rows:
        if row.state != "done" or row.worker is None:
            report.failed.append(row.index)
            continue
        report.owners[row.index] = row.worker
        report.per_worker.setdefault(row.worker, []).append(row.elapsed or 0.0)
    return report


def _who_table(report: DemoReport, colours: dict[str, tuple[int, int, int]]) -> Table:
    table = Table(title=f"Who computed what: {report.tiles} tiles in {report.seconds:.1f} s",
                  title_justify="left")  # fmt: skip
    table.add_column("", no_wrap=True)
    table.add_column("worker", no_wrap=True)
    table.add_column("tiles", justify="right")
    table.add_column("share", justify="right")
    table.add_column("mean s/tile", justify="right")
    table.add_column("busy s", justify="right")
    for number, (worker, colour) in enumerate(colours.items(), start=1):
        elapsed = report.per_worker.get(worker, [])
        swatch = Text(f"{number} ██", style=f"rgb({colour[0]},{colour[1]},{colour[2]})")
        table.add_row(
            swatch, worker, str(len(elapsed)), f"{100 * len(elapsed) / max(1, report.tiles):.0f}%",
            f"{sum(elapsed) / max(1, len(elapsed)):.3f}", f"{sum(elapsed):.2f}",
        )  # fmt: skip
    return table


# ------------------------------------------------------------------------------ command
@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-out"),
              show_default=True, help="Directory for the pictures, the store and the logs.")
@click.option("--workers", type=click.IntRange(1, 32), default=4, show_default=True, help="Local agents to start.")
@click.option("--tiles", type=click.IntRange(1, 64), default=8, show_default=True, help="Tiles across and down.")
@click.option("--tile-size", type=click.IntRange(2, 256), default=64, show_default=True, help="Pixels per tile side.")
@click.option("--max-iter", type=click.IntRange(1, 100_000), default=200, show_default=True,
              help="Mandelbrot iterations per pixel.")
@click.option("--timeout", type=click.FloatRange(min=1), default=120.0, show_default=True,
              help="Seconds the job may take before the demo gives up.")
@click.option("--keep", is_flag=True,
              help="After the job, keep the broker, coordinator, agents and live dashboard up until Ctrl-C.")
def main(out: Path, workers: int, tiles: int, tile_size: int, max_iter: int, timeout: float, keep: bool) -> None:
    """Compute a Mandelbrot picture with a local broker, coordinator and agents."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = Console()
    settings = DemoSettings(out=out, workers=workers, tiles=tiles, tile_size=tile_size, max_iter=max_iter,
                            timeout=timeout, keep=keep)  # fmt: skip
    try:
        report = run_demo(settings, console)
    except (KeyboardInterrupt, Interrupted):
        console.print("[yellow]Interrupted; every process the demo started is stopped.[/]")
        raise SystemExit(EXIT_INTERRUPTED) from None
    except CoordinatorError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise SystemExit(EXIT_FAILED) from None
    if report.failed:
        console.print(f"[red]error:[/] {len(report.failed)} tile(s) failed: {report.failed[:10]} "
                      f"(they are black); see `dockercomp coordinator results {JOB_NAME} --db {report.db}`")  # fmt: skip
        raise SystemExit(EXIT_FAILED)


def _dockercomp_command() -> str:
    """How to run `dockercomp` from here: the venv's script (e.g. .venv/bin/dockercomp
    after `make demo`) unless it is the one on PATH."""
    script = Path(sys.executable).parent / "dockercomp"
    if not script.exists() or shutil.which("dockercomp") == str(script):
        return "dockercomp"
    relative = os.path.relpath(script)
    return relative if not relative.startswith("..") else str(script)


if __name__ == "__main__":
    main()
