"""Every coordinator default in one place, each with the reason for its value."""

from __future__ import annotations

# Database used when --db is not given: a SQLite file in the current directory.
DB_PATH = "coordinator.db"

# Environment variable naming the database (path or postgresql:// URL) for every CLI.
DB_URL_ENV = "DOCKERCOMP_DB"

# `dockercomp coordinator dashboard`: loopback unless --host says otherwise (the page holds no
# secret, but who may browse it is the operator's choice); a port clear of common dev servers.
DASHBOARD_HOST = "127.0.0.1"
DASHBOARD_PORT = 8765

# The page's broker when --ws-url is not given: the shipped mosquitto.conf's secure WebSockets
# listener, on the host that served the page.
DASHBOARD_WS_PORT = 8884

# Milliseconds a SQLite writer waits for another writer's lock before failing (CLI vs serve).
SQLITE_BUSY_TIMEOUT_MS = 15_000

# SQL statements each SQLite connection keeps prepared: Python's default. The engine's batched
# statements differ in text with their row counts, and 2,048 saved it ~2-7 % of its CPU, but
# cost 100 MB more coordinator RSS and 93 MB more in a streaming submit (big multi-row
# statements stay compiled): measured with `python -m bench --only scale --only stream`.
SQLITE_STATEMENT_CACHE = 128

# The engine's WAL checkpoints run on their own thread (coordinator/checkpoint.py), each once
# this many pages wait to be copied: SQLite's own automatic checkpoint's default. More often
# copies the pages the engine rewrites all the time (indexes, worker rows) more often.
CHECKPOINT_PAGES = 1_000
# Seconds between the thread's looks at the WAL's size (a 4-byte read of the -shm file).
CHECKPOINT_INTERVAL = 0.05
# WAL pages (4 KiB) past which the engine copies the rest itself after a commit, so that the
# WAL starts over (16 MiB; SQLite's own checkpoints come every 1,000): the thread's alone cannot
# always catch up with an engine that never pauses.
CHECKPOINT_FINISH_PAGES = 4_096

# Tasks per INSERT when storing a job; SQLite allows 32,766 variables per statement.
INSERT_BATCH = 5_000

# Per-task time limit the worker enforces, in seconds, when the submitter names none.
TASK_TIMEOUT = 60.0

# Dispatches of one task before it is marked failed.
MAX_ATTEMPTS = 3

# Seconds added to a task's timeout to form its lease: room for queueing and the result's trip.
LEASE_MARGIN = 10.0

# Most tasks a worker may have queued beyond its capacity, whatever its presence asks: enough
# to hide any round trip, too few for one worker to hoard a job.
MAX_PREFETCH = 1_000

# Random bytes in each attempt's nonce (Task.nonce): 144 bits, beyond any guessing over a network,
# and a multiple of 3, so the base64 of many nonces drawn at once is theirs end to end, without
# padding (leases.new_nonces: one draw and one encoding per dispatch round, not per task).
NONCE_BYTES = 18

# Worker topics whose parse the engine remembers (Inbound._parse_topic): the presence and result
# topics of a fleet of 4,096 workers; it starts over when full, and a bigger fleet's registered
# workers' topics are found through the registry instead of parsed.
TOPIC_CACHE = 8_192

# --- Hostile presence: what a worker may claim, whatever its presence says (registry.py) --------
# Tasks one worker may run at once: above the hardware threads of the largest common servers
# (2 x 128-core EPYC = 512 threads), far below what overflows a counter or a SQL LIMIT.
MAX_WORKER_CAPACITY = 512

# Tasks one volunteer's workers may run at once, together: a lab's cluster of some dozens of
# machines; a volunteer with more asks the scientist to raise --volunteer-max-capacity.
MAX_VOLUNTEER_CAPACITY = 4_096

# Tasks one volunteer's workers may have queued beyond their capacity, together (the per-worker
# bound is MAX_PREFETCH): enough to hide round trips on every machine of such a cluster.
MAX_VOLUNTEER_PREFETCH = 8_192

# CPUs a presence may report: more hardware threads than any machine has; the number is only
# shown to people, and must fit the database's 32-bit column.
MAX_REPORTED_CPUS = 65_536

# Largest value an operator may give any of the caps above: keeps every sum of them far inside
# 64 bits and each one inside the database's 32-bit columns.
MAX_CAP_SETTING = 1_000_000

# Seconds between checks for expired leases.
LEASE_CHECK_INTERVAL = 1.0

