"""The broker(s) a scale run's simulated workers connect to: one Mosquitto, or, when the fleet
is larger than one process may hold, a hub and bridged leaves.

One Mosquitto process holds one file descriptor per connection, so it can never hold more
connections than its RLIMIT_NOFILE hard limit (raising it takes CAP_SYS_RESOURCE, which a
container often lacks), and loopback gives one destination port about as many source ports as
net.ipv4.ip_local_port_range holds. Past that, the coordinator's broker (the hub, the one
whose CPU is measured with it) gets leaves: Mosquitto bridges, each holding part of the fleet
on its own port and forwarding presence and results up, and only its own volunteers' tasks
and the rebirth requests down (per-volunteer topic lines, so a task crosses one bridge).

``start_fleet_brokers`` is the one place a scale run gets its brokers, so another broker
(a RabbitMQ cluster) can be slotted in behind the same ``FleetBrokers`` shape.
"""

from __future__ import annotations

import math
import resource
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.defaults import START_TIMEOUT
from bench.errors import BenchError
from bench.harness import wait_for
from dockercomp.broker.processes import MosquittoProcess, find_mosquitto

# File descriptors a Mosquitto process keeps for itself (listeners, log, persistence, bridge).
_FD_MARGIN = 64
# Source ports left free on loopback for everything else the machine does meanwhile.
_PORT_MARGIN = 1_000


def raise_fd_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit, for this process and every child it starts
    (swarms, brokers); returns (soft, hard) as they are now. The hard limit is what it is:
    raising it needs CAP_SYS_RESOURCE."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def ephemeral_ports() -> int:
    try:
        low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return high - low + 1
    except (OSError, ValueError):
        return 28_232  # Linux's default range, 32768-60999


def connections_per_process() -> tuple[int, str]:
    """How many client connections one broker (or swarm) process can hold here, and why."""
    soft, hard = raise_fd_limit()
    by_fds = (hard if hard != resource.RLIM_INFINITY else 1 << 20) - _FD_MARGIN
    by_ports = ephemeral_ports() - _PORT_MARGIN
    if by_fds <= by_ports:
        return by_fds, (f"file descriptors: RLIMIT_NOFILE hard limit {hard} (raising it needs "
                        "CAP_SYS_RESOURCE)")
    return by_ports, f"loopback source ports: net.ipv4.ip_local_port_range holds {ephemeral_ports()}"


class _Leaf(MosquittoProcess):
    """The repository's Mosquitto with a bridge to the hub appended to its configuration."""

    def __init__(self, workdir: Path, bridge: list[str], binary: str) -> None:
        super().__init__(workdir, binary=binary)
        self.bridge = bridge

    def _command(self, port: int) -> list[str]:
        argv = super()._command(port)
        text = self.conf_path.read_text()
        if "\nconnection hub\n" not in text:
            self.conf_path.write_text(text + "\n# bench: a leaf of the scale run's hub\n" + "\n".join(self.bridge) + "\n")
        return argv


def _bridge(hub: MosquittoProcess, root: str, volunteers: list[str], client_id: str) -> list[str]:
    lines = ["connection hub", f"address {hub.host}:{hub.port}", f"remote_clientid {client_id}",
             "bridge_protocol_version mqttv311",
             "try_private true", "cleansession true", "notifications false", "start_type automatic",
             f"topic {root}/workers/+/+/presence out 1", f"topic {root}/workers/+/+/results out 1",
             f"topic {root}/coordinator/rebirth in 1"]
    return lines + [f"topic {root}/workers/{volunteer}/+/tasks in 1" for volunteer in volunteers]


@dataclass
class FleetBrokers:
    """Where the coordinator connects (``url``) and where each swarm process does."""

    url: str
    host: str
    port: int
    endpoints: list[tuple[str, int]]  # one per swarm process
    pids: list[int]  # every broker process: their CPU is the "broker" group
    per_process: int
    limited_by: str
    processes: list[Any] = field(default_factory=list)

    @property
    def leaves(self) -> int:
        return len(self.processes) - 1

    def describe(self) -> dict[str, Any]:
        return {"kind": "mosquitto", "leaves": self.leaves, "connections_per_process": self.per_process,
                "limited_by": self.limited_by}

    def stop(self) -> None:
        for broker in reversed(self.processes):
            broker.stop()


def plan(workers: int, processes: int) -> tuple[int, int]:
    """(leaves, swarm processes) for ``workers``: no leaf when one broker holds them all; else
    enough leaves, and a multiple of them in swarm processes so each leaf gets whole ones."""
    per_process, _ = connections_per_process()
    # The coordinator, the bridges and this process's own clients need a few connections too.
    leaves = 0 if workers <= per_process - 16 else math.ceil(workers / (per_process - 16))
    buckets = max(leaves, 1)
    processes = max(processes, buckets, math.ceil(workers / (per_process - 16)))
    return leaves, buckets * math.ceil(processes / buckets)


def start_fleet_brokers(workdir: Path, root: str, groups: list[list[str]], leaves: int) -> FleetBrokers:
    """The hub, and ``leaves`` leaves; ``groups`` holds each swarm process's volunteers (their
    tasks' topics are bridged to the leaf that process connects to)."""
    binary = find_mosquitto()
    if binary is None:
        raise BenchError("mosquitto is not installed: apt-get install mosquitto (or `make system`)")
    per_process, limited_by = connections_per_process()
    hub = MosquittoProcess(workdir / "hub", binary=binary)
    started: list[Any] = []
    try:
        _start(hub, "the scale run's Mosquitto")
        started.append(hub)
        endpoints = [(hub.host, hub.port)] * len(groups)
        for leaf_index in range(leaves):
            mine = [k for k in range(len(groups)) if k * leaves // len(groups) == leaf_index]
            volunteers = sorted({v for k in mine for v in groups[k]})
            client_id = f"bench-leaf{leaf_index}"
            leaf = _Leaf(workdir / f"leaf{leaf_index}", _bridge(hub, root, volunteers, client_id), binary)
            _start(leaf, f"leaf Mosquitto {leaf_index}")
            started.append(leaf)
            # A presence published before its bridge is up would never reach the hub.
            wait_for(lambda: f" as {client_id} ".encode() in hub.broker_log_path.read_bytes(), START_TIMEOUT,
                     f"leaf Mosquitto {leaf_index} bridging to the hub")
            for k in mine:
                endpoints[k] = (leaf.host, leaf.port)
    except BaseException:
        for broker in reversed(started):
            broker.stop()
        raise
    return FleetBrokers(url=hub.url, host=hub.host, port=hub.port, endpoints=endpoints,
                        pids=[b.pid for b in started], per_process=per_process, limited_by=limited_by,
                        processes=started)


def _start(broker: MosquittoProcess, what: str) -> None:
    try:
        broker.start()
    except (OSError, RuntimeError) as exc:
        raise BenchError(f"{what} did not start: {exc}") from None
