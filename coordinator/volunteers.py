"""Broker accounts: volunteers (and the coordinator and observers), their passwords and ACL.

Every account lives in one directory (``broker-config/``, which docker-compose mounts into
the broker at ``/mosquitto/security/``)::

    passwd          Mosquitto password file ($7$ PBKDF2-SHA512 hashes; broker/passwords.py)
    acl             Mosquitto ACL file, generated from the roles (broker/acl.py)
    accounts.json   role and creation time of each account, and the topic root
    coordinator.env DOCKERCOMP_BROKER=mqtt://coordinator:PASSWORD@mosquitto:1883 (mode 0600)
    worker.env      the same for the `local` volunteer of docker-compose's own workers
    certs/          the TLS CA and server certificate (coordinator/certs.py)

Passwords are random (144 bits) and shown once: only their hashes are kept. After each
change the broker must reload the files: ``Reloader`` sends SIGHUP to the pid in a pid
file, or runs a command such as ``docker compose kill -s HUP mosquitto``. Mosquitto 2.0
then disconnects every client of a removed account, and refuses it from then on; so does
``dockercomp broker serve --password-file`` (amqtt). Mosquitto publishes no will for those connections,
so ``mark_workers_lost`` does, as the coordinator: their tasks go to other workers at once.

Library use::

    accounts = Accounts("broker-config")
    accounts.init()                           # the coordinator account, once
    creds = accounts.add("alice")             # a volunteer; creds.password is shown once
    Reloader(pid_file="/run/mosquitto.pid").reload()
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NoReturn

import click

from dockercomp.broker.acl import Role, render_acl
from dockercomp.broker.connection import MqttConnection
from dockercomp.broker.defaults import (
    BROKER_CONFIG_DIR,
    BROKER_CONFIG_ENV,
    BROKER_PID_FILE_ENV,
    BROKER_RELOAD_ENV,
    BROKER_URL_ENV,
    COORDINATOR_ACCOUNT,
    DEFAULT_VOLUNTEER,
    MQTT_PORT,
    MQTTS_PORT,
    ROOT_TOPIC,
)
from dockercomp.broker.errors import BrokerError, DecodeError, InvalidName
from dockercomp.broker.messages import OfflineReason, Presence, PresenceState
from dockercomp.broker.passwords import PasswordFile, atomic_write, new_password
from dockercomp.broker.settings import BrokerSettings
from dockercomp.broker.topics import Topics, validate_name
from dockercomp.coordinator.certs import CertPaths, certificate_hosts
from dockercomp.coordinator.errors import CoordinatorError

# Exit codes: 2 = the command line must change, 3 = no such account, 4 = files or broker reload failed.
EXIT_USAGE = 2
EXIT_UNKNOWN = 3
EXIT_FILES = 4
# Seconds a reload command may take (docker compose can be slow to start).
RELOAD_TIMEOUT = 60.0
# Seconds without a new retained presence after which all of a volunteer's were received.
SETTLE_SECONDS = 0.5
# Host name of the broker inside docker-compose's network (the service name).
COMPOSE_BROKER_HOST = "mosquitto"
# The command volunteers run; the scientist hands them installer/install_me.sh.
INSTALL_SCRIPT = "install_me.sh"
_ACCOUNTS_VERSION = 1


class VolunteerError(CoordinatorError):
    """An account cannot be added, removed or listed; ``exit_code`` tells the CLI which kind."""

    exit_code = EXIT_USAGE


class UnknownAccount(VolunteerError, LookupError):
    exit_code = EXIT_UNKNOWN


class ReloadError(VolunteerError):
    """The files changed but the broker did not reload them: the change is not in force yet."""

    exit_code = EXIT_FILES


@dataclass(frozen=True)
class Account:
    name: str
    role: Role
    created: float  # Unix time; 0 for accounts added by hand with mosquitto_passwd


@dataclass(frozen=True)
class Credentials:
    """A new account's password: shown once, never stored in clear (except the .env files)."""

    name: str
    role: Role
    password: str


