"""Broker child processes on free ports: Mosquitto from the repository's mosquitto.conf, and
the embedded amqtt broker (`dockercomp broker serve`) in its own process.

Shipped (dockercomp.broker.processes) because the test suite and the benchmark (bench/) both
start brokers this way, and nothing outside tests/ may import tests. Each broker can be
stopped, killed (SIGKILL, no goodbye to clients) and restarted on the same port, exactly as an
operator or a crash would. Imports only the standard library: amqtt runs in the child.
"""

from __future__ import annotations

import atexit
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Callable
from typing import Any
from pathlib import Path

# Lowest port free_port() hands out (well clear of 1883, 8883, 5432 and other services).
LOWEST_TEST_PORT = 10000
# Ports free_port() tries before falling back to one the kernel picks.
PORT_PROBES = 200
# Where Linux says which source ports outgoing connections use.
EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
# Not the `random` module's shared generator: hypothesis reseeds that one, and two test runs
# on one machine must not walk through the same port sequence.
_random = random.SystemRandom()

# The mosquitto.conf that ships with the project, at the top of a source checkout (this file is
# broker/processes.py there). An installed wheel has none: pass MosquittoProcess(source_conf=...).
MOSQUITTO_CONF = Path(__file__).resolve().parents[1] / "mosquitto.conf"
# Seconds a broker gets to accept connections, and to exit after SIGTERM.
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
# Fresh ports tried when the one picked is taken between picking and binding.
PORT_ATTEMPTS = 5
# Seconds a restart waits for its old port to be free, if something holds it.
RESTART_TIMEOUT = 10.0

# Every broker still running when the interpreter exits is killed, so an aborted test
# run (Ctrl-C, pytest-timeout) leaves no process behind.
_live: weakref.WeakSet[BrokerProcess] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    for broker in list(_live):
        broker.kill()


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range of source ports for outgoing connections (Linux default 32768-60999)."""
    try:
        low, high = (int(n) for n in Path(EPHEMERAL_RANGE_FILE).read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def _candidate_ports() -> list[int]:
    """Ports in [LOWEST_TEST_PORT, 65535] outside the ephemeral range, in random order."""
    low, high = _ephemeral_range()
    ports = [p for p in range(LOWEST_TEST_PORT, 65536) if not low <= p <= high]
    _random.shuffle(ports)
    return ports


def _bindable(host: str, port: int) -> bool:
    # No SO_REUSEADDR: a port with connections still in TIME_WAIT counts as taken too.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago, outside the kernel's ephemeral range.

    Outside it, because a port from that range can be taken at any moment as the source port
    of some outgoing connection: a broker restarted on its old port would then fail with
    EADDRINUSE, and a client retrying a port nobody listens on can even connect to itself
    (TCP simultaneous open). Still racy against other processes picking ports the same way,
    so a server started on it must retry on EADDRINUSE (BrokerProcess.start does).
    """
    for port in _candidate_ports()[:PORT_PROBES]:
        if _bindable(host, port):
            return port
    # Everything probed is taken (or the range is unusual): let the kernel choose.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        chosen: int = sock.getsockname()[1]
        return chosen


def start_on_a_free_port(launch: Callable[[int], None], host: str, failure: type[Exception]) -> None:
    """Calls launch(port) on a free port, on a fresh one again when it raises `failure` (most
    likely someone took the port between free_port() and the bind), PORT_ATTEMPTS times."""
    for attempt in range(PORT_ATTEMPTS):
        try:
            launch(free_port(host))
            return
        except failure:
            if attempt + 1 == PORT_ATTEMPTS:
                raise


