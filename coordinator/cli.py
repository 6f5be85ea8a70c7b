"""`coordinator` command line: the scientist's commands, thin over coordinator.api.

Each command parses, calls the API, and prints a rich table (or one JSON document with
``--json``). Failures print one line saying what to do and exit with a code scripts can
tell apart: 2 usage or bad input, 3 unknown job, 4 database problem, 5 broker unreachable,
130 interrupted. `dockercomp coordinator serve` (the engine) is coordinator.serve's command.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

import click
from rich.console import Console, Group
from rich.live import Live

from dockercomp.broker.errors import BrokerError, InvalidName
from dockercomp.broker.errors import SettingsError as BrokerSettingsError
from dockercomp.broker.settings import BrokerSettings
from dockercomp.broker.topics import validate_name
from dockercomp.coordinator.api import BROKER_CONNECT_TIMEOUT, Client, default_broker, default_db
from dockercomp.coordinator.defaults import DB_PATH, DB_URL_ENV, MAX_ATTEMPTS, TASK_TIMEOUT
from dockercomp.coordinator.errors import CoordinatorError
from dockercomp.coordinator.inputs import read_arguments
from dockercomp.coordinator.render import (
    count_progress_bar,
    dumps,
    job_view,
    jobs_table,
    progress_dict,
    results_table,
    worker_dict,
    workers_table,
    write_csv,
    write_jsonl,
)
from dockercomp.coordinator.certs import certs
from dockercomp.coordinator.serve import serve
from dockercomp.coordinator.volunteers import volunteers

# Exit codes beyond those carried by CoordinatorError.exit_code (2 input, 3 job, 4 store).
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_BROKER = 5
EXIT_INTERRUPTED = 130

# Inputs larger than this many bytes get a progress bar while being read and stored.
LARGE_INPUT_BYTES = 1_000_000

# Seconds between refreshes of `status --watch`.
WATCH_INTERVAL = 1.0

F = TypeVar("F", bound=Callable[..., Any])


def _fail(message: str, code: int) -> None:
    """One readable line on stderr, then exit with `code` (no traceback)."""
    click.echo(f"error: {message}", err=True)
    raise SystemExit(code)


def _errors_to_exit_codes(func: F) -> F:
    """Maps the errors a user can cause or fix to one line and a distinct exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except CoordinatorError as exc:
            _fail(str(exc), exc.exit_code)
        except BrokerSettingsError as exc:
            _fail(f"{exc} (check --broker or $DOCKERCOMP_BROKER)", EXIT_USAGE)
        except BrokerError as exc:
            _fail(f"{exc} (check --broker or $DOCKERCOMP_BROKER)", EXIT_BROKER)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            raise SystemExit(EXIT_INTERRUPTED) from None

    return wrapper  # type: ignore[return-value]


def db_option(func: F) -> F:
    return click.option(
        "--db", "db", metavar="PATH|URL", envvar=DB_URL_ENV, default=default_db,
        show_default=f"${DB_URL_ENV} or {DB_PATH}",
        help="Coordinator database: a SQLite file or postgresql://user@host/db (the same as `serve --db`).",
    )(func)  # fmt: skip


def json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of a table.")(func)


def _open(db: str) -> Client:
    return Client(db)


def _stdout() -> Console:
    # Built per call: click's test runner swaps sys.stdout for each invocation.
    return Console(soft_wrap=False)


def _stderr() -> Console:
    return Console(stderr=True)


def _echo_json(data: Any) -> None:
    click.echo(dumps(data))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dockercomp")
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug) on stderr.")
def main(verbose: int) -> None:
    """dockercomp coordinator: submit jobs, follow them, fetch their results.

    \b
    Start the engine once:   dockercomp coordinator serve --broker mqtt://HOST:1883
    Then:                    dockercomp coordinator submit count_primes ranges.txt --job primes
                             dockercomp coordinator status primes --watch
                             dockercomp coordinator results primes -o primes.csv
    """
    if verbose:  # otherwise left to the command: `serve -v` configures its own logging
        level = logging.INFO if verbose == 1 else logging.DEBUG
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


