"""Defaults of the volunteer installer, one place for every tunable (as rq's defaults.py)."""

from __future__ import annotations

# Worker image run when --image is not given; `make image` builds it under this name.
IMAGE = "dockercomp/worker:latest"

# Installation name when --instance is not given; a second instance keeps its own workers.
INSTANCE = "default"

# CPUs (a fraction is allowed) and memory each worker container may use at most.
CPUS_PER_WORKER = 1.0
MEMORY = "1g"

# Share of the machine's CPUs all workers together use when --cpus is not given: half, so a
# volunteer's own programs always keep the other half (BOINC's default is similar).
CPU_SHARE = 0.5

# CPU priority of workers: "low" gives them a small scheduler weight (cpu_shares; Docker's
# default is 1024), so the volunteer's programs win whenever both want the CPU, and makes the
# kernel's out-of-memory killer pick a worker before anything of the volunteer's.
PRIORITIES = ("low", "normal")
PRIORITY = "low"
LOW_CPU_SHARES = 128
LOW_OOM_SCORE_ADJ = 500

# Network mode: bridge isolates workers from the host; host reaches a broker on 127.0.0.1.
NETWORK = "bridge"
NETWORKS = ("bridge", "host")

# Seconds a worker gets after SIGTERM before Docker kills it: the agent's own drain grace
# (30 s, agent/defaults.py) plus time to hand back unfinished tasks and say offline.
GRACE_SECONDS = 40

# Seconds a rolling upgrade waits for a replaced worker to turn healthy before it halts.
HEALTH_TIMEOUT_SECONDS = 90

# Seconds `status` waits to connect to the broker, then for the retained counters to arrive.
STATUS_CONNECT_SECONDS = 5.0
STATUS_RETAINED_SECONDS = 2.0

# Seconds to wait for a TCP connection to the broker in the pre-flight check.
BROKER_CHECK_SECONDS = 5.0

# Seconds the Docker SDK waits for an answer from the engine on a normal API call.
ENGINE_TIMEOUT_SECONDS = 60

# Most processes one worker container may run: stops a runaway task from fork-bombing the host.
PIDS_LIMIT = 1024

# Container log rotation, so a chatty worker cannot fill a volunteer's disk.
LOG_MAX_SIZE = "10m"
LOG_MAX_FILES = "3"

# Label namespace of everything the installer creates; it only ever touches containers
# carrying LABEL_MANAGED_BY=MANAGED_BY.
LABEL_PREFIX = "org.dockercomp"
LABEL_MANAGED_BY = f"{LABEL_PREFIX}.managed-by"
MANAGED_BY = "installer"
LABEL_ROLE = f"{LABEL_PREFIX}.role"
LABEL_INSTANCE = f"{LABEL_PREFIX}.instance"
LABEL_SLOT = f"{LABEL_PREFIX}.slot"
LABEL_WORKER_ID = f"{LABEL_PREFIX}.worker-id"
LABEL_CONFIG = f"{LABEL_PREFIX}.config-hash"
LABEL_SPEC = f"{LABEL_PREFIX}.spec"

# Environment variable naming the installation (--instance).
INSTANCE_ENV = "DOCKERCOMP_INSTANCE"

# The environment variables the agent reads inside the container are the agent's own
# (dockercomp.agent.defaults: *_ENV) and the broker's (dockercomp.broker.defaults.BROKER_URL_ENV).

# Seconds `installer pause` / `resume` wait for each agent to confirm through its health file
# (the agent acts on the signal within one loop turn; `docker exec` of the check takes ~1 s).
CONTROL_TIMEOUT_SECONDS = 15.0
