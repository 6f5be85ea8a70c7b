"""A three-node RabbitMQ cluster with its MQTT plugin, for the tests of a clustered broker.

The nodes are dockercomp.broker.rabbitmq's (the bench starts the same ones): each with its own
node name, ports on 127.0.0.1, data and log directories, one cookie, a private epmd.

- `rabbitmq_cluster` (module scope: booting and joining three nodes takes ~20 s on two loaded
  cores) is the RabbitCluster itself;
- `cluster` (per test) is the same cluster with every node running again (a test may have
  stopped or killed one; `.nodes[i].kill()` is a crash, `.nodes[i].stop()` a clean stop),
  and prints the nodes' logs when the test failed.

Nodes let MQTT clients in without credentials (as `guest`, which RabbitMQ only admits over
the loopback interface). A missing rabbitmq-server skips on a laptop and fails under CI.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dockercomp.broker.rabbitmq import RabbitCluster, RabbitNode, find_rabbitmq
from tests.support import require

__all__ = ["RabbitCluster", "RabbitNode", "cluster", "rabbitmq_cluster", "restore"]


@pytest.fixture(scope="module")
def rabbitmq_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitCluster]:
    """Three RabbitMQ 3.10 nodes joined into one cluster, for the whole test module."""
    bindir = find_rabbitmq()
    require(bindir, "RabbitMQ (rabbitmq-server with its MQTT plugin)",
            "apt-get install rabbitmq-server (or run `make system`)")
    cluster = RabbitCluster(tmp_path_factory.mktemp("rabbitmq"), bindir=bindir)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.close()
    # Torn down completely: no node (beam.smp) and no epmd of this cluster left running.
    assert not cluster.leftovers(), f"processes of the cluster still running: {cluster.leftovers()}"


def restore(cluster: RabbitCluster) -> None:
    """Starts every node a test stopped or killed, and waits until all run in the cluster."""
    stopped = [node for node in cluster.nodes if not node.running]
    for node in stopped:
        node.start()
    if stopped:
        cluster.wait_formed()


@pytest.fixture
def cluster(request: pytest.FixtureRequest, rabbitmq_cluster: RabbitCluster) -> Iterator[RabbitCluster]:
    """The module's cluster with all its nodes running; their logs are printed if the test fails."""
    restore(rabbitmq_cluster)
    yield rabbitmq_cluster
    if getattr(getattr(request.node, "report_call", None), "failed", False):
        for node in rabbitmq_cluster.nodes:
            print(f"\n--- {node.nodename} log ({node.workdir}) ---\n{node.log()[-3000:]}")