class Accounts:
    """passwd, acl and accounts.json of one broker, changed together under a file lock."""

    def __init__(self, directory: str | Path, root: str | None = None) -> None:
        self.directory = Path(directory)
        self._root = root

    # -- paths -----------------------------------------------------------------------------
    @property
    def passwd(self) -> Path:
        return self.directory / "passwd"

    @property
    def acl(self) -> Path:
        return self.directory / "acl"

    @property
    def registry(self) -> Path:
        return self.directory / "accounts.json"

    @property
    def certs(self) -> CertPaths:
        return CertPaths.under(self.directory)

    def env_file(self, name: str) -> Path:
        return self.directory / ("coordinator.env" if name == COORDINATOR_ACCOUNT else "worker.env")

    @property
    def root(self) -> str:
        return self._root or str(self._load().get("root") or ROOT_TOPIC)

    # -- queries ---------------------------------------------------------------------------
    def all(self) -> list[Account]:
        """Every account in the password file, with its role (volunteer if unrecorded)."""
        known = self._load().get("accounts", {})
        accounts = []
        for name in sorted(self._passwords().read()):
            info = known.get(name, {})
            try:
                role = Role(info.get("role", Role.VOLUNTEER.value))
            except ValueError:
                role = Role.VOLUNTEER
            accounts.append(Account(name, role, float(info.get("created", 0) or 0)))
        return accounts

    def get(self, name: str) -> Account:
        for account in self.all():
            if account.name == name:
                return account
        raise UnknownAccount(f"no account {name!r} in {self.passwd}; `dockercomp coordinator volunteers list` shows them")

    # -- changes ---------------------------------------------------------------------------
    def init(self, *, local_workers: bool = True, broker_host: str = COMPOSE_BROKER_HOST) -> list[Credentials]:
        """Creates the directory, the coordinator account (and a `local` volunteer for
        docker-compose's own workers) with their .env files, and the ACL. Keeps whatever
        exists already; returns only the accounts it created."""
        created = []
        self.directory.mkdir(parents=True, exist_ok=True)
        existing = {a.name for a in self.all()}
        wanted = [(COORDINATOR_ACCOUNT, Role.COORDINATOR)]
        if local_workers:
            wanted.append((DEFAULT_VOLUNTEER, Role.VOLUNTEER))
        for name, role in wanted:
            if name in existing:
                continue
            creds = self.add(name, role, _allow_reserved=True)
            url = BrokerSettings(host=broker_host, port=MQTT_PORT, username=name, password=creds.password,
                                 root=self.root).full_url
            # Holds a clear-text password: owner-only.
            atomic_write(self.env_file(name), f"DOCKERCOMP_BROKER={url}\n", mode=0o600)
            created.append(creds)
        with self._locked():
            self._write_acl()
        return created

    def add(self, name: str, role: Role = Role.VOLUNTEER, *, password: str | None = None,
            reset: bool = False, _allow_reserved: bool = False) -> Credentials:
        """Creates an account (or with ``reset``, gives an existing one a new password, which
        disconnects its clients on reload). Returns the password, which is not kept."""
        try:
            validate_name(name, "account name")
        except InvalidName as exc:
            raise VolunteerError(str(exc)) from None
        if name == COORDINATOR_ACCOUNT and not _allow_reserved and role is not Role.COORDINATOR:
            raise VolunteerError(f"{name!r} is the coordinator's account name; pick another name")
        password = password or new_password()
        with self._locked():
            data = self._load()
            passwords = self._passwords()
            exists = name in passwords.read()
            if exists and not reset:
                raise VolunteerError(f"account {name!r} exists already; --reset-password gives it a new "
                                     "password (its workers must then be reinstalled)")
            passwords.set(name, password)
            record = data["accounts"].get(name, {})
            data["accounts"][name] = {"role": role.value if not exists else record.get("role", role.value),
                                      "created": record.get("created") or time.time()}
            self._save(data)
            self._write_acl()
        return Credentials(name, Role(data["accounts"][name]["role"]), password)

    def remove(self, name: str, *, allow_coordinator: bool = False) -> Account:
        """Deletes an account; after a reload its clients are disconnected and refused."""
        account = self.get(name)
        if account.role is Role.COORDINATOR and not allow_coordinator:
            raise VolunteerError(f"{name!r} is the coordinator's account: removing it cuts the coordinator "
                                 "off; pass --force if that is what you want")
        with self._locked():
            self._passwords().remove(name)
            data = self._load()
            data["accounts"].pop(name, None)
            self._save(data)
            self._write_acl()
        return account

    # -- files -----------------------------------------------------------------------------
    def _passwords(self) -> PasswordFile:
        # The broker reads this file as its own user (Mosquitto drops root before loading it,
        # verified on 2.0.11; in the eclipse-mosquitto image that is uid 1883, not the host
        # user who owns the file), so it must be world-readable. The hashes are of random
        # 144-bit passwords: knowing them does not help guess the password.
        return PasswordFile(self.passwd, mode=0o644)

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.registry.read_text())
        except FileNotFoundError:
            data = {}
        except (OSError, ValueError) as exc:
            raise VolunteerError(f"cannot read {self.registry}: {exc}; fix or delete it "
                                 "(roles then default to volunteer)") from None
        if not isinstance(data, dict) or not isinstance(data.get("accounts", {}), dict):
            raise VolunteerError(f"{self.registry} is not an accounts file; fix or delete it")
        data.setdefault("accounts", {})
        data.setdefault("root", self._root or ROOT_TOPIC)
        data["v"] = _ACCOUNTS_VERSION
        return data

    def _save(self, data: dict[str, Any]) -> None:
        atomic_write(self.registry, json.dumps(data, indent=2, sort_keys=True) + "\n", mode=0o644)

    def _write_acl(self) -> None:
        roles = {a.name: a.role for a in self.all()}
        Topics(self.root)  # validates the root before it reaches the ACL
        atomic_write(self.acl, render_acl(roles, self.root), mode=0o644)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Two `volunteers add` at once must not lose one another's account."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


