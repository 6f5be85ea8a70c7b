"""What every benchmark phase needs: brokers, child processes, /proc readings, statistics.

Brokers are the test suite's own (dockercomp.broker.processes): Mosquitto started from the
repository's mosquitto.conf with only its listener, data and log lines moved into a work
directory, and `dockercomp broker serve` (the embedded amqtt broker) in its own process. So the
benchmark measures exactly the configuration that ships and that the tests exercise.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import paho.mqtt.client as mqtt

from bench.defaults import POLL_INTERVAL
from bench.errors import BenchError, PhaseTimeout
from dockercomp.broker.processes import AmqttProcess, BrokerProcess, MosquittoProcess, find_mosquitto

REPO_ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- brokers
def start_broker(kind: str, workdir: Path) -> BrokerProcess:
    """A running broker process (`.url`, `.port`, `.pid`, `.stop()`): "mosquitto" or "amqtt"."""
    if kind == "mosquitto":
        binary = find_mosquitto()
        if binary is None:
            raise BenchError("mosquitto is not installed: apt-get install mosquitto (or `make system`)")
        broker: BrokerProcess = MosquittoProcess(workdir / "mosquitto", binary=binary)
    elif kind == "amqtt":
        broker = AmqttProcess(workdir / "amqtt")
    else:
        raise BenchError(f"unknown broker kind {kind!r}: use mosquitto or amqtt")
    try:
        broker.start()
    except (OSError, RuntimeError) as exc:  # BrokerStartError carries the broker's log
        raise BenchError(f"{kind} did not start: {exc}") from None
    return broker


def broker_version(kind: str) -> str:
    if kind == "mosquitto":
        try:
            out = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True, timeout=10,
                                 env={**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin"})
            return (out.stdout or out.stderr).splitlines()[0].replace("mosquitto version ", "")
        except (OSError, IndexError, subprocess.SubprocessError):
            return "unknown"
    return package_version("amqtt")


def package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


# --------------------------------------------------------------------------- processes
class Child:
    """A child process with its output in a log file, readable when something goes wrong."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        child_env = dict(os.environ if env is None else env)
        child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), child_env.get("PYTHONPATH")]))
        child_env.setdefault("PYTHONUNBUFFERED", "1")
        with open(log_path, "ab") as log_file:
            self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                            stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=child_env)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def check_alive(self) -> None:
        """Raise with the child's log tail if it exited: a phase waiting on it would hang."""
        if not self.alive():
            raise BenchError(f"{self.name} exited with code {self.process.returncode}; "
                             f"its log ({self.log_path}) ends with:\n{self.log_tail()}")

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (a clean drain), then SIGKILL if it does not exit in time."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def console_script(name: str) -> list[str]:
    """argv prefix running one of our console scripts with this interpreter."""
    # The package, not its cli module: run as __main__, cli.py would be a second copy of itself,
    # on which the commands of cli_jobs.py (submit, ...) are not registered.
    modules = {"coordinator": "dockercomp.coordinator", "agent": "dockercomp.agent.cli", "broker": "dockercomp.broker.cli"}
    return [sys.executable, "-m", modules[name]]


@dataclass(frozen=True)
class ProcSample:
    """One reading of a process from /proc."""

    cpu_seconds: float  # user + system time so far
    rss_mb: float  # resident set size now
    peak_rss_mb: float  # highest resident set size so far (VmHWM)


def proc_sample(pid: int) -> ProcSample:
    with open(f"/proc/{pid}/stat") as f:
        # The command name may contain spaces; fields after the closing parenthesis are fixed.
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    rss = peak = 0.0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    return ProcSample(cpu, rss, peak)


def descendants(pid: int) -> list[int]:
    """Live children, grandchildren... of ``pid`` (e.g. an agent's task processes)."""
    found: list[int] = []
    stack = [pid]
    while stack:
        parent = stack.pop()
        try:
            tids = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            found += kids
            stack += kids
    return found


