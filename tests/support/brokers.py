"""Real broker processes for tests: Mosquitto with the repo's mosquitto.conf, and amqtt.

Both run as child processes so a test can stop, kill (SIGKILL, no goodbye to clients) and
restart them on the same port, exactly as an operator or a crash would.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

from . import free_port, port_accepts

REPO_ROOT = Path(__file__).resolve().parents[2]
MOSQUITTO_CONF = REPO_ROOT / "mosquitto.conf"
# Seconds a broker gets to accept connections, and to exit after SIGTERM.
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
# Fresh ports tried when the one picked is taken between picking and binding.
PORT_ATTEMPTS = 5

# Every broker still running when the interpreter exits is killed, so an aborted test
# run (Ctrl-C, pytest-timeout) leaves no process behind.
_live: weakref.WeakSet[BrokerProcess] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    for broker in list(_live):
        broker.kill()


class BrokerStartError(RuntimeError):
    """The broker process exited or never accepted connections; carries its log."""

    def __init__(self, message: str, log: str) -> None:
        super().__init__(f"{message}\n--- broker log (tail) ---\n{log[-3000:]}")
        self.log = log


def find_mosquitto() -> str | None:
    """The mosquitto binary: on PATH, or in /usr/sbin (not on a normal user's PATH)."""
    return shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")


class BrokerProcess:
    """A broker child process on 127.0.0.1 with `.url`, `.start()`, `.stop()`, `.kill()`.

    `.persistent` says whether retained messages and sessions survive a restart.
    """

    name = "broker"
    persistent = False

    def __init__(self, workdir: Path, host: str = "127.0.0.1") -> None:
        self.workdir = workdir
        self.host = host
        self.port = 0  # chosen by the first start(); every restart reuses it
        self.log_path = workdir / f"{self.name}.log"
        self._process: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log(self) -> str:
        """Everything the broker printed so far (all starts)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> BrokerProcess:
        """Starts the broker (again, on the same port); returns once it accepts connections."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running on {self.url}")
        if self.port:
            self._launch(self.port)
            return self
        for attempt in range(PORT_ATTEMPTS):
            try:
                self._launch(free_port(self.host))
                return self
            except BrokerStartError:
                # Most likely someone took the port between free_port() and bind.
                if attempt + 1 == PORT_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """SIGTERM and wait: a clean shutdown (Mosquitto saves its persistence file)."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: a crash. Clients see their connection drop; nothing is saved."""
        self._signal(signal.SIGKILL)

    def _signal(self, sig: signal.Signals) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT)
        self._process = None
        _live.discard(self)

    def _command(self, port: int) -> list[str]:
        raise NotImplementedError

    def _ready(self, port: int, log_offset: int) -> bool:
        """True once the process started this time accepts connections on `port`."""
        return port_accepts(self.host, port)

    def _launch(self, port: int) -> None:
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log_file:
            process = subprocess.Popen(
                self._command(port),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
                env=self._env(),
            )
        self._process = process
        _live.add(self)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self._process = None
                _live.discard(self)
                raise BrokerStartError(
                    f"{self.name} exited with code {process.returncode} on port {port}",
                    self.log()[log_offset:],
                )
            if self._ready(port, log_offset):
                self.port = port
                return
            time.sleep(0.02)
        self.kill()
        raise BrokerStartError(
            f"{self.name} did not accept connections on {self.host}:{port} "
            f"within {START_TIMEOUT:.0f} s",
            self.log()[log_offset:],
        )

    def _env(self) -> dict[str, str]:
        return dict(os.environ)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self.url} {state}>"


# Lines of mosquitto.conf the test config replaces: where it listens, where it keeps its
# database, where it logs, and which user it runs as. Everything else is kept verbatim.
_REPLACED = re.compile(
    r"^\s*(port|bind_address|bind_interface|persistence_location|log_dest|user|pid_file)\b"
)
_LISTENER = re.compile(r"^\s*listener\s+\d+")


