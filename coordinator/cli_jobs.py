"""`dockercomp coordinator` commands about jobs: submit, status, results, show, cancel, retry, delete.

Registered on the `main` group of coordinator/cli.py (which imports this module).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click
from rich.console import Group
from rich.live import Live

from dockercomp.broker.defaults import BROKER_URL_ENV
from dockercomp.broker.errors import InvalidName
from dockercomp.broker.topics import validate_name
from dockercomp.coordinator import defaults
from dockercomp.coordinator.api import Client
from dockercomp.coordinator.cli import (
    _echo_json,
    _stderr,
    _stdout,
    command_errors,
    db_option,
    json_option,
    main,
    reader,
    wide_option,
)
from dockercomp.coordinator.cli_trust import replication_options
from dockercomp.coordinator.inputs import open_input, read_arguments
from dockercomp.coordinator.replication import Replication
from dockercomp.coordinator.render import (
    attempt_dict,
    attempts_view,
    count_progress_bar,
    job_view,
    jobs_table,
    progress_dict,
    results_table,
    row_dict,
    workers_line,
    write_atomically,
    write_csv,
    write_json,
    write_jsonl,
)
from dockercomp.exits import Exit


# ----------------------------------------------------------------------------------- submit
def _job_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return validate_name(value, "job name", dots=True)
    except InvalidName as exc:
        raise click.BadParameter(exc.reason) from None


@main.command(short_help="Store a job: one task per input line.")
@click.argument("function")
@click.argument("file", default="-", metavar="[FILE|-]")
@click.option("--job", "name", metavar="NAME", callback=_job_name,
              help="Job name (letters, digits, _ . -); default job-<id>.")
@click.option("--timeout", metavar="SECONDS", type=click.FloatRange(min=0, min_open=True),
              default=defaults.TASK_TIMEOUT, show_default=True,
              help="Seconds one task may run on a worker before it is killed.")
@click.option("--max-attempts", metavar="N", type=click.IntRange(min=1), default=defaults.MAX_ATTEMPTS,
              show_default=True, help="Dispatches of one task before it is marked failed.")
@click.option("--replace", is_flag=True,
              help="Replace the job of that --job name (with its results) if there is one; kept if this fails.")
@click.option("--broker", envvar=BROKER_URL_ENV, default=None, metavar="URL",
              help=f"Broker of a running serve (or ${BROKER_URL_ENV}): nudge it to dispatch at once, "
                   "instead of at its next poll of the database.")
@db_option
@json_option
@command_errors
@replication_options
def submit(function: str, file: str, name: str | None, timeout: float, max_attempts: int, replace: bool,
           broker: str | None, db: str, as_json: bool, replication: Replication) -> None:  # fmt: skip
    """Store a job: one task per line of FILE (or stdin), each line a JSON array of arguments.

    \b
    Example: printf '[0, 100000]\\n[100000, 200000]\\n' | dockercomp coordinator submit count_primes -
    Blank lines are skipped; a bad line stops everything (nothing is stored) and is named.
    The job is durable when this returns; `dockercomp coordinator serve` need not be running.
    """
    stream, source, size = open_input(file)
    large = size > defaults.LARGE_INPUT_BYTES and not as_json
    err = _stderr()
    try:
        with count_progress_bar("reading", size, err, enabled=large and err.is_terminal) as advance:
            args_list = read_arguments(stream, source, on_line=advance)
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
    with Client(db, broker=broker) as client, count_progress_bar(
        "storing", len(args_list), err, enabled=large and err.is_terminal
    ) as stored:
        job = client.submit(function, args_list, name=name, timeout=timeout, max_attempts=max_attempts,
                            on_progress=stored, replace=replace, **asdict(replication))  # fmt: skip
        where = client.store.url  # password masked
        unknown = _nobody_offers(client, function)
    if as_json:
        _echo_json({"job_id": job.id, "name": job.name, "function": job.function, "tasks": job.total,
                    "timeout": job.timeout, "max_attempts": job.max_attempts, "db": where,
                    "replication": asdict(replication), "warning": unknown or None})  # fmt: skip
        return
    click.echo(f"Submitted job {job.name} (id {job.id}): {job.total} task{'s' * (job.total != 1)} of "
               f"{job.function}, stored in {where}.")  # fmt: skip
    click.echo(f"Follow it with `dockercomp coordinator status {job.name} --watch`; "
               f"fetch results with `dockercomp coordinator results {job.name}`.")  # fmt: skip
    if unknown:  # stored all the same: the worker offering it may simply not be running yet
        click.echo(f"warning: {unknown}; its tasks wait until a worker that offers it connects "
                   f"(or `dockercomp coordinator delete {job.name}`).", err=True)


def _nobody_offers(client: Client, function: str) -> str:
    """"no known worker offers 'f' (...)" when no worker seen (and not purged) offers it."""
    known = [w for w in client.store.workers() if w.state != "purged"]
    if any(function in w.functions for w in known):
        return ""
    offered = sorted({f for w in known for f in w.functions})
    return (f"no known worker offers {function!r}"
            + (f" (known workers offer: {', '.join(offered)})" if offered else " (no worker has been seen yet)"))


# ----------------------------------------------------------------------------------- status
@main.command(short_help="Progress of every job, or of one.")
@click.argument("job", required=False)
@click.option("--watch", is_flag=True, help="Refresh until the job(s) finish (Ctrl-C stops watching).")
@click.option("--interval", type=click.FloatRange(min=0.05), default=defaults.WATCH_INTERVAL, show_default=True,
              help="Seconds between refreshes with --watch.")
@db_option
@json_option
@wide_option
@command_errors
def status(job: str | None, watch: bool, interval: float, db: str, as_json: bool, wide: bool) -> None:
    """Progress of every job, or of one JOB (id or name) with a progress bar.

    Says when the coordinator is not running (worker states are then the last known) and when
    no online worker offers a job's function. `status JOB --watch` exits with code 12 when the
    job ends with failed tasks (0 when every task is done or the job was cancelled).
    """
    with reader(db) as client:
        if job is not None:
            one = client.job(job)  # UnknownJob before anything is shown

            def snapshot() -> tuple[Any, Any, bool]:
                progress = one.progress()
                finished = progress.finished >= progress.total
                view = job_view(progress, stalled="" if finished else one.stalled())
                return progress_dict(progress), view, finished
        else:

            def snapshot() -> tuple[Any, Any, bool]:
                jobs = client.jobs()
                progresses = [j.progress() for j in jobs]
                done = all(p.finished >= p.total for p in progresses)
                alive = client.liveness()
                if not jobs:
                    view: Any = "No jobs yet: submit one with `dockercomp coordinator submit FUNCTION FILE`."
                else:
                    lines: list[Any] = [jobs_table(progresses), workers_line(client.workers(), not done, alive.live)]
                    lines += [f"Stalled: job {j.name}: {why}." for j, p in zip(jobs, progresses)
                              if p.finished < p.total and (why := client.unroutable(j.function))]
                    view = Group(*lines)
                if not alive.live and (jobs or alive.beat is not None):
                    view = Group(view, alive.sentence())
                elif alive.active():  # several `serve` may share the database: say which one runs it
                    view = Group(view, alive.active())
                return [progress_dict(p) for p in progresses], view, done

        data, view, finished = snapshot()
        if not watch:
            if as_json:
                _echo_json(data)
            else:
                _stdout(wide).print(view)
            return
        try:
            if as_json:
                last = None
                while True:
                    if data != last:
                        _echo_json(data)
                        last = data
                    if finished:
                        _exit_if_failed(data)
                        return
                    time.sleep(interval)
                    data, view, finished = snapshot()
            console = _stdout(wide)
            with Live(view, console=console, auto_refresh=False) as live:
                while not finished:
                    time.sleep(interval)
                    data, view, finished = snapshot()
                    live.update(view, refresh=True)
            if not console.is_terminal:
                console.line()  # Live drew its last frame without ending the line
        except KeyboardInterrupt:
            return  # Ctrl-C ends watching; it is not an error
    _exit_if_failed(data)


def _exit_if_failed(data: Any) -> None:
    """`status JOB --watch` tells a script that the job ended with failed tasks (Exit.JOB_FAILED).
    Watching every job does not: an old failed job would fail every later watch."""
    if isinstance(data, dict) and data["state"] == "failed":
        raise SystemExit(Exit.JOB_FAILED)


# ---------------------------------------------------------------------------------- results
# --format per output file extension; anything else is JSON lines.
_FORMAT_BY_SUFFIX = {".csv": "csv", ".json": "json", ".jsonl": "jsonl"}


@main.command(short_help="Each task of a job: value, worker, errors.")
@click.argument("job")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "jsonl", "csv"]), default=None,
              help="table (default on screen), json (one document), jsonl (one object per line) or csv; "
                   "with -o, chosen by the file's extension (.json, .jsonl, .csv; else jsonl).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True, allow_dash=True),
              help="Write to this file instead of the screen ('-' for stdout).")
@click.option("--errors", "only_errors", is_flag=True,
              help="Only the tasks that had a failed attempt (`show JOB INDEX` prints their tracebacks).")
@db_option
@json_option
@wide_option
@command_errors
def results(job: str, fmt: str | None, output: str | None, only_errors: bool, db: str, as_json: bool,
            wide: bool) -> None:  # fmt: skip
    """Every task of JOB in input order: args, state, value, worker, attempts, elapsed, errors.

    --json is short for --format jsonl (one JSON object per line).
    """
    if as_json:
        fmt = fmt or "jsonl"
    if fmt is None:
        fmt = "table" if output is None else _FORMAT_BY_SUFFIX.get(Path(output).suffix.lower(), "jsonl")
    if fmt == "table" and output not in (None, "-"):
        raise click.UsageError("a table is for the screen: with -o use --format json, jsonl or csv")
    with reader(db) as client:
        handle = client.job(job)
        rows = [row for row in handle.results() if row.errors or not only_errors]
        progress = handle.progress()
    if fmt == "table":
        which = "Tasks with failed attempts" if only_errors else "Results"
        _stdout(wide).print(results_table(rows, f"{which} of {handle.name} ({progress.done} done, "
                                                f"{progress.failed} failed, {progress.total} tasks)"))  # fmt: skip
        if only_errors and rows:
            click.echo(f"Tracebacks: `dockercomp coordinator show {handle.name} INDEX`.")
        return
    writer = {"json": write_json, "jsonl": write_jsonl, "csv": write_csv}[fmt]
    if output in (None, "-"):
        writer(rows, sys.stdout)
        return
    count = write_atomically(Path(output), lambda out: writer(rows, out))
    click.echo(f"Wrote {count} results of job {handle.name} to {output} ({fmt}; {progress.done} done, "
               f"{progress.failed} failed, {progress.total - progress.finished} unfinished).", err=True)  # fmt: skip


@main.command(short_help="One task: every attempt, with errors and tracebacks.")
@click.argument("job")
@click.argument("task", type=click.IntRange(min=0), metavar="INDEX")
@db_option
@json_option
@command_errors
def show(job: str, task: int, db: str, as_json: bool) -> None:
    """Task INDEX of JOB (its line in the input, from 0): state, value, and every attempt with
    its worker, outcome, error and traceback."""
    with reader(db) as client:
        handle = client.job(job)
        row, attempts = handle.attempts(task)
    if as_json:
        _echo_json({**row_dict(row), "job": handle.name, "attempt_list": [attempt_dict(a) for a in attempts]})
    else:
        _stdout().print(attempts_view(handle.name, row, attempts))


# ------------------------------------------------------------------------- cancel / retry
@main.command(short_help="Cancel the unfinished tasks of a job.")
@click.argument("job")
@db_option
@json_option
@command_errors
def cancel(job: str, db: str, as_json: bool) -> None:
    """Cancel the unfinished tasks of JOB (pending ones are never sent; running ones are dropped)."""
    with reader(db) as client:
        handle = client.job(job)
        count = handle.cancel()
        progress = handle.progress()
    if as_json:
        _echo_json({"job": handle.name, "cancelled": count, "progress": progress_dict(progress)})
    elif count:
        click.echo(f"Cancelled {count} unfinished task{'s' * (count != 1)} of job {handle.name}; "
                   f"{progress.done} done and {progress.failed} failed are kept.")  # fmt: skip
    else:
        click.echo(f"Nothing to cancel: every task of job {handle.name} has already finished.")


@main.command(short_help="Send the failed tasks of a job again.")
@click.argument("job")
@db_option
@json_option
@command_errors
def retry(job: str, db: str, as_json: bool) -> None:
    """Send the failed tasks of JOB again, with a fresh attempt budget."""
    with reader(db) as client:
        handle = client.job(job)
        count = handle.retry()
    if as_json:
        _echo_json({"job": handle.name, "retried": count})
    elif count:
        click.echo(f"{count} failed task{'s' * (count != 1)} of job {handle.name} pending again; a running "
                   f"`dockercomp coordinator serve` sends them within a second.")  # fmt: skip
    else:
        click.echo(f"Nothing to retry: job {handle.name} has no failed task.")


@main.command(short_help="Delete a job with its results.")
@click.argument("job")
@db_option
@json_option
@command_errors
def delete(job: str, db: str, as_json: bool) -> None:
    """Delete JOB with its tasks, attempts and results (its name can then be used again).

    Refused while workers hold some of its tasks: cancel it first. To rerun a job under the
    same name in one step, use `submit --job NAME --replace`.
    """
    with reader(db) as client:
        handle = client.job(job)
        count = handle.delete()
    if as_json:
        _echo_json({"job": handle.name, "id": handle.id, "deleted_tasks": count})
    else:
        click.echo(f"Deleted job {handle.name} (id {handle.id}) with its {count} task{'s' * (count != 1)} "
                   "and their results.")