main.add_command(serve)
main.add_command(volunteers)
main.add_command(certs)


# ----------------------------------------------------------------------------------- submit
def _job_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return validate_name(value, "job name")
    except InvalidName as exc:
        raise click.BadParameter(exc.reason) from None


def _open_input(path: str) -> tuple[IO[bytes], str, int]:
    """(binary stream, name for messages, size in bytes or 0 when unknown)."""
    if path == "-":
        if sys.stdin.isatty():
            raise click.UsageError("no input: give a FILE, or pipe lines in (`... | dockercomp coordinator submit FUNCTION -`)")
        return sys.stdin.buffer, "<stdin>", 0
    try:
        stream = open(path, "rb")  # noqa: SIM115 - closed by the caller
    except OSError as exc:
        _fail(f"cannot read {path}: {exc.strerror or exc} — check the path", EXIT_USAGE)
        raise  # unreachable, for type checkers
    size = os.fstat(stream.fileno()).st_size
    return stream, path, size


@main.command(short_help="Store a job: one task per input line.")
@click.argument("function")
@click.argument("file", default="-", metavar="[FILE|-]")
@click.option("--job", "name", metavar="NAME", callback=_job_name,
              help="Job name (letters, digits, _ . -); default job-<id>.")
@click.option("--timeout", metavar="SECONDS", type=click.FloatRange(min=0, min_open=True), default=TASK_TIMEOUT,
              show_default=True, help="Seconds one task may run on a worker before it is killed.")
@click.option("--max-attempts", metavar="N", type=click.IntRange(min=1), default=MAX_ATTEMPTS, show_default=True,
              help="Dispatches of one task before it is marked failed.")
@db_option
@json_option
@_errors_to_exit_codes
def submit(function: str, file: str, name: str | None, timeout: float, max_attempts: int,
           db: str, as_json: bool) -> None:  # fmt: skip
    """Store a job: one task per line of FILE (or stdin), each line a JSON array of arguments.

    \b
    Example: printf '[0, 100000]\\n[100000, 200000]\\n' | dockercomp coordinator submit count_primes -
    Blank lines are skipped; a bad line stops everything (nothing is stored) and is named.
    The job is durable when this returns; `dockercomp coordinator serve` need not be running.
    """
    stream, source, size = _open_input(file)
    large = size > LARGE_INPUT_BYTES and not as_json
    err = _stderr()
    try:
        with count_progress_bar("reading", size, err, enabled=large and err.is_terminal) as advance:
            args_list = read_arguments(stream, source, on_line=advance)
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
    with _open(db) as client, count_progress_bar(
        "storing", len(args_list), err, enabled=large and err.is_terminal
    ) as stored:
        job = client.submit(function, args_list, name=name, timeout=timeout, max_attempts=max_attempts,
                            on_progress=stored)  # fmt: skip
        where = client.store.url  # password masked
    if as_json:
        _echo_json({"job_id": job.id, "name": job.name, "function": job.function, "tasks": job.total,
                    "timeout": job.timeout, "max_attempts": job.max_attempts, "db": where})  # fmt: skip
        return
    click.echo(f"Submitted job {job.name} (id {job.id}): {job.total} task{'s' * (job.total != 1)} of "
               f"{job.function}, stored in {where}.")  # fmt: skip
    click.echo(f"Follow it with `dockercomp coordinator status {job.name} --watch`; "
               f"fetch results with `dockercomp coordinator results {job.name}`.")  # fmt: skip


# ----------------------------------------------------------------------------------- status
def _workers_line(client: Client, unfinished: bool) -> str:
    workers = client.workers()
    online = sum(1 for w in workers if w.state == "online")
    lost = sum(1 for w in workers if w.state == "lost")
    line = f"Workers: {online} online, {lost} lost (`dockercomp coordinator workers` for details)."
    if unfinished and online == 0:
        line += "\nNo worker is online: start one with `dockercomp agent run --broker URL` (and `dockercomp coordinator serve`)."
    return line


