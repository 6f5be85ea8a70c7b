"""Defaults of the worker agent, gathered in one place (as rq's defaults.py).

Broker-wide defaults (keepalive, payload limit, topic root) live in broker/defaults.py.
"""

from __future__ import annotations

# Seconds a draining agent lets running tasks finish before it kills and reports them.
GRACE_SECONDS = 30.0

# Environment variables read by `dockercomp agent run` (the worker image is configured only by these).
WORKER_ID_ENV = "DOCKERCOMP_WORKER_ID"
VOLUNTEER_ENV = "DOCKERCOMP_VOLUNTEER"
CONCURRENCY_ENV = "DOCKERCOMP_CONCURRENCY"
PREFETCH_ENV = "DOCKERCOMP_PREFETCH"
USERNAME_ENV = "DOCKERCOMP_USERNAME"
PASSWORD_ENV = "DOCKERCOMP_PASSWORD"
# Idle-only mode and its threshold (`agent run --idle-only --max-load`; the installer sets them).
IDLE_ONLY_ENV = "DOCKERCOMP_IDLE_ONLY"
MAX_LOAD_ENV = "DOCKERCOMP_MAX_LOAD"
# A file that exists while the volunteer has the worker paused, so a pause outlives a restart
# (`agent run --pause-file`; the installer points it into the container's own file system).
PAUSE_FILE_ENV = "DOCKERCOMP_PAUSE_FILE"
# Seconds between heartbeats (`agent run --heartbeat`; 0: none, only wills and rebirth answers).
HEARTBEAT_ENV = "DOCKERCOMP_HEARTBEAT"
# Image name and tag, set by whoever starts the container; shown in the presence.
IMAGE_ENV = "DOCKERCOMP_IMAGE"
# Where `dockercomp agent run` writes its health and `dockercomp agent check` reads it.
HEALTH_FILE_ENV = "DOCKERCOMP_HEALTH_FILE"

# Health file when DOCKERCOMP_HEALTH_FILE is unset: one agent per container, so one file.
HEALTH_FILE = "/tmp/dockercomp-agent-health.json"

# Longest pause between two health-file writes, in seconds (shorter when keepalive is).
HEALTH_INTERVAL_SECONDS = 5.0

# `dockercomp agent check` calls the health file stale after this many keepalives without an update...
HEALTH_STALE_KEEPALIVES = 3
# ...but never sooner than this many seconds (a busy 2-core machine can lag).
HEALTH_STALE_MIN_SECONDS = 15.0

# Entry-point group under which task packages register their functions.
ENTRY_POINT_GROUP = "dockercomp.tasks"

# Tasks queued beyond the running ones; more is a coordinator bug, answered with `rejected`.
MAX_QUEUED_TASKS = 10_000

# (task_id, attempt) pairs remembered after they finish, with their result, so a redelivery
# (the coordinator resends open attempts after it restarts) is answered again without rerunning.
REMEMBERED_FINISHED = 10_000

# Results larger than this are not kept for re-sending; a redelivery of their task runs it again.
REMEMBERED_RESULT_BYTES = 16 * 1024

# `dockercomp agent run --prefetch` when not given is the concurrency: one task waiting per slot, so a
# slot that frees up starts its next task at once instead of waiting a coordinator round trip.
PREFETCH_PER_SLOT = 1

# Tasks the agent takes per message (`agent run --batch`, announced in its presence; the
# coordinator grants at most broker.defaults.MAX_BATCH_ITEMS): its whole in-flight window in one
# message for any usual --concurrency/--prefetch, so MQTT's per-message cost is paid once per batch.
TASK_BATCH = 100

# Longest a finished task's result waits for others to share its ResultBatch message, in
# seconds; only while other tasks are still in flight here (a lone task's result goes at once).
# Measured in turns on 2 cores (bench.compare, 5 pairs each): 2 ms cost 11 % of e2e throughput
# (the coordinator waits for results it could be turning into new tasks), 0.5 ms was within
# noise of 1 ms, and none at all (every poll's results at once) 9 % (more, smaller messages).
RESULT_LINGER_SECONDS = 0.001

# Bytes of tasks the agent writes ahead into the pipe of a busy task process; more waits in
# the agent (a full pipe would block the agent's loop until that process reads).
SEND_AHEAD_BYTES = 64 * 1024

# Seconds a new task process gets to import its modules and say it is ready.
PROCESS_START_TIMEOUT = 60.0

# Seconds between attempts to start a task process after starting one failed.
PROCESS_RESTART_DELAY = 1.0

# Longest traceback or error message sent in a result, in characters (the wire allows 16 KiB).
MAX_ERROR_TEXT = 8 * 1024

# Seconds the agent waits for the broker to acknowledge its last messages when it leaves.
CLOSE_FLUSH_SECONDS = 5.0

# Malformed messages without a readable task id are logged at most this often, in seconds.
UNREADABLE_LOG_INTERVAL = 10.0

# Largest Mandelbrot tile, in pixels: its base64 result must fit one message (256 KiB).
MAX_TILE_PIXELS = 180_000

# Largest `rounds` for sha256 and widest [lo, hi) for count_primes accepted by the built-ins.
MAX_SHA256_ROUNDS = 100_000_000
MAX_PRIME_RANGE = 10**10

# Idle-only mode (`agent run --idle-only`): the host counts as busy above this 1-minute load
# average per CPU when no --max-load is given: half the machine busy with the volunteer's own work.
IDLE_MAX_LOAD_PER_CPU = 0.5

# ...and idle again only below the threshold minus this (at most half the threshold): half a busy
# CPU, so a load hovering at the threshold does not pause and resume the worker every sample.
IDLE_HYSTERESIS = 0.5

# Seconds between two readings of the load: the kernel recomputes /proc/loadavg every 5 s.
IDLE_SAMPLE_SECONDS = 5.0

# Where idle-only mode reads the host's load (inside a container too: /proc/loadavg is not namespaced).
LOAD_FILE = "/proc/loadavg"

# Seconds between the agent's heartbeats: its presence again, not retained, QoS 0 (agent/liveness.py).
# A public project may have 50,000 workers on one broker and one coordinator: every 30 s is 1,700
# beats a second there, each a dictionary lookup for the coordinator (no database write), and the
# broker already handles a keepalive ping per worker every 10 s. The coordinator then marks a
# frozen or cut-off worker lost within 3 x 30 + 5 s (coordinator/defaults.py), under the 130 s a
# default lease would take; a lab that wants faster passes --heartbeat 5.
HEARTBEAT_SECONDS = 30.0
