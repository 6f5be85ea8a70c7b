"""The scale phase's brokers as a three-node RabbitMQ cluster with its MQTT plugin, instead of
one Mosquitto: `python -m bench --only scale --broker rabbitmq-cluster`.

The nodes are dockercomp.broker.rabbitmq's, as the cluster tests start them (own epmd, node
names, cookie, loopback ports, the queue-mirroring policy dockercomp needs). The coordinator
connects to the first node, and the swarm processes of simulated workers are dealt over all
three in turn, as a load balancer in front of a cluster would spread volunteers. The "broker"
CPU group is the three nodes' beam.smp processes together, so the figures read beside
Mosquitto's: per task, what the whole cluster burns against what one Mosquitto burns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.errors import BenchError
from bench.fleetbrokers import FleetBrokers, connections_per_process
from dockercomp.broker.rabbitmq import CLUSTER_SIZE, RabbitCluster, find_rabbitmq

# What `--broker` accepts: the scale run's default, and this module's.
BROKERS = ("mosquitto", "rabbitmq-cluster")


@dataclass
class ClusterBrokers(FleetBrokers):
    """FleetBrokers whose one "hub" is a RabbitMQ cluster (no leaves: every node takes clients)."""

    cluster: RabbitCluster | None = None

    @property
    def leaves(self) -> int:
        return 0

    def describe(self) -> dict[str, Any]:
        nodes = len(self.cluster.nodes) if self.cluster is not None else 0
        return {"kind": "rabbitmq-cluster", "nodes": nodes, "leaves": 0,
                "connections_per_process": self.per_process, "limited_by": self.limited_by}

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.close()


def start_cluster_brokers(workdir: Path, swarms: int, size: int = CLUSTER_SIZE,
                          say: Callable[[str], None] = lambda line: None) -> ClusterBrokers:
    """A started cluster of `size` nodes; swarm process k connects to node k mod size. Each
    step of its start is said as it ends (a slow one is seen while it runs long)."""
    bindir = find_rabbitmq()
    if bindir is None:
        raise BenchError("rabbitmq-server is not installed: apt-get install rabbitmq-server (or `make system`)")
    per_process, limited_by = connections_per_process()
    cluster = RabbitCluster(workdir / "rabbitmq", size=size, bindir=bindir)
    try:
        cluster.start(progress=lambda line: say(f"rabbitmq cluster: {line}"))
    except (OSError, RuntimeError) as exc:
        raise BenchError(f"the RabbitMQ cluster did not start: {exc}") from None
    first = cluster.nodes[0]
    endpoints = [(node.host, node.port) for k in range(swarms) for node in [cluster.nodes[k % size]]]
    return ClusterBrokers(url=first.url, host=first.host, port=first.port, endpoints=endpoints,
                          pids=[node.pid for node in cluster.nodes if node.pid is not None],
                          per_process=per_process, limited_by=limited_by, processes=list(cluster.nodes),
                          cluster=cluster)
