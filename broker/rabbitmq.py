"""A RabbitMQ cluster with its MQTT plugin, started from Debian's `rabbitmq-server` on free ports.

Shipped (dockercomp.broker.rabbitmq) beside broker/processes.py because the test suite
(tests/support/rabbitmq.py) and the benchmark (bench/cluster.py) both start clusters this way,
and nothing outside tests/ may import tests. Imports only the standard library.

Everything is private to one cluster, so it can neither disturb nor be disturbed by a
RabbitMQ the machine runs (Debian's `rabbit@HOST`) or another cluster:
- its own epmd, on a free port, loopback only, stopped with the cluster (ERL_EPMD_PORT);
- per node: a node name `dcN-TOKEN@localhost`, AMQP, MQTT and distribution ports bound to
  127.0.0.1, and its own data (mnesia), log, config and enabled-plugins files;
- one Erlang cookie, in a HOME of the cluster's own (mode 0400, as Erlang insists).
The nodes run the real scripts in the package's bin directory, not the /usr/sbin wrappers,
which switch to the `rabbitmq` user when started as root.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path

from dockercomp.broker.processes import (
    BrokerProcess,
    BrokerStartError,
    free_port,
    logged_since,
    port_accepts,
    stop_process,
)

# Where Debian's package keeps the real scripts (the /usr/sbin names are wrappers to them).
RABBITMQ_BIN_DIRS = ("/usr/lib/rabbitmq/bin", "/usr/local/lib/rabbitmq/bin")
# Nodes in the cluster the tests and the bench run: the smallest with a majority left after
# losing one node (the MQTT plugin's client-id registry is a Raft cluster).
CLUSTER_SIZE = 3
# Seconds a node gets to boot: ~5 s alone on an idle 2-core machine, three at once on a
# loaded one take several times that.
NODE_START_TIMEOUT = 90.0
# Seconds one rabbitmqctl call may take (the CLI alone starts an Erlang VM: ~1.5 s).
CTL_TIMEOUT = 120.0
# Seconds the cluster gets to list every node as running after the joins.
CLUSTER_FORM_TIMEOUT = 60.0
# Seconds the whole start may take (boots, joins, forming, policy): each step gets what is left
# of it, so a stuck rabbitmqctl fails the start with its name instead of outlasting a caller's
# own timeout (~20-30 s is usual on an idle 2-core machine).
CLUSTER_START_TIMEOUT = 150.0
# Seconds epmd gets to listen.
EPMD_START_TIMEOUT = 10.0
# The line a node logs once every plugin (the MQTT listener too) runs.
STARTED_LINE = b"Server startup complete"
# What dockercomp needs of a RabbitMQ cluster beyond the MQTT plugin (README, "Running on a broker
# cluster"): the MQTT plugin keeps each client's subscriptions in a durable queue named after
# its client id, on the node it connected to. When that node dies the queue's record stays,
# and the same client id can subscribe on no other node ("home node ... is down"): agents
# could not fail over, nor a coordinator with a persistent session. Mirrored on a second node
# (RabbitMQ 3.10's only replication for these queues), the queue moves with its client.
MIRROR_POLICY = ("set_policy", "--apply-to", "queues", "dockercomp-mqtt-mirrored", "^mqtt-subscription-",
                 '{"ha-mode":"exactly","ha-params":2,"ha-sync-mode":"automatic"}')
# Every distribution socket on the loopback interface only (nodes and CLI tools alike).
LOOPBACK_DIST = "-kernel inet_dist_use_interface {127,0,0,1}"


# Clusters started and not closed yet: closed when the interpreter exits (an aborted test run),
# epmd included, which BrokerProcess's own clean-up does not know about.
_live: weakref.WeakSet[RabbitCluster] = weakref.WeakSet()


@atexit.register
def _close_leftovers() -> None:
    for cluster in list(_live):
        cluster.close()


def find_rabbitmq() -> Path | None:
    """The directory holding the real rabbitmq-server and rabbitmqctl scripts, or None."""
    candidates = [Path(d) for d in RABBITMQ_BIN_DIRS]
    found = shutil.which("rabbitmq-server", path=os.environ.get("PATH", "") + ":/usr/sbin:/usr/local/sbin")
    if found:
        candidates.append(Path(found).resolve().parent)
    for bindir in candidates:
        if (bindir / "rabbitmq-server").is_file() and (bindir / "rabbitmqctl").is_file():
            return bindir
    return None


def find_epmd() -> str | None:
    """Erlang's port mapper daemon (installed with erlang-base, which rabbitmq-server needs)."""
    found = shutil.which("epmd")
    if found:
        return found
    bundled = sorted(Path("/usr/lib/erlang").glob("erts-*/bin/epmd"))
    return str(bundled[-1]) if bundled else None


