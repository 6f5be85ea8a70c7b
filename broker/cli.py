"""`dockercomp broker`: run the embedded broker (`serve`) and make its TLS files (`certs init`).

The click layer only parses options, calls the library (broker.embedded, broker.certs) and
leaves failures to dockercomp.exits: one readable line and a hint, or one JSON object with
--json, and the exit code of the table there.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import click

from dockercomp.broker.defaults import BROKER_CONFIG_DIR, BROKER_CONFIG_ENV, MQTT_PORT, SERVER_CERT_DAYS
from dockercomp.broker.errors import AdminError, SettingsError
from dockercomp.cli import CONTEXT, Group
from dockercomp.exits import Exit, handled

if TYPE_CHECKING:
    from dockercomp.broker.embedded import EmbeddedBroker


def _embedded_errors(exc: BaseException) -> BaseException | None:
    """The embedded broker's errors (they carry no exit codes) as administration errors."""
    # Imported here: amqtt is the broker extra's, and `dockercomp broker certs` does not need it.
    from dockercomp.broker.embedded import AddressInUseError, BindError, EmbeddedBrokerError

    if isinstance(exc, AddressInUseError):
        return AdminError(f"{exc.host}:{exc.port} is already in use (another broker?)",
                          "stop it, or pick another port with --port N (--port 0 picks a free one)")
    if isinstance(exc, BindError):
        return AdminError(str(exc), "pick another --host/--port")
    if isinstance(exc, EmbeddedBrokerError):
        return AdminError(str(exc), exit_code=Exit.FAILED)
    if isinstance(exc, SettingsError):  # the password or ACL file
        return AdminError(str(exc), "fix --password-file / --acl-file")
    return None


@click.group(cls=Group, context_settings=CONTEXT)
def main() -> None:
    """dockercomp MQTT broker: the embedded broker, and its TLS certificates."""


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    default=MQTT_PORT,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="TCP port; 0 picks a free one (the URL printed shows which).",
)
@click.option("--ws-port", type=click.IntRange(0, 65535),
              help="Also listen for MQTT over WebSockets on this port, for browsers (`dockercomp coordinator "
                   "dashboard`); 0 picks a free one. Same accounts and ACL as --port.")
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
@handled(translate=_embedded_errors)
def serve(host: str, port: int, ws_port: int | None, password_file: Path | None, acl_file: Path | None,
          allow_anonymous: bool, pid_file: Path | None, verbose: int) -> None:
    """Run an in-process MQTT 3.1.1 broker (amqtt) for laptops and demos.

    Production deployments use Mosquitto with the repository's mosquitto.conf.
    """
    from dockercomp.broker.amqtt_security import Guard
    from dockercomp.broker.embedded import serve_forever
    from dockercomp.broker.passwords import atomic_write

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if (acl_file or allow_anonymous) and password_file is None:
        raise click.UsageError("--acl-file and --allow-anonymous need --password-file")
    guard = Guard(password_file, acl_file, allow_anonymous=allow_anonymous) if password_file is not None else None

    def announce(embedded: EmbeddedBroker) -> None:
        if pid_file is not None:
            atomic_write(pid_file, f"{os.getpid()}\n")
        access = "password file " + str(password_file) if guard else "anonymous clients allowed"
        websockets = f" and {embedded.ws_url}" if embedded.ws_url else ""
        click.echo(f"dockercomp embedded broker listening on {embedded.url}{websockets} ({access}) — Ctrl-C to stop")

    try:
        serve_forever(host, port, verbosity=verbose, guard=guard, on_ready=announce, ws_port=ws_port)
    finally:
        if pid_file is not None:
            pid_file.unlink(missing_ok=True)
    click.echo("dockercomp embedded broker stopped")


@main.group()
def certs() -> None:
    """TLS certificates for a self-hosted broker (a private CA and a server certificate)."""


@certs.command("init")
@click.option("--dir", "config_dir", envvar=BROKER_CONFIG_ENV, default=BROKER_CONFIG_DIR, show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help=f"Broker config directory; files go to DIR/certs/ [env {BROKER_CONFIG_ENV}]")
@click.option("--host", "hosts", multiple=True, required=True,
              help="Name or IP address volunteers use to reach the broker (repeat for several).")
@click.option("--new-ca", is_flag=True, help="Replace the CA too (every volunteer then needs the new ca.crt).")
@click.option("--days", type=click.IntRange(min=1), default=SERVER_CERT_DAYS, show_default=True,
              help="Validity of the server certificate.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
@handled
def certs_init(config_dir: Path, hosts: tuple[str, ...], new_ca: bool, days: int, as_json: bool) -> None:
    """Make a CA (once) and a server certificate for the broker's TLS listener (8883)."""
    from dockercomp.broker.certs import init_certs  # cryptography: only this command needs it

    issued = init_certs(config_dir, hosts, new_ca=new_ca, server_days=days)
    if as_json:
        click.echo(json.dumps(asdict(issued)))
        return
    click.echo(("created a new CA: " if issued.ca_created else "kept the existing CA: ") + issued.ca_cert)
    click.echo(f"server certificate for {', '.join(issued.hosts)} (until {issued.expires}): {issued.server_cert}")
    click.echo("next: restart the broker to load it (docker-compose restart mosquitto), and give volunteers "
               f"{issued.ca_cert}; their broker URL ends in ?ca=/path/to/ca.crt")


if __name__ == "__main__":
    main()
