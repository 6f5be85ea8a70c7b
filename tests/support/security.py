"""Brokers running the shipped access policy: accounts, ACL and (Mosquitto) TLS.

The files are made exactly as a scientist makes them (`dockercomp coordinator volunteers init`,
`dockercomp broker certs init`, through their library functions) in the test's temporary
directory; Mosquitto runs the repository's mosquitto.conf with only paths and ports moved
(tests/support/brokers.py, secure mode), amqtt runs `dockercomp broker serve --password-file
--acl-file`. tests/conftest.py registers this module as a plugin, so the fixtures
`secure_mosquitto`, `secure_amqtt` and `secure_broker` are available to every test.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from dockercomp.broker.acl import Role
from dockercomp.broker.connection import MqttConnection
from dockercomp.broker.defaults import COORDINATOR_ACCOUNT
from dockercomp.broker.errors import ConnectionFailed
from dockercomp.broker.settings import BrokerSettings
from dockercomp.broker.certs import CertPaths, init_certs
from dockercomp.broker.accounts import Accounts, Credentials, Reloader

from . import require, wait_until
from .brokers import AmqttProcess, BrokerProcess, MosquittoProcess, find_mosquitto


class Client:
    """A real transport (MqttConnection) that records what it receives."""

    def __init__(self, url: str, client_id: str) -> None:
        self.connection = MqttConnection(BrokerSettings.from_url(url), client_id)
        self._lock = threading.Condition()
        self.received: list[tuple[str, bytes]] = []
        self.connection.on_message = self._on_message

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        with self._lock:
            self.received.append((topic, payload))
            self._lock.notify_all()

    def topics(self) -> list[str]:
        with self._lock:
            return [topic for topic, _ in self.received]

    def wait_for(self, topic: str, timeout: float = 10) -> bytes:
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for seen, payload in self.received:
                    if seen == topic:
                        return payload
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"nothing on {topic} within {timeout} s; got {self.topics()}")
                self._lock.wait(remaining)


@contextmanager
def connected(url: str, client_id: str, *subscriptions: str) -> Iterator[Client]:
    client = Client(url, client_id)
    for topic_filter in subscriptions:
        client.connection.subscribe(topic_filter)
    client.connection.start()
    try:
        client.connection.wait_connected(10)
        yield client
    finally:
        client.connection.close(timeout=2)


def refusal(url: str, client_id: str = "probe") -> str:
    """Why the broker refuses `url` ("" if it accepts it)."""
    connection = MqttConnection(BrokerSettings.from_url(url), client_id)
    first = connection.last_error  # "not connected yet"
    connection.start()
    try:
        # The first answer decides: connected, or a reason (refused, TLS failure).
        wait_until(lambda: connection.connected or connection.last_error != first, timeout=10)
        return "" if connection.connected else connection.last_error
    finally:
        connection.close(timeout=1)


def prove_subscribed(sender: Client, receiver: Client, topic: str) -> None:
    """Publishes on `topic` until `receiver` gets it: every subscription `receiver` sent before
    its subscription to `topic` is then active too (a broker handles them in order)."""
    def arrived() -> bool:
        sender.connection.publish(topic, b"probe")
        try:
            receiver.wait_for(topic, timeout=0.3)
            return True
        except TimeoutError:
            return False
    wait_until(arrived, timeout=10)


# Names the generated server certificate is valid for (what agents may connect to).
CERT_HOSTS = ("localhost", "127.0.0.1")


@dataclass
class SecureBroker:
    """A running broker with the policy in force, and the accounts to talk to it."""

    process: BrokerProcess
    accounts: Accounts
    coordinator: Credentials

    @property
    def name(self) -> str:
        return self.process.name

    @property
    def certs(self) -> CertPaths:
        return self.accounts.certs

    @property
    def reloader(self) -> Reloader:
        if self.process.pid_file is None:
            raise RuntimeError(f"{self.name} was started without security_dir: it writes no pid file")
        return Reloader(pid_file=self.process.pid_file)

    def url(self, creds: Credentials | None = None, password: str | None = None) -> str:
        """The plain listener, as `creds` (or anonymous); `password` overrides theirs."""
        host, port = self.process.host, self.process.port
        if creds is None:
            return f"mqtt://{host}:{port}"
        return BrokerSettings(host=host, port=port, username=creds.name,
                              password=password if password is not None else creds.password).full_url

    def tls_url(self, creds: Credentials, *, ca: bool = True, host: str | None = None) -> str:
        """The TLS listener (Mosquitto only), verifying against the generated CA if `ca`."""
        if not isinstance(self.process, MosquittoProcess) or not self.process.tls_port:
            raise RuntimeError(f"{self.name} has no TLS listener")
        return BrokerSettings(host=host or self.process.host, port=self.process.tls_port, username=creds.name,
                              password=creds.password, tls=True,
                              ca_file=str(self.certs.ca_cert) if ca else None).full_url

    def add(self, name: str, role: Role = Role.VOLUNTEER) -> Credentials:
        """A new account, in force once this returns (the broker reloaded)."""
        creds = self.accounts.add(name, role)
        self.reloader.reload()
        wait_until(lambda: accepts(self.url(creds)), timeout=10, interval=0.05)
        return creds

    def remove(self, name: str) -> None:
        self.accounts.remove(name)
        self.reloader.reload()


def accepts(url: str) -> bool:
    """True if the broker lets this URL's account in right now."""
    connection = MqttConnection(BrokerSettings.from_url(url), f"probe-{time.monotonic_ns()}")
    connection.start()
    try:
        connection.wait_connected(2)
        return True
    except ConnectionFailed:
        return False
    finally:
        connection.close(timeout=1)


def make_config(directory: Path) -> tuple[Accounts, Credentials]:
    """What `dockercomp coordinator volunteers init` + `dockercomp broker certs init` make."""
    accounts = Accounts(directory)
    created = {c.name: c for c in accounts.init(local_workers=False)}
    init_certs(directory, CERT_HOSTS)
    return accounts, created[COORDINATOR_ACCOUNT]


def _run(request: pytest.FixtureRequest, broker: SecureBroker) -> Iterator[SecureBroker]:
    broker.process.start()
    try:
        yield broker
    finally:
        broker.process.stop()
        if any(getattr(getattr(request.node, f"report_{when}", None), "failed", False) for when in ("setup", "call")):
            print(f"\n--- {broker.name} log ---\n{broker.process.log()[-4000:]}")


@pytest.fixture
def secure_mosquitto(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SecureBroker]:
    """Mosquitto running the shipped mosquitto.conf policy unchanged (paths and ports moved)."""
    binary = find_mosquitto()
    require(binary, "the mosquitto binary", "apt-get install mosquitto (or run `make system`)")
    accounts, coordinator = make_config(tmp_path / "broker-config")
    process = MosquittoProcess(tmp_path / "mosquitto", binary=binary, security_dir=accounts.directory)
    yield from _run(request, SecureBroker(process, accounts, coordinator))


@pytest.fixture
def secure_amqtt(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SecureBroker]:
    """`dockercomp broker serve --password-file --acl-file`: amqtt enforcing the same files (no TLS)."""
    accounts, coordinator = make_config(tmp_path / "broker-config")
    process = AmqttProcess(tmp_path / "amqtt", security_dir=accounts.directory)
    yield from _run(request, SecureBroker(process, accounts, coordinator))


@pytest.fixture(params=["mosquitto", "amqtt"])
def secure_broker(request: pytest.FixtureRequest) -> SecureBroker:
    """Each secure broker in turn."""
    broker: SecureBroker = request.getfixturevalue(f"secure_{request.param}")
    return broker