def port_accepts(host: str, port: int) -> bool:
    """True if a TCP connection to host:port succeeds right now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def logged_since(path: Path, offset: int, marker: bytes) -> bool:
    """True if the log file at `path` holds `marker` past byte `offset` (this start's lines)."""
    if not path.exists():
        return False
    with open(path, "rb") as log:
        log.seek(offset)
        return marker in log.read()


def _listenable(host: str, port: int) -> bool:
    """True if a server could listen on host:port now (SO_REUSEADDR, as both brokers set it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen()
        except OSError:
            return False
    return True


class BrokerStartError(RuntimeError):
    """The broker process exited or never accepted connections; carries its log."""

    def __init__(self, message: str, log: str) -> None:
        super().__init__(f"{message}\n--- broker log (tail) ---\n{log[-3000:]}")
        self.log = log


def find_mosquitto() -> str | None:
    """The mosquitto binary: on PATH, or in /usr/sbin (not on a normal user's PATH)."""
    return shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")


def stop_process(process: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> None:
    """Send ``sig`` to a server process still running and wait for it; SIGKILL if it takes
    longer than ``timeout`` (a server that ignores its stop signal must not hang a test run)."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)


def _signal_group(pgid: int, sig: int) -> bool:
    """``killpg``; False when the group has no process left (or none we may signal)."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


class BrokerProcess:
    """A broker child process on 127.0.0.1 with `.url`, `.start()`, `.stop()`, `.kill()`.

    `.persistent` says whether retained messages and sessions survive a restart.
    """

    name = "broker"
    persistent = False
    # Seconds this kind of broker gets to accept connections (an Erlang node boots slower).
    start_timeout = START_TIMEOUT
    # Started in a process group of its own, which kill() kills whole: for a broker whose start
    # script runs helpers before it execs the server (RabbitMQ), a kill during boot would
    # otherwise leave them running.
    process_group = False

    def __init__(self, workdir: Path, host: str = "127.0.0.1") -> None:
        self.workdir = workdir
        self.host = host
        self.port = 0  # chosen by the first start(); every restart reuses it
        self.pid_file: Path | None = None  # where a secure broker writes its pid (for SIGHUP)
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
            self._restart(self.port)
            return self
        start_on_a_free_port(self._launch, self.host, BrokerStartError)
        return self

    def _restart(self, port: int) -> None:
        """Starts again on `port`, which clients are configured for: no other port will do.

        A port outside the ephemeral range (free_port) is normally free again the moment the
        old process is reaped; if something holds it for a moment anyway, wait rather than fail.
        """
        deadline = time.monotonic() + RESTART_TIMEOUT
        while True:
            try:
                self._launch(port)
                return
            except BrokerStartError as exc:
                port_taken = "already in use" in exc.log or not _listenable(self.host, port)
                if not port_taken or time.monotonic() >= deadline:
                    raise  # failed for another reason than the port, or the port never came back
            time.sleep(0.2)

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
        group = self.process_group and sig == signal.SIGKILL
        if group:
            _signal_group(process.pid, signal.SIGKILL)  # the whole group, even if its leader exited
        stop_process(process, sig)
        if group:
            self._kill_group(process.pid)
        self._process = None
        _live.discard(self)

    @staticmethod
    def _kill_group(pgid: int) -> None:
        """SIGKILL the process group; returns once every member is gone, as kill() of a lone
        process does (at most STOP_TIMEOUT)."""
        deadline = time.monotonic() + STOP_TIMEOUT
        while _signal_group(pgid, signal.SIGKILL) and time.monotonic() < deadline:
            time.sleep(0.01)

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
                cwd=self.workdir,
                env=self._env(),
                start_new_session=self.process_group,
            )
        self._process = process
        _live.add(self)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                if self.process_group:  # what its start script had started dies with it
                    self._kill_group(process.pid)
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
            f"within {self.start_timeout:.0f} s",
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
# Listener options that make a listener a TLS one; dropped with it in the open config.
_TLS_OPTION = re.compile(
    r"^\s*(cafile|capath|certfile|keyfile|tls_version|ciphers|ciphers_tls1\.3|require_certificate"
    r"|use_identity_as_username|use_subject_as_username|crlfile|dhparamfile|tls_engine|tls_keyform)\b"
)
# Access settings: the open config allows anonymous clients and drops the files.
_ANONYMOUS = re.compile(r"^\s*allow_anonymous\b")
_ACCESS_FILE = re.compile(r"^\s*(password_file|acl_file)\b")
# Where the shipped config expects the files `dockercomp coordinator volunteers` / `dockercomp broker certs` make.
SECURITY_PREFIX = "/mosquitto/security/"


# The option that makes a listener speak MQTT over WebSockets (the dashboard's, in mosquitto.conf).
_WEBSOCKETS = re.compile(r"^\s*protocol\s+websockets\b")


def _listeners_with(lines: list[str], option: re.Pattern[str]) -> set[int]:
    """Indexes of the `listener` lines followed (before the next listener) by `option`."""
    found: set[int] = set()
    current: int | None = None
    for index, line in enumerate(lines):
        if _LISTENER.match(line):
            current = index
        elif current is not None and option.match(line):
            found.add(current)
    return found


def _tls_listener_lines(lines: list[str]) -> set[int]:
    return _listeners_with(lines, _TLS_OPTION)


def _websockets_listener_lines(lines: list[str]) -> set[int]:
    return _listeners_with(lines, _WEBSOCKETS)


def mosquitto_test_config(
    source: str,
    *,
    host: str,
    port: int,
    workdir: Path,
    security_dir: Path | None = None,
    tls_port: int | None = None,
    ws_port: int | None = None,
) -> str:
    """The repository's mosquitto.conf, moved to host:port with its files in `workdir`.

    Open (security_dir None, what the `mosquitto` fixture runs): TLS listeners are dropped,
    anonymous clients allowed, password_file/acl_file ignored. Secure (security_dir given):
    the access policy is kept unchanged, with /mosquitto/security/X read from
    security_dir/X, the TLS listener moved to `tls_port`, the WebSockets one to `ws_port` and a
    pid file in `workdir`.

    The first plain listener gets `port`; any further listener gets a fresh free port, so
    nothing collides with a broker already running on this machine.
    """
    source_lines = source.splitlines()
    tls_listeners = _tls_listener_lines(source_lines)
    ws_listeners = _websockets_listener_lines(source_lines)
    secure = security_dir is not None
    lines: list[str] = []
    plain_seen = 0
    in_tls = False
    for index, line in enumerate(source_lines):
        if _LISTENER.match(line):
            in_tls = index in tls_listeners
            if in_tls and not secure:
                lines.append(f"# test: dropped TLS listener {line.strip()!r}")
                continue
            if index in ws_listeners:
                listener_port = ws_port or free_port(host)
            elif in_tls:
                listener_port = tls_port or free_port(host)
            else:
                listener_port = port if plain_seen == 0 else free_port(host)
                plain_seen += 1
            lines.append(f"# test: replaced {line.strip()!r}")
            lines.append(f"listener {listener_port} {host}")
        elif in_tls and not secure and (_TLS_OPTION.match(line) or _WEBSOCKETS.match(line)):
            # A `protocol` line left without its listener would apply to Mosquitto's default
            # listener, port 1883: the broker would fail whenever another one holds that port.
            lines.append(f"# test: dropped {line.strip()!r}")
        elif _REPLACED.match(line):
            lines.append(f"# test: replaced {line.strip()!r}")
        elif not secure and _ANONYMOUS.match(line):
            lines.append(f"# test: replaced {line.strip()!r}")
            lines.append("allow_anonymous true")
        elif not secure and _ACCESS_FILE.match(line):
            lines.append(f"# test: dropped {line.strip()!r}")
        elif secure and SECURITY_PREFIX in line:
            lines.append(line.replace(SECURITY_PREFIX, f"{security_dir}/"))
        else:
            lines.append(line)
    if plain_seen == 0:
        raise ValueError("mosquitto.conf has no plain `listener` line; the tests need one to move")
    lines += [
        "",
        "# --- added by dockercomp.broker.processes ---",
        f"persistence_location {workdir / 'data'}/",
        f"log_dest file {workdir / 'mosquitto.log'}",
        # Readiness waits for the "running" line, logged at this level.
        "log_type information",
        # Started as root, Mosquitto drops to user `mosquitto`, which cannot write into
        # pytest's root-only tmp directory. Ignored when not started as root.
        "user root",
    ]
    if secure:
        # `dockercomp coordinator volunteers --pid-file` sends SIGHUP here, as an operator would.
        lines.append(f"pid_file {workdir / 'mosquitto.pid'}")
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
        security_dir: Path | None = None,
    ) -> None:
        super().__init__(workdir, host)
        found = binary or find_mosquitto()
        if found is None:
            raise FileNotFoundError("mosquitto binary not found")
        self.binary = found
        if not source_conf.is_file():
            raise FileNotFoundError(f"{source_conf} not found: pass source_conf, the mosquitto.conf to run")
        self.source_conf = source_conf
        # Set: the shipped access policy (passwords, ACL, TLS) with files from this directory.
        self.security_dir = security_dir
        self.tls_port = 0  # the TLS listener's port, when secure; kept across restarts
        self.ws_port = 0  # the (TLS) WebSockets listener's port, when secure; kept across restarts
        self.conf_path = workdir / "mosquitto.test.conf"
        # stdout/stderr apart from the log_dest file, which is mosquitto.log.
        self.log_path = workdir / "mosquitto.out"
        if security_dir is not None:
            self.pid_file = workdir / "mosquitto.pid"
        self._broker_log_offset = 0  # where this start's lines begin in mosquitto.log
        (workdir / "data").mkdir(exist_ok=True)

    def tls_url(self, host: str | None = None) -> str:
        """mqtts://HOST:TLS_PORT (add credentials and ?ca= yourself)."""
        if not self.tls_port:
            raise RuntimeError("this Mosquitto has no TLS listener (security_dir not set, or not started)")
        return f"mqtts://{host or self.host}:{self.tls_port}"

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
            if self.security_dir is not None:
                self.tls_port = free_port(self.host)
                # Only when the config has one: readiness waits for every port it knows.
                source_lines = self.source_conf.read_text().splitlines()
                self.ws_port = free_port(self.host) if _websockets_listener_lines(source_lines) else 0
            text = mosquitto_test_config(
                self.source_conf.read_text(), host=self.host, port=port, workdir=self.workdir,
                security_dir=self.security_dir, tls_port=self.tls_port or None, ws_port=self.ws_port or None,
            )
            self.conf_path.write_text(text)
        path = self.broker_log_path
        self._broker_log_offset = path.stat().st_size if path.exists() else 0
        return [self.binary, "-c", str(self.conf_path)]

    def _ready(self, port: int, log_offset: int) -> bool:
        # A port probe alone is fooled by whoever else listens on a port we lost the race
        # for; Mosquitto says "running" only once all its listeners are open.
        started = logged_since(self.broker_log_path, self._broker_log_offset, b" running")
        others_ready = all(port_accepts(self.host, p) for p in (self.tls_port, self.ws_port) if p)
        return started and port_accepts(self.host, port) and others_ready


class AmqttProcess(BrokerProcess):
    """`python -m dockercomp.broker.cli serve`: the embedded amqtt broker, in its own process."""

    name = "amqtt"
    persistent = False  # amqtt forgets retained messages on restart (broker/embedded.py)

    def __init__(self, workdir: Path, host: str = "127.0.0.1", *, security_dir: Path | None = None,
                 verbosity: int = 0) -> None:
        super().__init__(workdir, host)
        # Set: enforce security_dir/passwd and security_dir/acl, as the secure Mosquitto does.
        self.security_dir = security_dir
        # `serve -v` (connections) or `-vv` (every packet) into the log.
        self.verbosity = verbosity
        if security_dir is not None:
            self.pid_file = workdir / "amqtt.pid"

    def _command(self, port: int) -> list[str]:
        command = [
            sys.executable, "-m", "dockercomp.broker.cli", "serve",
            "--host", self.host, "--port", str(port),
        ]  # fmt: skip
        if self.verbosity:
            command.append("-" + "v" * self.verbosity)
        if self.security_dir is not None:
            command += [
                "--password-file", str(self.security_dir / "passwd"),
                "--acl-file", str(self.security_dir / "acl"),
                "--pid-file", str(self.pid_file),
            ]  # fmt: skip
        return command

    def _env(self) -> dict[str, str]:
        # Unbuffered: readiness is read from its output, line by line.
        return {**os.environ, "PYTHONUNBUFFERED": "1"}

    def _ready(self, port: int, log_offset: int) -> bool:
        # The CLI prints its URL only once amqtt listens, so no TCP probe: amqtt logs an
        # ERROR for a connection without CONNECT (and leaks its socket). Only this start's
        # output is read, so a line from a previous start cannot fool us.
        return f"listening on mqtt://{self.host}:{port}" in self.log()[log_offset:]