class RabbitNode(BrokerProcess):
    """One RabbitMQ node of a RabbitCluster; `.url` is its MQTT listener.

    `.kill()` is a crash of the whole node (SIGKILL to beam.smp: no will is published for its
    clients, its TCP connections just drop); `.stop()` a graceful shutdown (SIGTERM, which
    RabbitMQ handles as `rabbitmqctl stop`). `.start()` after either brings it back on the
    same ports and data, and it rejoins its cluster.
    """

    name = "rabbitmq"
    persistent = True  # retained messages and durable sessions survive a restart (per node)
    start_timeout = NODE_START_TIMEOUT
    # Until the script execs the VM it runs Erlang helpers of its own: a start that runs out of
    # time kills them with it (the group), or they would outlive the cluster.
    process_group = True

    def __init__(self, cluster: RabbitCluster, index: int) -> None:
        super().__init__(cluster.workdir / f"node{index}", cluster.host)
        self.cluster = cluster
        self.nodename = f"dc{index}-{cluster.token}@localhost"
        self.amqp_port = 0
        self.dist_port = 0
        self.data_dir = self.workdir / "mnesia"
        self.log_dir = self.workdir / "log"
        self.conf_path = self.workdir / "rabbitmq.conf"
        self.plugins_path = self.workdir / "enabled_plugins"
        self.log_path = self.workdir / "rabbitmq.out"  # the scripts' own output
        self._node_log_offset = 0
        for directory in (self.data_dir, self.log_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self.plugins_path.write_text("[rabbitmq_mqtt].\n")

    @property
    def node_log_path(self) -> Path:
        return self.log_dir / f"{self.nodename}.log"

    def log(self) -> str:
        own = self.node_log_path.read_text(errors="replace") if self.node_log_path.exists() else ""
        return super().log() + own

    def ctl(self, *args: str, timeout: float = CTL_TIMEOUT) -> str:
        """`rabbitmqctl -n NODE ARGS...`; raises RuntimeError with its output when it fails."""
        return self.cluster.ctl(self.nodename, *args, timeout=timeout)

    def _command(self, port: int) -> list[str]:
        if port != self.port:  # first start, or a retry on another port: new side ports too
            self.amqp_port = free_port(self.host)
            self.dist_port = free_port(self.host)
            self.conf_path.write_text(
                f"listeners.tcp.default = {self.host}:{self.amqp_port}\n"
                f"mqtt.listeners.tcp.default = {self.host}:{port}\n"
                # Clients without credentials act as guest, which RabbitMQ only lets in
                # from the loopback interface: all there is here.
                "mqtt.allow_anonymous = true\n"
                "log.file.level = info\n"
                "log.console = false\n"
            )
        log = self.node_log_path
        self._node_log_offset = log.stat().st_size if log.exists() else 0
        return [str(self.cluster.bindir / "rabbitmq-server")]

    def _env(self) -> dict[str, str]:
        return {
            **self.cluster.env(),
            # The script then execs the VM instead of waiting on it as a child, so our
            # process is beam.smp itself: kill() is a real crash of the node, and stop()'s
            # SIGTERM reaches RabbitMQ, which treats it as `rabbitmqctl stop`.
            "RUNNING_UNDER_SYSTEMD": "true",
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": self.host,
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": LOOPBACK_DIST,
            "RABBITMQ_MNESIA_BASE": str(self.data_dir),
            "RABBITMQ_MNESIA_DIR": str(self.data_dir / self.nodename),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(self.workdir / "plugins-expand"),
            "RABBITMQ_LOG_BASE": str(self.log_dir),
            "RABBITMQ_CONFIG_FILE": str(self.conf_path),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.workdir / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.plugins_path),
            "RABBITMQ_PID_FILE": str(self.workdir / "rabbitmq.pid"),
        }

    def _ready(self, port: int, log_offset: int) -> bool:
        # The MQTT port alone could be someone else's (a lost race for a free port); the node
        # says it started only once all its listeners are open.
        started = logged_since(self.node_log_path, self._node_log_offset, STARTED_LINE)
        return started and port_accepts(self.host, port)