@main.command(short_help="Progress of every job, or of one.")
@click.argument("job", required=False)
@click.option("--watch", is_flag=True, help="Refresh until the job(s) finish (Ctrl-C stops watching).")
@click.option("--interval", type=click.FloatRange(min=0.05), default=WATCH_INTERVAL, show_default=True,
              help="Seconds between refreshes with --watch.")
@db_option
@json_option
@_errors_to_exit_codes
def status(job: str | None, watch: bool, interval: float, db: str, as_json: bool) -> None:
    """Progress of every job, or of one JOB (id or name) with a progress bar."""
    with _open(db) as client:
        if job is not None:
            one = client.job(job)  # UnknownJob before anything is shown

            def snapshot() -> tuple[Any, Any, bool]:
                progress = one.progress()
                return progress_dict(progress), job_view(progress), progress.finished >= progress.total
        else:

            def snapshot() -> tuple[Any, Any, bool]:
                jobs = client.jobs()
                progresses = [j.progress() for j in jobs]
                done = all(p.finished >= p.total for p in progresses)
                if not jobs:
                    view: Any = "No jobs yet: submit one with `dockercomp coordinator submit FUNCTION FILE`."
                else:
                    view = Group(jobs_table(progresses), _workers_line(client, not done))
                return [progress_dict(p) for p in progresses], view, done

        data, view, finished = snapshot()
        if not watch:
            if as_json:
                _echo_json(data)
            else:
                _stdout().print(view)
            return
        try:
            if as_json:
                last = None
                while True:
                    if data != last:
                        _echo_json(data)
                        last = data
                    if finished:
                        return
                    time.sleep(interval)
                    data, view, finished = snapshot()
            console = _stdout()
            with Live(view, console=console, auto_refresh=False) as live:
                while not finished:
                    time.sleep(interval)
                    data, view, finished = snapshot()
                    live.update(view, refresh=True)
            if not console.is_terminal:
                console.line()  # Live drew its last frame without ending the line
        except KeyboardInterrupt:
            return  # Ctrl-C ends watching; it is not an error


# ---------------------------------------------------------------------------------- workers
@main.command(short_help="Workers seen: state, capacity, work done.")
@db_option
@json_option
@_errors_to_exit_codes
def workers(db: str, as_json: bool) -> None:
    """Every worker the coordinator has seen: state, capacity, tasks held and done."""
    with _open(db) as client:
        found = client.workers()
    if as_json:
        _echo_json([worker_dict(w) for w in found])
    elif not found:
        click.echo("No worker has been seen yet: workers appear once `dockercomp coordinator serve` is running "
                   "and an agent connects (`dockercomp agent run --broker URL`).")  # fmt: skip
    else:
        _stdout().print(workers_table(found))


