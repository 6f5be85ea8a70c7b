"""`dockercomp coordinator` commands about workers and accounts: workers, purge, volunteers.

Registered on the `main` group of coordinator/cli.py (which imports this module).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click
from rich.console import Console

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
from dockercomp.broker.settings import BrokerSettings
from dockercomp.coordinator import defaults
from dockercomp.coordinator.api import BROKER_CONNECT_TIMEOUT, default_broker
from dockercomp.coordinator.cli import F, _echo_json, _stdout, command_errors, db_option, json_option, main, reader, wide_option
from dockercomp.coordinator.cli_trust import register as register_trust_commands
from dockercomp.coordinator.errors import PresenceNotCleared
from dockercomp.coordinator.render import accounts_table, clear_presence_commands, worker_dict, workers_table
from dockercomp.coordinator.volunteers import mark_revoked_lost, reload_broker


# ---------------------------------------------------------------------------------- workers
@main.command(short_help="Workers seen: state, capacity, work done.")
@db_option
@json_option
@wide_option
@command_errors
def workers(db: str, as_json: bool, wide: bool) -> None:
    """Every worker the coordinator has seen: state, capacity, tasks running and queued on it,
    tasks done. With `serve` stopped or cut off from its broker, states are the last known."""
    with reader(db) as client:
        found = client.workers()
        alive = client.liveness()
    if as_json:
        _echo_json([worker_dict(w) for w in found])
        return
    if not found:
        click.echo("No worker has been seen yet: workers appear once `dockercomp coordinator serve` is running "
                   "and an agent connects (`dockercomp agent run --broker URL`).")  # fmt: skip
    else:
        _stdout(wide).print(workers_table(found, live=alive.live))
    if not alive.live:
        click.echo(alive.sentence())
    elif alive.active():  # several `serve` may share the database: say which one runs it
        click.echo(alive.active())


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
    with reader(db) as client:
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


# ------------------------------------------------------------------------------- volunteers
def _dir_option(func: F) -> F:
    return click.option("--dir", "config_dir", envvar=BROKER_CONFIG_ENV, default=BROKER_CONFIG_DIR,
                        show_default=True, type=click.Path(file_okay=False, path_type=Path),
                        help=f"Broker config directory (passwd, acl, certs/) [env {BROKER_CONFIG_ENV}]")(func)


def _reload_options(func: F) -> F:
    func = click.option("--reload-command", envvar=BROKER_RELOAD_ENV,
                        help="Command that makes the broker reload, e.g. 'docker-compose kill -s HUP "
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


register_trust_commands(volunteers)  # volunteers stats / release (cli_trust.py)

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
    kit = config_dir / defaults.KIT_DIR  # where `kit build` writes: then the line downloads from the kit
    command = install_command(broker_url_for(creds, host, port, root=accounts.root), ca_file, kit)
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
        if command.startswith("curl"):
            click.echo(f"send {creds.name} (privately) this command:")
        else:
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