class RabbitCluster:
    """CLUSTER_SIZE RabbitMQ nodes with the MQTT plugin, joined into one cluster on 127.0.0.1.

    `.nodes[i]` are RabbitNodes (`.url`, `.kill()`, `.stop()`, `.start()`), `.urls` their
    MQTT URLs. `.start()` returns once every node runs in the cluster; `.close()` stops
    everything it started, its epmd included, and leaves no process behind.
    """

    def __init__(self, workdir: Path, size: int = CLUSTER_SIZE, host: str = "127.0.0.1",
                 bindir: Path | None = None) -> None:
        found = bindir or find_rabbitmq()
        if found is None:
            raise FileNotFoundError("rabbitmq-server not found (apt-get install rabbitmq-server)")
        epmd = find_epmd()
        if epmd is None:
            raise FileNotFoundError("epmd not found (it comes with erlang-base)")
        self.bindir = found
        self.epmd_binary = epmd
        self.workdir = workdir
        self.host = host
        # In every node name, so two clusters (two test runs, a test and the bench) never meet.
        self.token = secrets.token_hex(3)
        self.home = workdir / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(secrets.token_hex(20))
            cookie.chmod(0o400)  # Erlang refuses a cookie file others can read
        self.epmd_port = 0
        self._epmd: subprocess.Popen[bytes] | None = None
        self._deadline = math.inf  # of the running start()
        self.steps: list[str] = []  # what the last start() did, as it told ``progress``
        self.nodes = [RabbitNode(self, index) for index in range(1, size + 1)]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def env(self) -> dict[str, str]:
        """What every node and CLI call of this cluster shares: cookie, epmd, no system config."""
        return {
            **os.environ,
            "HOME": str(self.home),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": self.host,
            # Not /etc/rabbitmq/rabbitmq-env.conf: the machine's settings are not ours.
            "RABBITMQ_CONF_ENV_FILE": str(self.workdir / "rabbitmq-env.conf"),
            "RABBITMQ_CTL_ERL_ARGS": LOOPBACK_DIST,
        }

    def ctl(self, nodename: str, *args: str, timeout: float = CTL_TIMEOUT) -> str:
        """`rabbitmqctl -n NODENAME ARGS...`; RuntimeError with its output when it fails or
        runs out of time (during ``start``, of what is left of the start's)."""
        command = [str(self.bindir / "rabbitmqctl"), "-n", nodename, *args]
        timeout = min(timeout, self._left())
        try:
            result = subprocess.run(command, env=self.env(), capture_output=True, text=True,
                                    timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"rabbitmqctl {' '.join(command[1:])} did not finish within {timeout:.0f} s") from None
        if result.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(command[1:])} exited {result.returncode}:\n"
                               f"{result.stdout}\n{result.stderr}")
        return result.stdout

    def start(self, timeout: float = CLUSTER_START_TIMEOUT, progress: Callable[[str], None] | None = None) -> RabbitCluster:
        """Boots every node at once, then joins the others to the first, one after the other
        (stop_app, join_cluster, start_app, as an operator would) and sets MIRROR_POLICY, all within
        ``timeout``; ``progress`` is told each step as it ends. Stops whatever it started if
        that fails."""
        _live.add(self)
        began = time.monotonic()
        self.steps = []
        self._deadline = began + timeout
        say = progress or (lambda line: None)

        def step(what: str) -> None:
            line = f"{what} ({time.monotonic() - began:.1f} s)"
            self.steps.append(line)
            say(line)

        try:
            self._start_epmd()
            for node in self.nodes:
                node.start_timeout = min(NODE_START_TIMEOUT, self._left())
            self._each(lambda node: (node.start(), step(f"{node.nodename} booted")), self.nodes)
            for node in self.nodes[1:]:
                # One at a time, as RabbitMQ's docs do: two nodes joining at once change the
                # schema together, and a node's start_app then failed now and then in CI
                # ({badmatch, {error, {normal, {mnesia_app, start, ...}}}}, exit 69).
                self._join(node)
                step(f"{node.nodename} joined")
            self.wait_formed(min(CLUSTER_FORM_TIMEOUT, self._left()))
            step("cluster formed")
            self.nodes[0].ctl(*MIRROR_POLICY)
            step("mirroring policy set")
        except BaseException:
            self.close()
            raise
        finally:
            self._deadline = math.inf
            for node in self.nodes:  # a node started on its own later gets its full time again
                node.start_timeout = NODE_START_TIMEOUT
        return self

    def _left(self) -> float:
        """Seconds left of the running start's timeout (unbounded outside ``start``)."""
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError("the cluster did not start within its time (CLUSTER_START_TIMEOUT); "
                               "see the nodes' logs")
        return left

    def _join(self, node: RabbitNode) -> None:
        node.ctl("stop_app")
        node.ctl("join_cluster", self.nodes[0].nodename)
        node.ctl("start_app")
        deadline = time.monotonic() + min(NODE_START_TIMEOUT, self._left())
        while not port_accepts(node.host, node.port):  # start_app reopens the MQTT listener
            if time.monotonic() > deadline:
                raise BrokerStartError(f"{node.nodename} did not reopen MQTT after joining", node.log())
            time.sleep(0.1)

    def running_nodes(self, via: RabbitNode | None = None) -> list[str]:
        """The node names the cluster (as `via`, default the first running node, sees it) runs."""
        asker = via or next(node for node in self.nodes if node.running)
        status = json.loads(asker.ctl("cluster_status", "--formatter", "json"))
        return sorted(status.get("running_nodes", []))

    def wait_formed(self, timeout: float = CLUSTER_FORM_TIMEOUT) -> None:
        """Until every running node is listed as running by the cluster."""
        wanted = sorted(node.nodename for node in self.nodes if node.running)
        deadline = time.monotonic() + timeout
        while (seen := self.running_nodes()) != wanted:
            if time.monotonic() > deadline:
                raise BrokerStartError(f"cluster runs {seen}, expected {wanted}", self.nodes[0].log())
            time.sleep(0.5)

    def close(self) -> None:
        """Kills every node (the data is thrown away, so no graceful stop is owed) and epmd,
        then whatever of this cluster still runs (``leftovers``: e.g. a helper of a node's start
        script that left its process group); returns once none is left (at most 5 s)."""
        self._each(lambda node: node.kill(), self.nodes)
        if self._epmd is not None:
            stop_process(self._epmd)
            self._epmd = None
        deadline = time.monotonic() + 5.0
        while (left := self.leftovers()) and time.monotonic() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(0.05)
        _live.discard(self)

    def leftovers(self) -> list[int]:
        """Pids of processes of this cluster still alive (zombies aside): its nodes (their command
        line names its HOME) and its epmd. None once close() returned."""
        home = str(self.home).encode()
        epmd = f"-port\0{self.epmd_port}\0".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                command = (entry / "cmdline").read_bytes()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue  # gone meanwhile, or not ours to read
            if state != "Z" and (home in command or (b"epmd" in command and epmd in command)):
                found.append(int(entry.name))
        return found

    def _start_epmd(self) -> None:
        # Our own epmd, in the foreground as our child: a shared one would outlive the
        # cluster (epmd -daemon detaches), and another RabbitMQ's would see our nodes.
        self.epmd_port = free_port(self.host)
        self._epmd = subprocess.Popen(
            [self.epmd_binary, "-port", str(self.epmd_port), "-address", self.host],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + EPMD_START_TIMEOUT
        while not port_accepts(self.host, self.epmd_port):
            if self._epmd.poll() is not None or time.monotonic() > deadline:
                raise BrokerStartError(f"epmd did not listen on {self.host}:{self.epmd_port}", "")
            time.sleep(0.05)

    @staticmethod
    def _each(action: Callable[[RabbitNode], None], nodes: list[RabbitNode]) -> None:
        """Runs action(node) for every node at once (a node boots in seconds, mostly waiting);
        re-raises the first failure once all are done."""
        errors: list[BaseException] = []

        def run(node: RabbitNode) -> None:
            try:
                action(node)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(node,), daemon=True) for node in nodes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    def __enter__(self) -> RabbitCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RabbitCluster {' '.join(self.urls)}>"
