"""Every default of the benchmark in one place, each with why it has that value."""

from __future__ import annotations

# Tasks in the end-to-end run (issue 6: 20,000 no-op tasks) and in the raw baseline.
E2E_TASKS = 20_000

# Worker clients in the raw baseline and agents in the e2e run (issue 6: 4 processes).
WORKERS = 4

# Requests outstanding at once across all raw workers (issue 6: a window of 100).
WINDOW = 100

# Tasks in flight per agent in the e2e run: its task processes (one per CPU) plus prefetch,
# which the coordinator keeps filled; 4 agents x 25 = the raw baseline's window of 100.
AGENT_CONCURRENCY = 25

# Measured e2e jobs (and window-1 jobs), each followed by a raw run, so that every job is
# bracketed by two raw baselines; e2e/raw (and window-1 p50 / raw p50) is the median round's
# (job / mean of its brackets). On a shared VM the raw rate moved by 35 % between two runs a
# minute apart, and the raw window-1 p50 doubled within one phase: one bracket could land in either.
E2E_ROUNDS = 3

# Round trips measured one at a time for the window-1 latency figures.
LATENCY_SAMPLES = 1_000

# Tasks submitted in one job for the submit-time figure (issue 6: 100,000 under 10 s).
SUBMIT_TASKS = 100_000

# One-task jobs per mode (nudge, poll) for the pickup figures: enough for a p95 of each.
PICKUP_SAMPLES = 40

# Tasks of the streaming submit (issue 10: 1,000,000 tasks with < 60 MB RSS growth).
STREAM_TASKS = 1_000_000

# Simulated-worker fleets in scale mode, run one after the other (issue 6: 1,000; issue 14:
# 50,000, whose dispatch cost per task is compared with the 1,000 one's in the same run), and
# the processes they are packed into (more when one process cannot hold its share: fleetbrokers).
SCALE_WORKERS = (1_000, 50_000)
SCALE_PROCESSES = 4

# Simulated workers per volunteer: a fleet is many volunteers, and one volunteer's share is
# capped by the coordinator (MAX_VOLUNTEER_CAPACITY), so one volunteer of 50,000 would starve.
SCALE_PER_VOLUNTEER = 100

# Job sizes whose per-task dispatch cost scale mode compares (flat from 10k to 100k).
SCALE_TASKS = (10_000, 100_000)

# Completed tasks per slice when scale mode reports how the cost evolves inside one job.
SCALE_SLICE = 10_000

# Volunteer name of every benchmark worker (one topic level).
VOLUNTEER = "bench"

# Function every benchmark task calls: the agent's built-in no-op.
FUNCTION = "noop"

# Seconds any single phase may take before the benchmark gives up and says which one hung.
PHASE_TIMEOUT = 300.0

# Seconds to wait for a process (broker, coordinator, agent) to come up.
START_TIMEOUT = 30.0

# How often the benchmark polls the coordinator's store or /proc, in seconds.
POLL_INTERVAL = 0.05

# MQTT keepalive of the benchmark's own clients: long, so 1,000 idle clients cost no pings.
KEEPALIVE = 60

# Where results are written, relative to the repository root.
RESULTS_DIR = "bench/results"
