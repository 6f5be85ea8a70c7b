"""`dockercomp coordinator`: the scientist's commands, thin over coordinator.api.

Each command parses, calls the library, and prints a rich table (or one JSON document with
``--json``). Failures go through dockercomp.exits: one line saying what to do (one JSON
object on stderr with --json) and an exit code from the table shared by every role.
This module holds the group, the shared options and `serve` (the engine); the commands live
by domain noun: cli_jobs.py (submit, status, results, ...) and cli_workers.py (workers, purge,
volunteers: broker accounts, marking a revoked volunteer's workers lost).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any, TypeVar

import click
from rich.console import Console

from dockercomp.broker.defaults import BROKER_URL_ENV, DEFAULT_BROKER_URL
from dockercomp.broker.errors import SettingsError
from dockercomp.cli import CONTEXT
from dockercomp.cli import Group as CommandGroup
from dockercomp.coordinator import defaults
from dockercomp.coordinator.api import Client, default_db
from dockercomp.coordinator.errors import CoordinatorError
from dockercomp.coordinator.render import WIDE_COLUMNS, dumps
from dockercomp.coordinator.settings import cap_options, metrics_options
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


def wide_option(func: F) -> F:
    return click.option("--wide", is_flag=True,
                        help="Never cut a table to the terminal's width (always so when piped).")(func)


def _stdout(wide: bool = False) -> Console:
    # Built per call: click's test runner swaps sys.stdout for each invocation. Piped (or
    # --wide), tables take the width they need: rich would otherwise cut them at 80 columns.
    console = Console(soft_wrap=False)
    if wide or not console.is_terminal:
        return Console(soft_wrap=False, width=WIDE_COLUMNS)
    return console


def reader(db: str) -> Client:
    """A client for a command that only reads or changes what exists: it never creates a
    database (DatabaseMissing names the path it looked at)."""
    return Client(db, create=False)


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
@cap_options
@click.option("--fail-unroutable", type=click.FloatRange(min=0), default=defaults.FAIL_UNROUTABLE, show_default=True,
              metavar="S", help="Fail the pending tasks of a job whose function no online worker has offered "
                                "for S seconds (a misspelt function); 0: never.")
@click.option("--rebirth-timeout", type=float, default=defaults.REBIRTH_TIMEOUT, show_default=True, metavar="S",
              help="Seconds a worker has to answer a rebirth request before it is presumed lost.")
@click.option("--heartbeat-misses", type=float, default=defaults.HEARTBEAT_MISSES, show_default=True, metavar="N",
              help="A worker that announces heartbeats is lost after N of its intervals without one, plus "
                   "--heartbeat-slack (its work goes to others at once).")
@click.option("--heartbeat-slack", type=float, default=defaults.HEARTBEAT_SLACK, show_default=True, metavar="S",
              help="Seconds added to that bound, for a loaded machine or broker.")
@metrics_options
@click.option("--client-id", default=None,
              help="MQTT client id, the name of the coordinator's persistent session [default: "
                   f"{defaults.CLIENT_ID_TEMPLATE.format(root='ROOT')}, the same for every coordinator of a root, "
                   "so a restarted or standby one takes its session over].")
@click.option("--clean-session", is_flag=True,
              help="Start with a clean MQTT session each time: results published while the coordinator is "
                   "disconnected then come only when their tasks are sent again.")
@click.option("-v", "--verbose", count=True, help="-v: workers, jobs and leases; -vv: debug.")
@command_errors
def serve(broker: str, db: str, purge_after: float, lease_check: float, lease_margin: float,
          fail_unroutable: float, rebirth_timeout: float, heartbeat_misses: float, heartbeat_slack: float,
          client_id: str | None, clean_session: bool, verbose: int, metrics_port: int | None, metrics_host: str,
          **caps: int) -> None:
    """Hand out tasks to workers, collect their results, and publish status, until stopped.

    First SIGINT/SIGTERM: stop taking messages, publish the last status and an offline
    presence, disconnect cleanly. A second one: exit at once (the broker publishes our will).
    """
    from dockercomp.coordinator.service import Coordinator, CoordinatorSettings

    _setup_logging(verbose)
    settings = CoordinatorSettings(purge_after=purge_after, lease_check=lease_check, lease_margin=lease_margin,
                                   fail_unroutable=fail_unroutable, rebirth_timeout=rebirth_timeout,
                                   heartbeat_misses=heartbeat_misses, heartbeat_slack=heartbeat_slack, **caps)
    coordinator = Coordinator.connect(broker, db, settings, client_id=client_id, persistent=not clean_session)
    metrics = None
    if metrics_port is not None:
        from dockercomp.coordinator.metrics import MetricsServer

        metrics = MetricsServer(coordinator, metrics_host, metrics_port).start()
        click.echo(f"metrics at {metrics.url}", err=True)
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
    finally:
        if metrics is not None:
            metrics.stop()
    if coordinator.error is not None:
        raise CoordinatorError(f"the coordinator stopped: {coordinator.error}")
    click.echo("coordinator stopped", err=True)



# The commands live by domain noun in their own modules; importing them registers them on `main`.
from dockercomp.coordinator import cli_jobs, cli_workers  # noqa: E402,F401
from dockercomp.coordinator import cli_kit  # noqa: E402,F401
from dockercomp.coordinator import cli_dashboard  # noqa: E402,F401 - issue 13
from dockercomp.coordinator.cli_workers import volunteers  # noqa: E402,F401 - tests import it from here

if __name__ == "__main__":
    main()
