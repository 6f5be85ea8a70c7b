"""`broker` command line: `dockercomp broker serve` runs the embedded amqtt broker.

The click layer only parses options, calls broker.embedded and maps failures to one
readable line and an exit code.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from dockercomp.broker.amqtt_security import Guard
from dockercomp.broker.embedded import (
    AddressInUseError,
    BindError,
    EmbeddedBroker,
    EmbeddedBrokerError,
    serve_forever,
)
from dockercomp.broker.errors import SettingsError
from dockercomp.broker.passwords import atomic_write

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
@click.option("--password-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Mosquitto password file (`dockercomp coordinator volunteers init` makes one): only its "
                   "accounts may connect. Without it, anyone may (anonymous).")
@click.option("--acl-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Mosquitto ACL file confining each account to its topics (needs --password-file).")
@click.option("--allow-anonymous", is_flag=True,
              help="With --password-file: also let clients without an account in (the ACL's "
                   "anonymous lines apply: read-only status).")
@click.option("--pid-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Write this process id here, so `dockercomp coordinator volunteers` can send SIGHUP "
                   "(reloads both files and disconnects removed accounts).")
@click.option("-v", "--verbose", count=True, help="Log connections (-v) or every packet (-vv).")
def serve(host: str, port: int, password_file: Path | None, acl_file: Path | None, allow_anonymous: bool,
          pid_file: Path | None, verbose: int) -> None:
    """Run an in-process MQTT 3.1.1 broker (amqtt) for laptops and demos.

    Production deployments use Mosquitto with the repository's mosquitto.conf.
    """
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if (acl_file or allow_anonymous) and password_file is None:
        click.echo("error: --acl-file and --allow-anonymous need --password-file", err=True)
        sys.exit(EXIT_ADDRESS_PROBLEM)
    guard = None
    if password_file is not None:
        try:
            guard = Guard(password_file, acl_file, allow_anonymous=allow_anonymous)
        except SettingsError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_ADDRESS_PROBLEM)

    def announce(embedded: EmbeddedBroker) -> None:
        if pid_file is not None:
            atomic_write(pid_file, f"{os.getpid()}\n")
        access = "password file " + str(password_file) if guard else "anonymous clients allowed"
        click.echo(f"dockercomp embedded broker listening on {embedded.url} ({access}) — Ctrl-C to stop")

    try:
        serve_forever(host, port, verbosity=verbose, guard=guard, on_ready=announce)
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
    finally:
        if pid_file is not None:
            pid_file.unlink(missing_ok=True)
    click.echo("dockercomp embedded broker stopped")


if __name__ == "__main__":
    main()
