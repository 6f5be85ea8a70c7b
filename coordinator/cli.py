"""`dockercomp coordinator`: the scientist's commands, thin over coordinator.api.

Each command parses, calls the library, and prints a rich table (or one JSON document with
``--json``). Failures go through dockercomp.exits: one line saying what to do (one JSON
object on stderr with --json) and an exit code from the table shared by every role.
`serve` runs the engine; `volunteers` manages the broker accounts (dockercomp.broker.accounts)
and, on revocation, marks the volunteer's workers lost (coordinator.volunteers).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import click
from rich.console import Console, Group
from rich.live import Live

from dockercomp.broker.acl import Role
from dockercomp.broker.defaults import (
    BROKER_CONFIG_DIR,
    BROKER_CONFIG_ENV,
    BROKER_PID_FILE_ENV,
    BROKER_RELOAD_ENV,
    BROKER_URL_ENV,
    COMPOSE_BROKER_HOST,
    DEFAULT_BROKER_URL,
    DEFAULT_VOLUNTEER,
    MQTTS_PORT,
    ROOT_TOPIC,
)
from dockercomp.broker.errors import InvalidName, SettingsError
from dockercomp.broker.settings import BrokerSettings
from dockercomp.broker.topics import validate_name
from dockercomp.cli import CONTEXT
from dockercomp.cli import Group as CommandGroup
from dockercomp.coordinator import defaults
from dockercomp.coordinator.api import BROKER_CONNECT_TIMEOUT, Client, default_broker, default_db
from dockercomp.coordinator.errors import CoordinatorError, PresenceNotCleared
from dockercomp.coordinator.inputs import open_input, read_arguments
from dockercomp.coordinator.render import (
    accounts_table,
    clear_presence_commands,
    count_progress_bar,
    dumps,
    job_view,
    jobs_table,
    progress_dict,
    results_table,
    worker_dict,
    workers_line,
    workers_table,
    write_atomically,
    write_csv,
    write_jsonl,
)
from dockercomp.coordinator.volunteers import mark_revoked_lost, reload_broker
from dockercomp.exits import Exit, handled

F = TypeVar("F", bound=Callable[..., Any])


def _broker_hint(exc: BaseException) -> BaseException | None:
    """A bad broker URL points at the option that names it."""
    if isinstance(exc, SettingsError) and not exc.hint:
        exc.hint = f"check --broker or ${BROKER_URL_ENV}"
    return None


#: The error handler of every coordinator command (dockercomp.exits).
command_errors = handled(translate=_broker_hint)


def db_option(func: F) -> F:
    return click.option(
        "--db", "db", metavar="PATH|URL", envvar=defaults.DB_URL_ENV, default=default_db,
        show_default=f"${defaults.DB_URL_ENV} or {defaults.DB_PATH}",
        help="Coordinator database: a SQLite file or postgresql://user@host/db (the same as `serve --db`).",
    )(func)  # fmt: skip


def json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of a table.")(func)


def _stdout() -> Console:
    # Built per call: click's test runner swaps sys.stdout for each invocation.
    return Console(soft_wrap=False)


def _stderr() -> Console:
    return Console(stderr=True)


def _echo_json(data: Any) -> None:
    click.echo(dumps(data))


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if verbose < 2:
        logging.getLogger("peewee").setLevel(logging.WARNING)


@click.group(cls=CommandGroup, context_settings=CONTEXT)
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
        _setup_logging(verbose)


# ----------------------------------------------------------------------------------- submit
def _job_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return validate_name(value, "job name")
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
@db_option
@json_option
@command_errors
def submit(function: str, file: str, name: str | None, timeout: float, max_attempts: int,
           db: str, as_json: bool) -> None:  # fmt: skip
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
    with Client(db) as client, count_progress_bar(
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
@main.command(short_help="Progress of every job, or of one.")
@click.argument("job", required=False)
@click.option("--watch", is_flag=True, help="Refresh until the job(s) finish (Ctrl-C stops watching).")
@click.option("--interval", type=click.FloatRange(min=0.05), default=defaults.WATCH_INTERVAL, show_default=True,
              help="Seconds between refreshes with --watch.")
@db_option
@json_option
@command_errors
def status(job: str | None, watch: bool, interval: float, db: str, as_json: bool) -> None:
    """Progress of every job, or of one JOB (id or name) with a progress bar."""
    with Client(db) as client:
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
                    view = Group(jobs_table(progresses), workers_line(client.workers(), not done))
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
@command_errors
def workers(db: str, as_json: bool) -> None:
    """Every worker the coordinator has seen: state, capacity, tasks held and done."""
    with Client(db) as client:
        found = client.workers()
    if as_json:
        _echo_json([worker_dict(w) for w in found])
    elif not found:
        click.echo("No worker has been seen yet: workers appear once `dockercomp coordinator serve` is running "
                   "and an agent connects (`dockercomp agent run --broker URL`).")  # fmt: skip
    else:
        _stdout().print(workers_table(found))


# ---------------------------------------------------------------------------------- results
@main.command(short_help="Each task of a job: value, worker, errors.")
@click.argument("job")
@click.option("--format", "fmt", type=click.Choice(["table", "jsonl", "csv"]), default=None,
              help="table (default on screen), jsonl (default with -o), or csv.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True, allow_dash=True),
              help="Write to this file instead of the screen ('-' for stdout).")
@db_option
@json_option
@command_errors
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
    with Client(db) as client:
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
    count = write_atomically(Path(output), lambda out: writer(rows, out))
    click.echo(f"Wrote {count} results of job {handle.name} to {output} ({fmt}; {progress.done} done, "
               f"{progress.failed} failed, {progress.total - progress.finished} unfinished).", err=True)  # fmt: skip


# ------------------------------------------------------------------------- cancel / retry
@main.command(short_help="Cancel the unfinished tasks of a job.")
@click.argument("job")
@db_option
@json_option
@command_errors
def cancel(job: str, db: str, as_json: bool) -> None:
    """Cancel the unfinished tasks of JOB (pending ones are never sent; running ones are dropped)."""
    with Client(db) as client:
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
    with Client(db) as client:
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
@click.option("--broker", envvar=BROKER_URL_ENV, default=default_broker,
              show_default=f"${BROKER_URL_ENV} or {DEFAULT_BROKER_URL}",
              help="Broker whose retained presence of the purged workers is cleared.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=BROKER_CONNECT_TIMEOUT, show_default=True,
              help="Seconds to wait for the broker.")
@db_option
@json_option
@command_errors
def purge(older_than: float, broker: str, timeout: float, db: str, as_json: bool) -> None:
    """Purge lost workers now, and clear their retained presence on the broker.

    The store is purged even when the broker is unreachable; the command then says which
    retained messages are left and exits with code 5.
    """
    with Client(db) as client:
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
        raise PresenceNotCleared(f"their retained presence is still on the broker: {report.broker_error}",
                                 "clear it by hand once the broker is reachable:\n"
                                 + clear_presence_commands(where, report.topics))


# ------------------------------------------------------------------------------------ serve
@main.command(short_help="Run the engine: dispatch tasks, collect results.")
@click.option("--broker", envvar=BROKER_URL_ENV, default=DEFAULT_BROKER_URL, show_default=True,
              help=f"Broker URL, mqtt[s]://user:pass@host:port (or ${BROKER_URL_ENV}).")
@click.option("--db", envvar=defaults.DB_URL_ENV, default=defaults.DB_PATH, show_default=True,
              help=f"SQLite file or postgresql://user:pass@host:port/db (or ${defaults.DB_URL_ENV}).")
@click.option("--purge-after", type=float, default=defaults.PURGE_AFTER, show_default=True, metavar="S",
              help="Seconds a lost worker is kept before it is purged and its presence cleared.")
@click.option("--lease-check", type=float, default=defaults.LEASE_CHECK_INTERVAL, show_default=True,
              metavar="S", help="Seconds between checks for expired leases.")
@click.option("--lease-margin", type=float, default=defaults.LEASE_MARGIN, show_default=True, metavar="S",
              help="Seconds added to a task's timeout before its lease expires and it is sent again.")
@click.option("--rebirth-timeout", type=float, default=defaults.REBIRTH_TIMEOUT, show_default=True, metavar="S",
              help="Seconds a worker has to answer a rebirth request before it is presumed lost.")
@click.option("--client-id", default=None, help="MQTT client id (default: derived from host and pid).")
@click.option("-v", "--verbose", count=True, help="-v: workers, jobs and leases; -vv: debug.")
@command_errors
def serve(broker: str, db: str, purge_after: float, lease_check: float, lease_margin: float,
          rebirth_timeout: float, client_id: str | None, verbose: int) -> None:
    """Hand out tasks to workers, collect their results, and publish status, until stopped.

    First SIGINT/SIGTERM: stop taking messages, publish the last status and an offline
    presence, disconnect cleanly. A second one: exit at once (the broker publishes our will).
    """
    from dockercomp.coordinator.service import Coordinator, CoordinatorSettings

    _setup_logging(verbose)
    settings = CoordinatorSettings(purge_after=purge_after, lease_check=lease_check, lease_margin=lease_margin,
                                   rebirth_timeout=rebirth_timeout)
    coordinator = Coordinator.connect(broker, db, settings, client_id=client_id)
    signals = 0

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            coordinator.request_stop()
        else:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    coordinator.start()
    click.echo(f"coordinator serving {coordinator.store.url} via {coordinator.transport_url} "
               f"(Ctrl-C to stop)", err=True)
    try:
        coordinator.wait()
    except KeyboardInterrupt:
        click.echo("stopped at once", err=True)
        raise SystemExit(Exit.INTERRUPTED) from None
    if coordinator.error is not None:
        raise CoordinatorError(f"the coordinator stopped: {coordinator.error}")
    click.echo("coordinator stopped", err=True)


# ------------------------------------------------------------------------------- volunteers
def _dir_option(func: F) -> F:
    return click.option("--dir", "config_dir", envvar=BROKER_CONFIG_ENV, default=BROKER_CONFIG_DIR,
                        show_default=True, type=click.Path(file_okay=False, path_type=Path),
                        help=f"Broker config directory (passwd, acl, certs/) [env {BROKER_CONFIG_ENV}]")(func)


def _reload_options(func: F) -> F:
    func = click.option("--reload-command", envvar=BROKER_RELOAD_ENV,
                        help="Command that makes the broker reload, e.g. 'docker compose kill -s HUP "
                             f"mosquitto' [env {BROKER_RELOAD_ENV}]")(func)
    func = click.option("--pid-file", envvar=BROKER_PID_FILE_ENV, type=click.Path(dir_okay=False, path_type=Path),
                        help=f"The broker's pid file; it gets SIGHUP [env {BROKER_PID_FILE_ENV}]")(func)
    return click.option("--broker", "broker_url", envvar=BROKER_URL_ENV,
                        help="The coordinator's broker URL, to mark a revoked volunteer's workers lost "
                             f"[env {BROKER_URL_ENV}; default: from coordinator.env]")(func)


def _warn(message: str) -> None:
    click.echo(message, err=True)


@main.group()
def volunteers() -> None:
    """Broker accounts of volunteers (and of the coordinator and observers)."""


@volunteers.command("init")
@_dir_option
@click.option("--root", default=ROOT_TOPIC, show_default=True, help="Topic root the ACL covers.")
@click.option("--broker-host", default=COMPOSE_BROKER_HOST, show_default=True,
              help="Broker host name the coordinator uses (in its .env file).")
@click.option("--local-workers/--no-local-workers", default=True, show_default=True,
              help=f"Also make the '{DEFAULT_VOLUNTEER}' volunteer for docker-compose's own workers.")
@click.option("--json", "as_json", is_flag=True, help="Print what was created as JSON.")
@command_errors
def volunteers_init(config_dir: Path, root: str, broker_host: str, local_workers: bool, as_json: bool) -> None:
    """Create the coordinator's account, the ACL and .env files (run once, before the broker)."""
    from dockercomp.broker.accounts import Accounts

    accounts = Accounts(config_dir, root)
    created = accounts.init(local_workers=local_workers, broker_host=broker_host)
    if as_json:
        click.echo(json.dumps({"dir": str(config_dir), "created": [c.name for c in created],
                               "env_files": [str(accounts.env_file(c.name)) for c in created]}))
        return
    for creds in created:
        click.echo(f"created account {creds.name!r} ({creds.role.value}); its broker URL is in "
                   f"{accounts.env_file(creds.name)}")
    if not created:
        click.echo(f"{config_dir} is set up already; the ACL was rewritten")
    if not accounts.certs.server_cert.exists():
        click.echo("next: `dockercomp broker certs init --host YOUR.HOST.NAME` for the TLS listener")


