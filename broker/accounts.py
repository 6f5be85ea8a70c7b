"""Broker accounts: volunteers (and the coordinator and observers), their passwords and ACL.

Every account lives in one directory (``broker-config/``, which docker-compose mounts into
the broker at ``/mosquitto/security/``)::

    passwd          Mosquitto password file ($7$ PBKDF2-SHA512 hashes; broker/passwords.py)
    acl             Mosquitto ACL file, generated from the roles (broker/acl.py)
    accounts.json   role and creation time of each account, and the topic root
    coordinator.env DOCKERCOMP_BROKER=mqtt://coordinator:PASSWORD@mosquitto:1883 (mode 0600)
    worker.env      the same for the `local` volunteer of docker-compose's own workers
    ../.env         both URLs again, as the variables docker-compose.yml reads (mode 0600)
    certs/          the TLS CA and server certificate (broker/certs.py)

Passwords are random (144 bits) and shown once: only their hashes are kept. After each
change the broker must reload the files: ``Reloader`` sends SIGHUP to the pid in a pid
file, or runs a command such as ``docker-compose kill -s HUP mosquitto``. Mosquitto 2.0
then disconnects every client of a removed account, and refuses it from then on; so does
``dockercomp broker serve --password-file`` (amqtt). Mosquitto publishes no will for those connections,
so the coordinator's ``mark_workers_lost`` (coordinator/volunteers.py) does: their tasks go to
other workers at once.

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
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dockercomp.broker.acl import Role, render_acl
from dockercomp.broker.certs import CertPaths
from dockercomp.broker.defaults import (
    BROKER_URL_ENV,
    COMPOSE_BROKER_HOST,
    COMPOSE_BROKER_VARIABLES,
    COMPOSE_ENV_FILE,
    COORDINATOR_ACCOUNT,
    DEFAULT_VOLUNTEER,
    INSTALL_SCRIPT,
    KIT_INFO_FILE,
    MQTT_PORT,
    MQTTS_PORT,
    RELOAD_TIMEOUT,
    ROOT_TOPIC,
)
from dockercomp.broker.errors import (
    AccountError,
    AccountsFileError,
    InvalidName,
    ReloadError,
    UnknownAccount,
)
from dockercomp.broker.passwords import PasswordFile, atomic_write, new_password
from dockercomp.broker.settings import BrokerSettings
from dockercomp.broker.topics import ALLOWED_NAME_CHARACTERS, Topics, validate_name

_ACCOUNTS_VERSION = 1


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
        raise UnknownAccount(f"no account {name!r} in {self.passwd}",
                             "`dockercomp coordinator volunteers list` shows them")

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
            atomic_write(self.env_file(name), f"{BROKER_URL_ENV}={url}\n", mode=0o600)
            set_env_variable(self.directory.parent / COMPOSE_ENV_FILE, COMPOSE_BROKER_VARIABLES[name], url)
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
        except InvalidName as exc:  # the account name is its workers' volunteer level in every topic
            raise AccountError(str(exc), f"pick a name of {ALLOWED_NAME_CHARACTERS}") from None
        if name == COORDINATOR_ACCOUNT and not _allow_reserved and role is not Role.COORDINATOR:
            raise AccountError(f"{name!r} is the coordinator's account name", "pick another name")
        password = password or new_password()
        with self._locked():
            data = self._load()
            passwords = self._passwords()
            exists = name in passwords.read()
            if exists and not reset:
                raise AccountError(f"account {name!r} exists already", "--reset-password gives it a new "
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
            raise AccountError(f"{name!r} is the coordinator's account: removing it cuts the coordinator off",
                               "pass --force if that is what you want")
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
            raise AccountsFileError(f"cannot read {self.registry}: {exc}",
                                    "fix or delete it (roles then default to volunteer)") from None
        if not isinstance(data, dict) or not isinstance(data.get("accounts", {}), dict):
            raise AccountsFileError(f"{self.registry} is not an accounts file", "fix or delete it")
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
                raise ReloadError(f"cannot read a process id from {self.pid_file}",
                                  "is the broker running with that pid_file?") from None
            try:
                os.kill(pid, signal.SIGHUP)
            except ProcessLookupError:
                raise ReloadError(f"no process {pid} (from {self.pid_file}): the broker is not running",
                                  "start the broker, then run this again") from None
            except PermissionError:
                raise ReloadError(f"not allowed to signal process {pid}",
                                  "run this as the broker's user or root") from None
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


def coordinator_broker(accounts: Accounts, url: str | None) -> BrokerSettings:
    """The coordinator's broker settings: ``url``, else the one in coordinator.env (where the
    compose service name "mosquitto" becomes 127.0.0.1: compose publishes 1883 on loopback)."""
    if url:
        return BrokerSettings.from_url(url)
    env = accounts.env_file(COORDINATOR_ACCOUNT)
    try:
        line = next(l for l in env.read_text().splitlines() if l.startswith(f"{BROKER_URL_ENV}="))
    except (OSError, StopIteration):
        raise AccountError("no broker URL for the coordinator",
                           f"pass --broker (the coordinator's), or keep {env}") from None
    settings = BrokerSettings.from_url(line.split("=", 1)[1].strip())
    return replace(settings, host="127.0.0.1") if settings.host == COMPOSE_BROKER_HOST else settings


def broker_url_for(creds: Credentials, host: str, port: int = MQTTS_PORT, *, tls: bool = True,
                   ca_file: str | None = None, root: str = ROOT_TOPIC) -> str:
    """The URL a volunteer's agents use (with the password: hand it over privately)."""
    return BrokerSettings(host=host, port=port, username=creds.name, password=creds.password, tls=tls,
                          ca_file=ca_file, root=root).full_url


def install_command(url: str, ca_file: str | None = None, kit: Path | None = None) -> str:
    """The one line a volunteer runs.

    With a kit (`dockercomp coordinator kit build` wrote kit/kit.json), the line downloads
    install_me.sh from it and pins the kit's SHA256SUMS by hash, so every later download is
    verified; the CA certificate comes from the kit. Without one, the scientist hands over
    install_me.sh (and ca.crt beside it) themselves.
    """
    info = _kit_info(kit) if kit is not None else None
    network = ["--network", "host"] if _loopback(url) else []  # bridge containers cannot reach loopback
    if info is not None:
        return " ".join([f"curl -fsSL {shlex.quote(info['url'] + '/' + INSTALL_SCRIPT)} | sh -s --",
                         "--kit-sha256", shlex.quote(info["sha256"]), "--broker", shlex.quote(url), *network, "--yes"])
    parts = ["sh", INSTALL_SCRIPT, "--broker", shlex.quote(url)]
    if ca_file:
        parts += ["--ca-file", shlex.quote(Path(ca_file).name)]
    return " ".join(parts + network + ["--yes"])


def _kit_info(kit: Path) -> dict[str, str] | None:
    """{url, sha256} from a kit folder's kit.json, or None when there is no (readable) kit."""
    try:
        data = json.loads((kit / KIT_INFO_FILE).read_text())
        return {"url": str(data["url"]).rstrip("/"), "sha256": str(data["sha256"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _loopback(url: str) -> bool:
    host = BrokerSettings.from_url(url).host
    return host in ("localhost", "127.0.0.1", "::1")


def set_env_variable(path: Path, name: str, value: str) -> None:
    """Sets NAME=value in an env file (docker-compose's .env), keeping its other lines; the
    file holds passwords, so it is owner-only."""
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [line for line in lines if not line.startswith(f"{name}=")]
    atomic_write(path, "\n".join([*kept, f"{name}={value}"]) + "\n", mode=0o600)