# Seconds a worker has to answer a rebirth request (sent when the coordinator (re)connects,
# and to a worker whose lease expired) before it is presumed dead and its work returned: a
# live agent in reconnect backoff retries within 30 s x 1.5 (broker.defaults RECONNECT_*),
# plus one default keepalive for the connection to be made and its presence to arrive.
REBIRTH_TIMEOUT = 55.0

# A worker announcing a heartbeat interval H (agent/liveness.py) is lost after this many
# intervals without a beat, plus HEARTBEAT_SLACK: a single lost or late beat (QoS 0, a busy
# broker) is forgiven, two are; 3 x 30 + 5 = 95 s with the agent's default, under a lease.
HEARTBEAT_MISSES = 3.0

# Seconds added to that bound: a worker's loop, the broker and this engine's step may each lag
# a little behind the interval on a loaded machine.
HEARTBEAT_SLACK = 5.0

# Seconds between scans for silent workers: the bound is met within this, and with 50,000
# workers a scan of their deadlines costs a few milliseconds.
HEARTBEAT_CHECK = 1.0

# Seconds a lost worker stays "lost" before it is purged and its retained presence cleared.
PURGE_AFTER = 300.0

# Seconds between checks for lost workers to purge.
PURGE_CHECK_INTERVAL = 5.0

# Seconds between polls of the jobs table: submissions, cancels and retries by the CLI show up
# within this delay (the poll reads each job's marks, then the rows of the changed ones: 1.7 ms
# with 1,000 jobs).
POLL_INTERVAL = 0.5

# Seconds `submit` gives the broker to take its nudge (the engine then polls at once); past
# it the job is still stored and picked up at the next poll, so keep it short.
NUDGE_TIMEOUT = 0.5

# Seconds between status publications at most; nothing is published when nothing changed.
STATUS_INTERVAL = 0.5

# Worker statuses published per status publication at most; the rest wait their turn (oldest
# change first, later changes folded in): 2,000 a second bounds what a fleet of 50,000 workers,
# each changing with every task, costs the coordinator, and 1,000 workers never wait.
WORKER_STATUS_BURST = 1_000

# Seconds after which the summary and every active job's status are published again even when
# nothing changed: a broker that keeps retained messages per node and hands them only to
# exact-topic subscriptions (RabbitMQ) gives an observer's `status/#` nothing on subscribing,
# so an idle coordinator must not stay silent for long. 10 messages a minute at most per job.
STATUS_REFRESH = 10.0

# Window, in seconds, over which the status summary's recent tasks/s is measured.
RATE_WINDOW = 10.0

# Workers registered from which the engine freezes its heap (coordinator/heap.py), and the
# growth (a share of that count) that freezes it again: each of a big fleet's workers keeps
# objects alive for good, and CPython's cyclic GC scanning them again and again cost 50,000
# workers 50 % more engine CPU per task than 1,000 (bench/engine_cpu.py; GC off: the same).
HEAP_FREEZE_WORKERS = 256
HEAP_FREEZE_GROWTH = 0.25
# While the heap is frozen, collections of the middle generation between two full collections
# (CPython's default: 10; heap.py says why): 24 full collections of a 50,000-worker fleet's tasks
# in flight, 2.9 s, became 2 in the bench's scale run (coordinator CPU per task 0.082 -> 0.070 ms,
# `bench.compare --only scale`; peak RSS unchanged).
HEAP_FULL_COLLECTION_EVERY = 100

# Most incoming messages handled in one database transaction.
BATCH_MAX = 2_000

# Messages in one engine step from which traffic counts as busy: the next step may gather.
BUSY_BATCH = 16

# Seconds a busy engine waits for more messages when fewer than BUSY_BATCH are waiting: a
# step's fixed cost (commit, dispatch round, network write) is then shared by more tasks.
GATHER_DELAY = 0.002

# Seconds `serve` waits for the first connection before saying the broker is unreachable.
CONNECT_TIMEOUT = 10.0

# Seconds a clean stop waits for the broker to acknowledge the last publishes.
STOP_FLUSH_TIMEOUT = 5.0

# Rejected-message log lines per kind per window; the rest are counted and summarized.
REJECT_LOG_BURST = 5
REJECT_LOG_WINDOW = 60.0

# MQTT client id prefix of the coordinator's own clients.
CLIENT_ID_PREFIX = "dockercomp-coordinator"

# The coordinator's client id (`serve --client-id` overrides it): one per topic root, not per
# process, because its session is persistent: a restarted or standby coordinator of that root
# takes the session over, with the results the broker queued while none was connected.
CLIENT_ID_TEMPLATE = CLIENT_ID_PREFIX + "-{root}"