@volunteers.command("add")
@click.argument("name")
@_dir_option
@click.option("--role", type=click.Choice([r.value for r in Role]), default=Role.VOLUNTEER.value, show_default=True,
              help="volunteer: runs workers; observer: reads status only.")
@click.option("--host", help="Broker host name volunteers connect to [default: the TLS certificate's first name]")
@click.option("--port", type=click.IntRange(1, 65535), default=MQTTS_PORT, show_default=True,
              help="Broker port volunteers connect to.")
@click.option("--reset-password", is_flag=True, help="Give an existing account a new password (revokes the old).")
@_reload_options
@click.option("--json", "as_json", is_flag=True, help="Print the account, URL and install command as JSON.")
@command_errors
def volunteers_add(name: str, config_dir: Path, role: str, host: str | None, port: int, reset_password: bool,
                   pid_file: Path | None, reload_command: str | None, broker_url: str | None, as_json: bool) -> None:
    """Create an account and print the one-line install command for that volunteer."""
    from dockercomp.broker.accounts import Accounts, broker_url_for, install_command
    from dockercomp.broker.certs import certificate_hosts

    accounts = Accounts(config_dir)
    certs = accounts.certs
    if host is None:
        hosts = certificate_hosts(certs.server_cert) if certs.server_cert.exists() else []
        if not hosts:
            raise click.UsageError("pass --host: the name volunteers reach the broker by "
                                   "(or run `dockercomp broker certs init --host NAME` first)")
        host = hosts[0]
    creds = accounts.add(name, Role(role), reset=reset_password)
    ca_file = str(certs.ca_cert) if certs.ca_cert.exists() else None
    # For `dockercomp agent run` on their machine (?ca= the path they saved ca.crt to) ...
    url = broker_url_for(creds, host, port, ca_file=Path(ca_file).name if ca_file else None, root=accounts.root)
    # ... and for the installer, which takes the CA file apart and puts it in the containers.
    command = install_command(broker_url_for(creds, host, port, root=accounts.root), ca_file)
    reloaded = reload_broker(pid_file, reload_command, _warn, quiet=as_json)
    # A new password cut the old connections off, without their wills (see mark_workers_lost).
    marked = mark_revoked_lost(config_dir, name, broker_url, _warn) if reset_password and reloaded else None
    if as_json:  # the password is shown this once: adding the account is this command's purpose
        click.echo(json.dumps({"name": creds.name, "role": creds.role.value, "password": creds.password,
                               "url": url, "ca_file": ca_file, "install_command": command, "reloaded": reloaded,
                               "marked_lost": marked}))
        return
    click.echo(f"account {creds.name!r} ({creds.role.value}) {'has a new password' if reset_password else 'created'}; "
               "the password is shown only now:")
    click.echo(f"  broker URL: {url}")
    if creds.role is Role.VOLUNTEER:
        click.echo(f"send {creds.name} (privately) install_me.sh" + (f" and {ca_file}" if ca_file else "")
                   + ", and this command:")
        click.echo(command)


