"""Fixtures for real servers: Mosquitto, amqtt and PostgreSQL on 127.0.0.1, free ports.

- `mosquitto`, `amqtt`: a broker process per test (BrokerProcess: .url .host .port
  .start() .stop() .kill() .running .persistent .log()).
- `broker`: the same test once against each of them (contract tests).
- `postgres`: DSN of a database on a session-wide server; `postgres_db`: DSN of a fresh,
  empty database for this test only; `postgres_server`: the PostgresServer itself.

A missing binary skips on a laptop and fails under CI (tests.support.require).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Generator, Iterator
from pathlib import Path
from types import FrameType

import pytest
from hypothesis import HealthCheck, settings

# Hypothesis judges examples by wall-clock time (a 200 ms deadline, a "too slow" health check),
# which a loaded 2-core CI machine fails at random. What must be fast is asserted explicitly
# (test_fuzz.py: hostile payloads are rejected quickly); here only behaviour is judged.
# Loaded before the test modules, so their @settings(...) inherit it.
settings.register_profile("dockercomp", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("dockercomp")

# The repo root makes `tests.support` importable. setup.cfg's `pythonpath = .` does the same
# for a run from the root; this covers pytest started with another rootdir or config.
_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from tests.support import require  # noqa: E402
from tests.support.brokers import AmqttProcess, BrokerProcess, MosquittoProcess, find_mosquitto  # noqa: E402
from tests.support.postgres import PostgresServer, find_bindir  # noqa: E402

BROKER_KINDS = ["mosquitto", "amqtt"]

# secure_mosquitto / secure_amqtt / secure_broker: the shipped access policy (accounts, ACL, TLS);
# procs / engine / coordinator_settings: dockercomp's processes and an in-process coordinator.
pytest_plugins = ("tests.support.security", "tests.support.processes", "tests.support.docker")


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    # `kill PID` of a test run (a cancelled CI job, an engineer stopping it) acts as Ctrl-C:
    # fixtures still run their teardown, so no broker, agent or database outlives the run.
    signal.signal(signal.SIGTERM, _interrupt)
    # A run started in the background by a non-interactive shell (as a CI runner may start
    # it) inherits SIGINT ignored, and so would every process a test starts: Python then
    # installs no KeyboardInterrupt, and "Ctrl-C stops the demo" would test nothing but the
    # runner. A handler in this process resets to the default in children at exec.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    # Remembered so broker fixtures can print their logs when the test failed.
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


def _failed(request: pytest.FixtureRequest) -> bool:
    return any(
        getattr(getattr(request.node, f"report_{when}", None), "failed", False)
        for when in ("setup", "call")
    )


def _run_broker(request: pytest.FixtureRequest, broker: BrokerProcess) -> Iterator[BrokerProcess]:
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()  # also reaps a broker the test killed
        if _failed(request):
            print(f"\n--- {broker.name} log ({broker.workdir}) ---\n{broker.log()[-4000:]}")


@pytest.fixture
def mosquitto(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerProcess]:
    """Mosquitto running the repository's mosquitto.conf on 127.0.0.1:<free port>."""
    binary = find_mosquitto()
    require(binary, "the mosquitto binary", "apt-get install mosquitto (or run `make system`)")
    yield from _run_broker(request, MosquittoProcess(tmp_path / "mosquitto", binary=binary))


@pytest.fixture
def amqtt(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerProcess]:
    """The embedded amqtt broker (`python -m broker.cli serve`) on 127.0.0.1:<free port>."""
    yield from _run_broker(request, AmqttProcess(tmp_path / "amqtt"))


@pytest.fixture(params=BROKER_KINDS)
def broker(request: pytest.FixtureRequest) -> BrokerProcess:
    """Each broker kind in turn; check `broker.name` / `broker.persistent` for known gaps."""
    instance: BrokerProcess = request.getfixturevalue(request.param)
    return instance


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the whole run (initdb takes ~1 s)."""
    bindir = find_bindir()
    require(bindir, "PostgreSQL (initdb/postgres)", "apt-get install postgresql (or `make system`)")
    assert bindir is not None
    server = PostgresServer(bindir)
    try:
        server.start()
        server.execute('CREATE DATABASE "dockercomp_test"')
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres(postgres_server: PostgresServer) -> str:
    """DSN postgresql://postgres@127.0.0.1:PORT/dockercomp_test, shared by the session."""
    return postgres_server.dsn("dockercomp_test")


@pytest.fixture
def postgres_db(postgres_server: PostgresServer) -> Iterator[str]:
    """DSN of a new, empty database for this test alone, dropped afterwards."""
    name = postgres_server.create_database()
    try:
        yield postgres_server.dsn(name)
    finally:
        postgres_server.drop_database(name)