# Seconds without a new retained presence after which all of a revoked volunteer's presences
# were received (they arrive right after the subscription).
REVOKE_SETTLE_SECONDS = 0.5

# Seconds between refreshes of `dockercomp coordinator status --watch`: a person reads it.
WATCH_INTERVAL = 1.0

# Seconds between polls of the database by the Python API's wait(): short enough that a
# notebook sees a finished job at once, one small indexed query each.
WAIT_POLL_INTERVAL = 0.25

# Inputs larger than this many bytes get a progress bar while `submit` reads and stores them.
LARGE_INPUT_BYTES = 1_000_000

# Seconds between two heartbeats of `serve` in the store: `status` tells a stopped coordinator
# within a few of them, for one one-row write.
HEARTBEAT_INTERVAL = 2.0

# Heartbeats missed before `status` and `workers` say the coordinator is not running: a busy
# engine step or a slow disk may delay one, rarely three.
HEARTBEAT_MISSED = 3

# --- a standby coordinator (leader.py, leadership.py) ---------------------------------------------
# Seconds the active coordinator's lease lasts without renewal (every engine transaction, at
# least every LEASE_CHECK_INTERVAL, renews it): a standby takes over within this plus one poll
# of a crash, inside issue 15's 10 s, and a busy step (tens of ms) never comes close.
LEASE_TTL = 5.0

# Share of the lease a standby waits between two claims: 1 s for the default lease.
STANDBY_POLL_SHARE = 0.2

# Seconds a deposed coordinator gives the broker to acknowledge what it published before it
# closes: its messages are stale, so it does not wait for them as a clean stop would.
DEPOSED_FLUSH_TIMEOUT = 0.5
# Most replicas of one task: past this, disagreement is a broken function, not a cheater.
MAX_REPLICAS = 10

# Validated results in a row after which a volunteer is trusted (adaptive replication): BOINC's
# usual figure, enough that a 1-in-3 cheater rarely gets there by luck ((2/3)^10 < 2 %).
TRUST_AFTER = 10

# Share of a trusted volunteer's tasks still replicated as a spot check (adaptive replication).
SPOT_CHECK = 0.1

# Closed attempts of a volunteer in one job before its failure/invalid rate may quarantine it:
# fewer is noise.
QUARANTINE_MIN_RESULTS = 6

# A volunteer is quarantined when its failure or invalid rate in a job is at least this ...
QUARANTINE_MIN_RATE = 0.25

# ... and this many times the rate of the job's other volunteers (plus QUARANTINE_MARGIN):
# "far above the others", so a function that fails everywhere quarantines nobody.
QUARANTINE_FACTOR = 3.0
QUARANTINE_MARGIN = 0.1

# Seconds a job's function may be offered by no online worker before `serve` fails its pending
# tasks; 0 (never): workers may legitimately come online long after a job was submitted.
FAIL_UNROUTABLE = 0.0
# --- Prometheus metrics (metrics.py, `serve --metrics-port`) -------------------------------------
# Address /metrics listens on: loopback, as the figures describe a project to whoever can reach
# the port; an operator opens it to a Prometheus host on purpose (--metrics-host 0.0.0.0).
METRICS_HOST = "127.0.0.1"

# Engine step time buckets (seconds): an idle step is well under a millisecond, a busy one with
# a 500-result transaction some tens of milliseconds; beyond a second the engine is in trouble.
METRICS_STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

# Result latency buckets (seconds): a no-op round trip takes milliseconds, real tasks up to the
# default 60 s time limit and beyond.
METRICS_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                           300.0, 600.0)

# Times a scrape retries copying a container the engine resized meanwhile before giving up on it
# for this scrape (it is a race of a few instructions: one retry almost always suffices).
METRICS_COPY_TRIES = 5
# --- the scientist's kit (coordinator/kit.py, `dockercomp coordinator kit`) ----------------
# The images a kit ships, as `make image` names them.
KIT_WORKER_IMAGE = "dockercomp/worker:latest"
KIT_INSTALLER_IMAGE = "dockercomp/installer:latest"
# Folder (inside the broker config directory) where `kit build` writes and `volunteers add` looks.
KIT_DIR = "kit"
# Seconds a docker command of kit build may take (save and tag of ~250 MB on a slow disk) ...
KIT_DOCKER_TIMEOUT = 600.0
# ... and building a task image (pip installing a scientist's package).
KIT_BUILD_TIMEOUT = 900.0
# `kit serve` listens on loopback by default: a try on this machine, not a public server.
KIT_SERVE_HOST = "127.0.0.1"
KIT_SERVE_PORT = 8080