@volunteers.command("list")
@_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@command_errors
def volunteers_list(config_dir: Path, as_json: bool) -> None:
    """Show every account and its role."""
    from dockercomp.broker.accounts import Accounts

    rows = Accounts(config_dir).all()
    if as_json:
        click.echo(json.dumps([{**asdict(a), "role": a.role.value} for a in rows]))
    else:
        Console().print(accounts_table(rows, str(config_dir)))


@volunteers.command("remove")
@click.argument("name")
@_dir_option
@click.option("--force", is_flag=True, help="Allow removing the coordinator's own account.")
@_reload_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@command_errors
def volunteers_remove(name: str, config_dir: Path, force: bool, pid_file: Path | None, reload_command: str | None,
                      broker_url: str | None, as_json: bool) -> None:
    """Revoke an account: on reload its workers are disconnected and cannot reconnect, and the
    coordinator hands their tasks to other workers."""
    from dockercomp.broker.accounts import Accounts

    account = Accounts(config_dir).remove(name, allow_coordinator=force)
    reloaded = reload_broker(pid_file, reload_command, _warn, quiet=as_json)
    revoked_volunteer = reloaded and account.role is Role.VOLUNTEER
    marked = mark_revoked_lost(config_dir, name, broker_url, _warn) if revoked_volunteer else None
    if as_json:
        click.echo(json.dumps({"name": account.name, "role": account.role.value, "removed": True,
                               "reloaded": reloaded, "marked_lost": marked}))
        return
    click.echo(f"removed account {account.name!r} ({account.role.value})"
               + ("; its clients were disconnected" if reloaded else ""))
    if marked:
        click.echo(f"marked {len(marked)} worker(s) lost, so their tasks go to others: {', '.join(marked)}")


if __name__ == "__main__":
    main()
