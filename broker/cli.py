"""`broker` command line: `broker serve` runs the embedded amqtt broker.

The click layer only parses options, calls broker.embedded and maps failures to one
readable line and an exit code.
"""

from __future__ import annotations

import logging
import sys

import click

from broker.embedded import (
    AddressInUseError,
    BindError,
    EmbeddedBroker,
    EmbeddedBrokerError,
    serve_forever,
)

# Exit codes: 2 = the command line must change (click uses 2 for usage errors as well),
# 1 = any other failure to start.
EXIT_ADDRESS_PROBLEM = 2
EXIT_FAILURE = 1


@click.group()
def main() -> None:
    """dockercomp MQTT broker tools."""


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    default=1883,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="TCP port; 0 picks a free one (the URL printed shows which).",
)
@click.option("-v", "--verbose", count=True, help="Log connections (-v) or every packet (-vv).")
def serve(host: str, port: int, verbose: int) -> None:
    """Run an in-process MQTT 3.1.1 broker (amqtt) for laptops and demos.

    Production deployments use Mosquitto with the repository's mosquitto.conf.
    """
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

    def announce(embedded: EmbeddedBroker) -> None:
        click.echo(f"dockercomp embedded broker listening on {embedded.url} — Ctrl-C to stop")

    try:
        serve_forever(host, port, verbosity=verbose, on_ready=announce)
    except AddressInUseError as exc:
        click.echo(
            f"error: {exc.host}:{exc.port} is already in use (another broker?) — stop it, "
            f"or pick another port with --port N (--port 0 picks a free one)",
            err=True,
        )
        sys.exit(EXIT_ADDRESS_PROBLEM)
    except BindError as exc:
        click.echo(f"error: {exc} — pick another --host/--port", err=True)
        sys.exit(EXIT_ADDRESS_PROBLEM)
    except EmbeddedBrokerError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_FAILURE)
    click.echo("dockercomp embedded broker stopped")


if __name__ == "__main__":
    main()