@dataclass(frozen=True)
class Reloader:
    """Makes the broker reread passwd and acl: SIGHUP to a pid file's process, or a command."""

    pid_file: Path | None = None
    command: str | None = None

    @property
    def configured(self) -> bool:
        return self.pid_file is not None or bool(self.command)

    def reload(self) -> str:
        """Returns what it did; ReloadError says why the broker did not get the signal."""
        if self.pid_file is not None:
            try:
                pid = int(self.pid_file.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                raise ReloadError(f"cannot read a process id from {self.pid_file}: is the broker running "
                                  "with that pid_file?") from None
            try:
                os.kill(pid, signal.SIGHUP)
            except ProcessLookupError:
                raise ReloadError(f"no process {pid} (from {self.pid_file}): the broker is not running") from None
            except PermissionError:
                raise ReloadError(f"not allowed to signal process {pid}: run this as the broker's user "
                                  "or root") from None
            return f"sent SIGHUP to the broker (pid {pid})"
        if self.command:
            try:
                done = subprocess.run(shlex.split(self.command), capture_output=True, text=True,
                                      timeout=RELOAD_TIMEOUT, check=False)
            except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
                raise ReloadError(f"reload command {self.command!r} failed: {exc}") from None
            if done.returncode != 0:
                detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
                raise ReloadError(f"reload command {self.command!r} failed: {detail[0]}")
            return f"ran {self.command!r}"
        raise ReloadError("no way to reach the broker configured")


def mark_workers_lost(broker: BrokerSettings, volunteer: str, *, settle: float = SETTLE_SECONDS,
                      timeout: float = RELOAD_TIMEOUT) -> list[str]:
    """Publishes, as the coordinator, the will each online worker of ``volunteer`` left behind.

    Mosquitto 2.0 publishes NO will for a connection it closes because the account was removed
    or its password changed (verified on 2.0.11), so the coordinator would go on believing
    those workers online, sending them tasks nobody can read until each lease runs out. The
    offline presence carries the worker's own seq and reason "lost", exactly as its will would.
    Returns the workers marked ("volunteer/worker"); raises BrokerError if unreachable.
    """
    topics = Topics(broker.root)
    seen: dict[str, bytes] = {}
    last = [time.monotonic()]

    def on_message(topic: str, payload: bytes, retained: bool) -> None:
        seen[topic] = payload  # the network thread only records
        last[0] = time.monotonic()

    connection = MqttConnection(broker, f"dockercomp-revoke-{volunteer}-{os.getpid()}")
    connection.on_message = on_message
    connection.subscribe(f"{topics.root}/workers/{volunteer}/+/presence")
    connection.start()
    try:
        connection.wait_connected(timeout)
        last[0] = time.monotonic()
        deadline = time.monotonic() + timeout
        # Retained presences arrive right after the subscription; stop once they stop coming.
        while time.monotonic() - last[0] < settle and time.monotonic() < deadline:
            time.sleep(0.05)
        marked = []
        for topic, payload in sorted(seen.items()):
            try:
                presence = Presence.decode(payload)
            except DecodeError:
                continue
            if presence.state is not PresenceState.ONLINE or presence.volunteer != volunteer:
                continue
            lost = replace(presence, state=PresenceState.OFFLINE, reason=OfflineReason.LOST)
            connection.publish(topic, lost.encode(), qos=1, retain=True)
            marked.append(f"{presence.volunteer}/{presence.worker}")
        connection.flush(timeout)
        return marked
    finally:
        connection.close(timeout=2)


def coordinator_broker(accounts: Accounts, url: str | None) -> BrokerSettings:
    """The coordinator's broker settings: ``url``, else the one in coordinator.env (where the
    compose service name "mosquitto" becomes 127.0.0.1: compose publishes 1883 on loopback)."""
    if url:
        return BrokerSettings.from_url(url)
    env = accounts.env_file(COORDINATOR_ACCOUNT)
    try:
        line = next(l for l in env.read_text().splitlines() if l.startswith("DOCKERCOMP_BROKER="))
    except (OSError, StopIteration):
        raise VolunteerError(f"no broker URL: pass --broker (the coordinator's), or keep {env}") from None
    settings = BrokerSettings.from_url(line.split("=", 1)[1].strip())
    return replace(settings, host="127.0.0.1") if settings.host == COMPOSE_BROKER_HOST else settings


def broker_url_for(creds: Credentials, host: str, port: int = MQTTS_PORT, *, tls: bool = True,
                   ca_file: str | None = None, root: str = ROOT_TOPIC) -> str:
    """The URL a volunteer's agents use (with the password: hand it over privately)."""
    return BrokerSettings(host=host, port=port, username=creds.name, password=creds.password, tls=tls,
                          ca_file=ca_file, root=root).full_url


def install_command(url: str, ca_file: str | None = None) -> str:
    """The one line a volunteer runs. With a private CA they also need ca.crt beside the script."""
    parts = ["sh", INSTALL_SCRIPT, "--broker", shlex.quote(url)]
    if ca_file:
        parts += ["--ca-file", shlex.quote(Path(ca_file).name)]
    return " ".join(parts + ["--yes"])


# --------------------------------------------------------------------------- CLI
def _fail(exc: CoordinatorError) -> NoReturn:
    click.echo(f"error: {exc}", err=True)
    sys.exit(getattr(exc, "exit_code", 1))


def _reload_or_hint(reloader: Reloader, as_json: bool) -> str | None:
    """Reloads if configured; else says how. Returns what happened (None: not reloaded)."""
    if not reloader.configured:
        click.echo("note: the broker has NOT reloaded yet, so this is not in force: run "
                   "`docker compose kill -s HUP mosquitto` (or kill -HUP the broker), or pass "
                   f"--pid-file / --reload-command [env {BROKER_PID_FILE_ENV} / {BROKER_RELOAD_ENV}]", err=True)
        return None
    try:
        done = reloader.reload()
    except ReloadError as exc:
        _fail(exc)
    if not as_json:
        click.echo(f"broker reloaded: {done}", err=True)
    return done


def _mark_lost(accounts: Accounts, name: str, url: str | None) -> list[str] | None:
    """After a revocation: tell the coordinator the volunteer's workers are gone. A failure
    only delays their tasks (until the leases expire), so it is a warning."""
    try:
        marked = mark_workers_lost(coordinator_broker(accounts, url), name)
    except (CoordinatorError, BrokerError) as exc:
        click.echo(f"warning: could not mark {name}'s workers lost ({exc}); their tasks return to the "
                   "queue only when their leases expire", err=True)
        return None
    return marked


def _broker_option(func: Any) -> Any:
    return click.option("--broker", "broker_url", envvar=BROKER_URL_ENV,
                        help="The coordinator's broker URL, to mark a revoked volunteer's workers lost "
                             f"[env {BROKER_URL_ENV}; default: from coordinator.env]")(func)


def _dir_option(func: Any) -> Any:
    return click.option("--dir", "config_dir", envvar=BROKER_CONFIG_ENV, default=BROKER_CONFIG_DIR,
                        show_default=True, type=click.Path(file_okay=False, path_type=Path),
                        help=f"Broker config directory (passwd, acl, certs/) [env {BROKER_CONFIG_ENV}]")(func)


def _reload_options(func: Any) -> Any:
    func = click.option("--reload-command", envvar=BROKER_RELOAD_ENV,
                        help="Command that makes the broker reload, e.g. 'docker compose kill -s HUP "
                             f"mosquitto' [env {BROKER_RELOAD_ENV}]")(func)
    return click.option("--pid-file", envvar=BROKER_PID_FILE_ENV, type=click.Path(dir_okay=False, path_type=Path),
                        help=f"The broker's pid file; it gets SIGHUP [env {BROKER_PID_FILE_ENV}]")(func)


@click.group()
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
def init_command(config_dir: Path, root: str, broker_host: str, local_workers: bool, as_json: bool) -> None:
    """Create the coordinator's account, the ACL and .env files (run once, before the broker)."""
    try:
        accounts = Accounts(config_dir, root)
        created = accounts.init(local_workers=local_workers, broker_host=broker_host)
    except CoordinatorError as exc:
        _fail(exc)
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
        click.echo("next: `dockercomp coordinator certs init --host YOUR.HOST.NAME` for the TLS listener")


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
@_broker_option
@click.option("--json", "as_json", is_flag=True, help="Print the account, URL and install command as JSON.")
def add_command(name: str, config_dir: Path, role: str, host: str | None, port: int, reset_password: bool,
                pid_file: Path | None, reload_command: str | None, broker_url: str | None, as_json: bool) -> None:
    """Create an account and print the one-line install command for that volunteer."""
    accounts = Accounts(config_dir)
    certs = accounts.certs
    if host is None:
        hosts = certificate_hosts(certs.server_cert) if certs.server_cert.exists() else []
        if not hosts:
            _fail(VolunteerError("pass --host: the name volunteers reach the broker by "
                                 "(or run `dockercomp coordinator certs init --host NAME` first)"))
        host = hosts[0]
    try:
        creds = accounts.add(name, Role(role), reset=reset_password)
    except CoordinatorError as exc:
        _fail(exc)
    ca_file = str(certs.ca_cert) if certs.ca_cert.exists() else None
    # For `dockercomp agent run` on their machine (?ca= the path they saved ca.crt to) ...
    url = broker_url_for(creds, host, port, ca_file=Path(ca_file).name if ca_file else None, root=accounts.root)
    # ... and for the installer, which takes the CA file apart and puts it in the containers.
    command = install_command(broker_url_for(creds, host, port, root=accounts.root), ca_file)
    reloaded = _reload_or_hint(Reloader(pid_file, reload_command), as_json)
    # A new password cut the old connections off, without their wills (see mark_workers_lost).
    marked = _mark_lost(accounts, name, broker_url) if reset_password and reloaded else None
    if as_json:
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
def list_command(config_dir: Path, as_json: bool) -> None:
    """Show every account and its role."""
    try:
        rows = Accounts(config_dir).all()
    except CoordinatorError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps([{**asdict(a), "role": a.role.value} for a in rows]))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("account", "role", "created", title=f"{len(rows)} broker accounts in {config_dir}")
    for account in rows:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(account.created)) if account.created else "-"
        table.add_row(account.name, account.role.value, created)
    Console().print(table)


@volunteers.command("remove")
@click.argument("name")
@_dir_option
@click.option("--force", is_flag=True, help="Allow removing the coordinator's own account.")
@_reload_options
@_broker_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def remove_command(name: str, config_dir: Path, force: bool, pid_file: Path | None, reload_command: str | None,
                   broker_url: str | None, as_json: bool) -> None:
    """Revoke an account: on reload its workers are disconnected and cannot reconnect, and the
    coordinator hands their tasks to other workers."""
    accounts = Accounts(config_dir)
    try:
        account = accounts.remove(name, allow_coordinator=force)
    except CoordinatorError as exc:
        _fail(exc)
    reloaded = _reload_or_hint(Reloader(pid_file, reload_command), as_json)
    marked = _mark_lost(accounts, name, broker_url) if reloaded and account.role is Role.VOLUNTEER else None
    if as_json:
        click.echo(json.dumps({"name": account.name, "role": account.role.value, "removed": True,
                               "reloaded": reloaded, "marked_lost": marked}))
        return
    click.echo(f"removed account {account.name!r} ({account.role.value})"
               + ("; its clients were disconnected" if reloaded else ""))
    if marked:
        click.echo(f"marked {len(marked)} worker(s) lost, so their tasks go to others: {', '.join(marked)}")