# ---------------------------------------------------------------------------------- results
def _write_atomically(path: Path, write: Callable[[IO[str]], int]) -> int:
    """Writes via a temporary file renamed into place: no half-written results file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or Path("."))
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as out:
            count = write(out)
        os.replace(tmp, path)
        return count
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@main.command(short_help="Each task of a job: value, worker, errors.")
@click.argument("job")
@click.option("--format", "fmt", type=click.Choice(["table", "jsonl", "csv"]), default=None,
              help="table (default on screen), jsonl (default with -o), or csv.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True, allow_dash=True),
              help="Write to this file instead of the screen ('-' for stdout).")
@db_option
@json_option
@_errors_to_exit_codes
def results(job: str, fmt: str | None, output: str | None, db: str, as_json: bool) -> None:
    """Every task of JOB in input order: args, state, value, worker, attempts, elapsed, errors.

    --json is short for --format jsonl (one JSON object per line).
    """
    if as_json:
        fmt = fmt or "jsonl"
    if fmt is None:
        fmt = "table" if output is None else ("csv" if output.lower().endswith(".csv") else "jsonl")
    if fmt == "table" and output not in (None, "-"):
        raise click.UsageError("a table is for the screen: with -o use --format jsonl or csv")
    with _open(db) as client:
        handle = client.job(job)
        rows = handle.results()
        progress = handle.progress()
    if fmt == "table":
        _stdout().print(results_table(rows, f"Results of {handle.name} ({progress.done} done, "
                                            f"{progress.failed} failed, {progress.total} tasks)"))  # fmt: skip
        return
    writer = write_jsonl if fmt == "jsonl" else write_csv
    if output in (None, "-"):
        writer(rows, sys.stdout)
        return
    count = _write_atomically(Path(output), lambda out: writer(rows, out))
    click.echo(f"Wrote {count} results of job {handle.name} to {output} ({fmt}; {progress.done} done, "
               f"{progress.failed} failed, {progress.total - progress.finished} unfinished).", err=True)  # fmt: skip


# ------------------------------------------------------------------------- cancel / retry
@main.command(short_help="Cancel the unfinished tasks of a job.")
@click.argument("job")
@db_option
@json_option
@_errors_to_exit_codes
def cancel(job: str, db: str, as_json: bool) -> None:
    """Cancel the unfinished tasks of JOB (pending ones are never sent; running ones are dropped)."""
    with _open(db) as client:
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
@_errors_to_exit_codes
def retry(job: str, db: str, as_json: bool) -> None:
    """Send the failed tasks of JOB again, with a fresh attempt budget."""
    with _open(db) as client:
        handle = client.job(job)
        count = handle.retry()
    if as_json:
        _echo_json({"job": handle.name, "retried": count})
    elif count:
        click.echo(f"{count} failed task{'s' * (count != 1)} of job {handle.name} pending again; a running "
                   f"`dockercomp coordinator serve` sends them within a second.")  # fmt: skip
    else:
        click.echo(f"Nothing to retry: job {handle.name} has no failed task.")


# ------------------------------------------------------------------------------------ purge
@main.command(short_help="Purge lost workers and their retained presence.")
@click.option("--older-than", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Only workers lost for more than this many seconds.")
@click.option("--broker", envvar="DOCKERCOMP_BROKER", default=default_broker,
              show_default="$DOCKERCOMP_BROKER or mqtt://127.0.0.1:1883",
              help="Broker whose retained presence of the purged workers is cleared.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=BROKER_CONNECT_TIMEOUT, show_default=True,
              help="Seconds to wait for the broker.")
@db_option
@json_option
@_errors_to_exit_codes
def purge(older_than: float, broker: str, timeout: float, db: str, as_json: bool) -> None:
    """Purge lost workers now, and clear their retained presence on the broker.

    The store is purged even when the broker is unreachable; the command then says which
    retained messages are left and exits with code 5.
    """
    with _open(db) as client:
        report = client.purge(older_than, broker=broker, connect_timeout=timeout)
    keys = [w.key for w in report.purged]
    if as_json:
        _echo_json({"purged": keys, "cleared": report.cleared, "broker": report.broker_url,
                    "broker_error": report.broker_error})  # fmt: skip
    elif not keys:
        click.echo("No lost worker to purge.")
    else:
        click.echo(f"Purged {len(keys)} lost worker{'s' * (len(keys) != 1)}: {', '.join(keys)}.")
        if report.cleared:
            click.echo(f"Cleared their retained presence on {report.broker_url}.")
    if not report.cleared:
        where = BrokerSettings.from_url(report.broker_url)
        commands = "\n".join(f"  mosquitto_pub -h {where.host} -p {where.port} -r -n -t {topic}"
                              for topic in report.topics)  # fmt: skip
        click.echo(
            f"error: their retained presence is still on the broker: {report.broker_error}\n"
            f"Clear it by hand once the broker is reachable:\n{commands}",
            err=True,
        )
        raise SystemExit(EXIT_BROKER)


if __name__ == "__main__":
    main()
