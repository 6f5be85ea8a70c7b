"""`dockercomp coordinator serve`: run the engine until Ctrl-C / SIGTERM.

A thin click layer over ``coordinator.service.Coordinator``: it parses options, builds the
settings, runs the engine and maps failures to one readable line and a distinct exit code.
The CLI module adds it to the ``coordinator`` group with ``main.add_command(serve)``.

First SIGINT/SIGTERM: stop taking messages, publish the last status and an offline presence,
disconnect cleanly. A second one: exit at once (the broker then publishes our will).
"""

from __future__ import annotations

import logging
import signal
import sys
from types import FrameType

import click

from dockercomp.broker.defaults import BROKER_URL_ENV
from dockercomp.broker.errors import ConnectionFailed
from dockercomp.broker.errors import SettingsError as BrokerSettingsError
from dockercomp.coordinator import defaults
from dockercomp.coordinator.errors import CoordinatorError, StoreError
from dockercomp.coordinator.service import Coordinator, CoordinatorSettings

# Exit codes (as the other coordinator commands): 2 bad option, 4 database problem,
# 5 broker unreachable, 1 anything else,
# 130 stopped at once by a second signal.
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_BROKER = 5
EXIT_STORE = 4
EXIT_FORCED = 130


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@click.command()
@click.option("--broker", envvar=BROKER_URL_ENV, default="mqtt://127.0.0.1:1883", show_default=True,
              help=f"Broker URL, mqtt[s]://user:pass@host:port (or ${BROKER_URL_ENV}).")
@click.option("--db", envvar=defaults.DB_URL_ENV, default=defaults.DB_PATH, show_default=True,
              help=f"SQLite file or postgresql://user:pass@host:port/db (or ${defaults.DB_URL_ENV}).")
@click.option("--purge-after", type=float, default=defaults.PURGE_AFTER, show_default=True, metavar="S",
              help="Seconds a lost worker is kept before it is purged and its presence cleared.")
@click.option("--lease-check", type=float, default=defaults.LEASE_CHECK_INTERVAL, show_default=True,
              metavar="S", help="Seconds between checks for expired leases.")
@click.option("--lease-margin", type=float, default=defaults.LEASE_MARGIN, show_default=True, metavar="S",
              help="Seconds added to a task's timeout before its lease expires and it is sent again.")
@click.option("--client-id", default=None, help="MQTT client id (default: derived from host and pid).")
@click.option("-v", "--verbose", count=True, help="-v: workers, jobs and leases; -vv: debug.")
def serve(broker: str, db: str, purge_after: float, lease_check: float, lease_margin: float,
          client_id: str | None, verbose: int) -> None:
    """Hand out tasks to workers, collect their results, and publish status, until stopped."""
    logging.basicConfig(
        level=logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if verbose < 2:
        logging.getLogger("peewee").setLevel(logging.WARNING)
    try:
        settings = CoordinatorSettings(purge_after=purge_after, lease_check=lease_check,
                                       lease_margin=lease_margin)
        coordinator = Coordinator.connect(broker, db, settings, client_id=client_id)
    except BrokerSettingsError as exc:
        _fail(f"{exc}", EXIT_USAGE)
    except CoordinatorError as exc:
        _fail(str(exc), exc.exit_code)

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
    try:
        coordinator.start()
    except ConnectionFailed as exc:
        _fail(f"{exc} (or fix --broker)", EXIT_BROKER)
    except StoreError as exc:
        _fail(str(exc), EXIT_STORE)
    click.echo(f"coordinator serving {coordinator.store.url} via {coordinator.transport_url} "
               f"(Ctrl-C to stop)", err=True)
    try:
        coordinator.wait()
    except KeyboardInterrupt:
        click.echo("stopped at once", err=True)
        sys.exit(EXIT_FORCED)
    if coordinator.error is not None:
        _fail(f"the coordinator stopped: {coordinator.error}", EXIT_FAILURE)
    click.echo("coordinator stopped", err=True)
