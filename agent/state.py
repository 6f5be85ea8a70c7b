"""The agent's states and the names its messages share (agent.py, intake.py, results.py)."""

from __future__ import annotations

from enum import Enum

# Error types of `rejected` results the agent itself sends (see docs/protocol.md).
MALFORMED_TASK = "MalformedTask"
QUEUE_FULL = "QueueFull"
# Error type of `released` results: handed back by a shutdown, without using an attempt.
RELEASED_ERROR = "Shutdown"

TaskKey = tuple[str, int]  # (task_id, attempt)


class AgentState(str, Enum):
    STARTING = "starting"  # not yet connected for the first time
    RUNNING = "running"  # taking tasks
    DRAINING = "draining"  # first signal: no new tasks, running ones finish within the grace period
    PAUSED = "paused"  # connected, no new tasks until resumed (agent/pause.py)
    STOPPED = "stopped"  # left the broker