def mosquitto_test_config(source: str, *, host: str, port: int, workdir: Path) -> str:
    """The repository's mosquitto.conf, moved to host:port with its files in `workdir`.

    The first `listener` gets `port`; any further listener gets a fresh free port, so
    nothing collides with a broker already running on this machine.
    """
    lines: list[str] = []
    listeners = 0
    for line in source.splitlines():
        if _LISTENER.match(line):
            listener_port = port if listeners == 0 else free_port(host)
            lines.append(f"# test: replaced {line.strip()!r}")
            lines.append(f"listener {listener_port} {host}")
            listeners += 1
        elif _REPLACED.match(line):
            lines.append(f"# test: replaced {line.strip()!r}")
        else:
            lines.append(line)
    if listeners == 0:
        raise ValueError("mosquitto.conf has no `listener` line; the tests need one to move")
    lines += [
        "",
        "# --- added by tests/support/brokers.py ---",
        f"persistence_location {workdir / 'data'}/",
        f"log_dest file {workdir / 'mosquitto.log'}",
        # Readiness waits for the "running" line, logged at this level.
        "log_type information",
        # Started as root, Mosquitto drops to user `mosquitto`, which cannot write into
        # pytest's root-only tmp directory. Ignored when not started as root.
        "user root",
    ]
    return "\n".join(lines) + "\n"


class MosquittoProcess(BrokerProcess):
    """Mosquitto started with the repository's mosquitto.conf (see mosquitto_test_config)."""

    name = "mosquitto"
    persistent = True

    def __init__(
        self,
        workdir: Path,
        host: str = "127.0.0.1",
        *,
        binary: str | None = None,
        source_conf: Path = MOSQUITTO_CONF,
    ) -> None:
        super().__init__(workdir, host)
        found = binary or find_mosquitto()
        if found is None:
            raise FileNotFoundError("mosquitto binary not found")
        self.binary = found
        self.source_conf = source_conf
        self.conf_path = workdir / "mosquitto.test.conf"
        self._broker_log_offset = 0  # where this start's lines begin in mosquitto.log
        (workdir / "data").mkdir(exist_ok=True)

    @property
    def broker_log_path(self) -> Path:
        """Mosquitto's own log (log_dest file); its stdout/stderr go to `log_path`."""
        return self.workdir / "mosquitto.log"

    def log(self) -> str:
        own = (
            self.broker_log_path.read_text(errors="replace")
            if self.broker_log_path.exists()
            else ""
        )
        return super().log() + own

    def _command(self, port: int) -> list[str]:
        if port != self.port:  # first start, or a retry on another port
            text = mosquitto_test_config(
                self.source_conf.read_text(), host=self.host, port=port, workdir=self.workdir
            )
            self.conf_path.write_text(text)
        path = self.broker_log_path
        self._broker_log_offset = path.stat().st_size if path.exists() else 0
        return [self.binary, "-c", str(self.conf_path)]

    def _ready(self, port: int, log_offset: int) -> bool:
        # A port probe alone is fooled by whoever else listens on a port we lost the race
        # for; Mosquitto says "running" only once all its listeners are open.
        path = self.broker_log_path
        if not path.exists():
            return False
        with open(path, "rb") as log:
            log.seek(self._broker_log_offset)
            started = b" running" in log.read()
        return started and port_accepts(self.host, port)


class AmqttProcess(BrokerProcess):
    """`python -m broker.cli serve`: the embedded amqtt broker, in its own process."""

    name = "amqtt"
    persistent = False  # amqtt forgets retained messages on restart (broker/embedded.py)

    def _command(self, port: int) -> list[str]:
        return [
            sys.executable, "-m", "broker.cli", "serve",
            "--host", self.host, "--port", str(port),
        ]  # fmt: skip

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # Importable even when the package is not pip-installed.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _ready(self, port: int, log_offset: int) -> bool:
        # The CLI prints its URL only once amqtt listens, so no TCP probe: amqtt logs an
        # ERROR for a connection without CONNECT (and leaks its socket). Only this start's
        # output is read, so a line from a previous start cannot fool us.
        return f"listening on mqtt://{self.host}:{port}" in self.log()[log_offset:]