def cpu_seconds(pids: Sequence[int], *, with_children: bool = True) -> float:
    """User + system CPU seconds so far of these processes (and their live descendants).
    This process is always counted alone: its children (brokers, workers) are measured apart."""
    total = 0.0
    seen: set[int] = set()
    for pid in pids:
        family = descendants(pid) if with_children and pid != os.getpid() else []
        for one in [pid, *family]:
            if one in seen:
                continue
            seen.add(one)
            try:
                total += proc_sample(one).cpu_seconds
            except (OSError, IndexError, ValueError):
                pass  # exited meanwhile: its time is lost, which only understates its share
    return total


class CpuMeter:
    """CPU seconds spent by named groups of processes between ``start()`` and ``stop()``.
    Each process counts with its live descendants, except in the groups named in ``alone``."""

    def __init__(self, groups: dict[str, Sequence[int]], *, alone: Sequence[str] = ()) -> None:
        self.groups = {name: list(pids) for name, pids in groups.items()}
        self.alone = set(alone)
        self._start: dict[str, float] = {}
        self._wall = 0.0

    def _read(self) -> dict[str, float]:
        return {name: cpu_seconds(pids, with_children=name not in self.alone) for name, pids in self.groups.items()}

    def start(self) -> None:
        self._wall = time.perf_counter()
        self._start = self._read()

    def stop(self) -> "CpuUse":
        now = self._read()
        return CpuUse(time.perf_counter() - self._wall, {name: now[name] - self._start[name] for name in now})


@dataclass(frozen=True)
class CpuUse:
    wall_s: float
    seconds: dict[str, float]  # CPU seconds per group

    def per_task_ms(self, tasks: int) -> dict[str, float]:
        return {name: round(cpu * 1000 / tasks, 4) for name, cpu in self.seconds.items()}

    @property
    def busy(self) -> float:
        """Share of the machine's CPU these groups used (1.0 = every core busy all along)."""
        return round(sum(self.seconds.values()) / (self.wall_s * (os.cpu_count() or 1)), 3) if self.wall_s else 0.0


# --------------------------------------------------------------------------- waiting
def wait_for(condition: Callable[[], T], timeout: float, what: str, *,
             interval: float = POLL_INTERVAL, check: Callable[[], None] | None = None) -> T:
    """Poll until ``condition()`` is truthy and return it; PhaseTimeout naming ``what`` otherwise.
    ``check`` runs on every poll to fail fast (e.g. a child process died)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if check is not None:
            check()
        if time.monotonic() > deadline:
            raise PhaseTimeout(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(interval)


# --------------------------------------------------------------------------- MQTT clients
def raw_client(client_id: str, *, inflight: int = 0) -> mqtt.Client:
    """A bare paho client as fast as paho goes: MQTT 3.1.1, clean session, no paho in-flight
    limit (its default of 20 would throttle the window, and any limit makes paho walk every
    unacknowledged message on each PUBACK). Callers bound what they have outstanding."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True,
                         protocol=mqtt.MQTTv311)
    client.max_inflight_messages_set(inflight)
    client.max_queued_messages_set(0)
    return client


def set_nodelay(client: mqtt.Client) -> None:
    """TCP_NODELAY on the client's socket, as broker.connection does (Nagle + delayed ACK
    cost ~3.6x with small request/reply messages)."""
    sock = client.socket()
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# --------------------------------------------------------------------------- statistics
def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of already sorted values; 0.0 when empty."""
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, math.ceil(q / 100.0 * len(sorted_values)) - 1))
    return sorted_values[rank]


@dataclass(frozen=True)
class Latency:
    """Latency distribution in milliseconds."""

    count: int
    p50_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of_seconds(cls, values: Sequence[float]) -> "Latency":
        ordered = sorted(values)
        return cls(len(ordered), round(percentile(ordered, 50) * 1000, 3),
                   round(percentile(ordered, 99) * 1000, 3), round((ordered[-1] if ordered else 0.0) * 1000, 3))
