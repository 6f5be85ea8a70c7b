"""Connection errors that retrying cannot mend stop `agent run` and `coordinator serve` with
one line naming the problem and a documented exit code (issue 10, item 14), on real brokers
running the shipped access policy (tests/support/security.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dockercomp.exits import Exit
from tests.support.security import SecureBroker

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(90)

# Both commands; each must stop on its own (the bound is generous: a retry loop never ends).
COMMANDS = {
    "agent": ["agent", "run", "--worker-id", "w1", "--concurrency", "1"],
    "serve": ["coordinator", "serve", "--db", "{db}"],
}


def run(command: str, url: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`dockercomp COMMAND` with the broker URL in the environment (no password in argv)."""
    args = [a.replace("{db}", str(tmp_path / "coordinator.db")) for a in COMMANDS[command]]
    env = dict(os.environ, DOCKERCOMP_BROKER=url, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-m", "dockercomp", *args], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=45, check=False)


def errors(done: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_refused_password_stops_with_its_own_code(secure_broker: SecureBroker, command: str,
                                                    tmp_path: Path) -> None:
    alice = secure_broker.add("alice")
    done = run(command, secure_broker.url(alice, password="not-her-password"), tmp_path)
    assert done.returncode == Exit.REFUSED, done.stderr
    [line] = errors(done)
    assert "refused the user name or password" in line
    assert "not-her-password" not in done.stderr + done.stdout and alice.password not in done.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_plain_mqtt_to_the_tls_port_stops_with_its_own_code(secure_mosquitto: SecureBroker, command: str,
                                                            tmp_path: Path) -> None:
    alice = secure_mosquitto.add("alice")
    plain_to_tls = secure_mosquitto.tls_url(alice).replace("mqtts://", "mqtt://").split("?")[0]
    done = run(command, plain_to_tls, tmp_path)
    assert done.returncode == Exit.REFUSED, done.stderr
    [line] = errors(done)
    assert "that port speaks TLS" in line
    assert "hint: use mqtts://" in done.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_a_missing_ca_file_is_named(secure_mosquitto: SecureBroker, command: str, tmp_path: Path) -> None:
    alice = secure_mosquitto.add("alice")
    missing = tmp_path / "nowhere" / "ca.crt"
    url = secure_mosquitto.tls_url(alice).split("?")[0] + f"?ca={missing}"
    done = run(command, url, tmp_path)
    assert done.returncode == Exit.FILES, done.stderr
    [line] = errors(done)
    assert f"the CA file {missing} does not exist" in line
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_tls_to_the_plain_port_and_an_untrusted_certificate_stop_too(secure_mosquitto: SecureBroker, command: str,
                                                                    tmp_path: Path) -> None:
    alice = secure_mosquitto.add("alice")
    ca = secure_mosquitto.certs.ca_cert
    tls_to_plain = secure_mosquitto.url(alice).replace("mqtt://", "mqtts://") + f"?ca={ca}"
    done = run(command, tls_to_plain, tmp_path)
    assert done.returncode == Exit.REFUSED, done.stderr
    assert "that port speaks plain MQTT" in errors(done)[0]

    done = run(command, secure_mosquitto.tls_url(alice, ca=False), tmp_path)  # the system trust store
    assert done.returncode == Exit.REFUSED, done.stderr
    assert "certificate not trusted" in errors(done)[0]
