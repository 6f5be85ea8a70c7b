"""The engine's settings: intervals and limits, validated once (``dockercomp coordinator serve`` options)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, TypeVar

import click

from dockercomp.coordinator import defaults
from dockercomp.coordinator.errors import SettingsError

# Settings that are counts of tasks a worker or volunteer may hold, not seconds (registry.Caps).
CAP_FIELDS = ("max_capacity", "max_prefetch", "volunteer_max_capacity", "volunteer_max_prefetch")


@dataclass(frozen=True)
class CoordinatorSettings:
    """Intervals and limits of the engine (seconds unless named otherwise)."""

    lease_margin: float = defaults.LEASE_MARGIN
    lease_check: float = defaults.LEASE_CHECK_INTERVAL
    purge_after: float = defaults.PURGE_AFTER
    purge_check: float = defaults.PURGE_CHECK_INTERVAL
    poll_interval: float = defaults.POLL_INTERVAL
    status_interval: float = defaults.STATUS_INTERVAL
    rate_window: float = defaults.RATE_WINDOW
    batch_max: int = defaults.BATCH_MAX
    busy_batch: int = defaults.BUSY_BATCH
    gather: float = defaults.GATHER_DELAY
    connect_timeout: float = defaults.CONNECT_TIMEOUT
    # What a presence may claim, whatever it says (hostile or mistaken volunteers): per worker
    # and per volunteer, tasks running (capacity) and queued beyond that (prefetch).
    max_capacity: int = defaults.MAX_WORKER_CAPACITY
    max_prefetch: int = defaults.MAX_PREFETCH
    volunteer_max_capacity: int = defaults.MAX_VOLUNTEER_CAPACITY
    volunteer_max_prefetch: int = defaults.MAX_VOLUNTEER_PREFETCH
    # Seconds a job's function may go unoffered by every online worker before its pending
    # tasks fail (unroutable.py); 0: they wait for such a worker forever.
    fail_unroutable: float = defaults.FAIL_UNROUTABLE
    rebirth_timeout: float = defaults.REBIRTH_TIMEOUT
    # A worker that announces heartbeats is lost after misses x its interval + slack seconds
    # without one (coordinator/liveness.py).
    heartbeat_misses: float = defaults.HEARTBEAT_MISSES
    heartbeat_slack: float = defaults.HEARTBEAT_SLACK

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in CAP_FIELDS:
                whole = isinstance(value, int) and not isinstance(value, bool)
                lowest = 1 if "capacity" in f.name else 0
                if not whole or not lowest <= value <= defaults.MAX_CAP_SETTING:
                    raise SettingsError(f"{f.name.replace('_', '-')} must be a whole number from {lowest} to "
                                        f"{defaults.MAX_CAP_SETTING}, got {value!r}")
                continue
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
            zero_ok = f.name in ("purge_after", "lease_margin", "gather", "fail_unroutable", "heartbeat_slack")
            if not number or value < 0 or (value == 0 and not zero_ok):
                raise SettingsError(f"{f.name.replace('_', '-')} must be a positive number of seconds, got {value!r}")


_F = TypeVar("_F", bound=Callable[..., Any])


def cap_options(command: _F) -> _F:
    """The serve options for CAP_FIELDS (--max-capacity, ...), passed as keyword arguments."""
    helps = {
        "max_capacity": "Most tasks one worker may run at once, whatever its presence announces.",
        "max_prefetch": "Most tasks one worker may have queued beyond its capacity.",
        "volunteer_max_capacity": "Most tasks the workers of one volunteer may run at once, together.",
        "volunteer_max_prefetch": "Most tasks the workers of one volunteer may have queued, together.",
    }
    for name in reversed(CAP_FIELDS):
        default = CoordinatorSettings.__dataclass_fields__[name].default
        command = click.option(f"--{name.replace('_', '-')}", name, type=int, default=default, show_default=True,
                               metavar="N", help=helps[name])(command)
    return command


def metrics_options(command: _F) -> _F:
    """`serve --metrics-port/--metrics-host`, passed as ``metrics_port`` and ``metrics_host``
    (here, not in metrics.py: the CLI starts without importing prometheus_client)."""
    command = click.option("--metrics-host", default=defaults.METRICS_HOST, show_default=True, metavar="ADDR",
                           help="Address /metrics listens on (0.0.0.0 or :: to let Prometheus on other "
                                "hosts scrape it).")(command)
    return click.option("--metrics-port", type=click.IntRange(0, 65535), default=None, metavar="P",
                        help="Serve Prometheus metrics at http://ADDR:P/metrics (0: a free port, "
                             "printed at start). Off when not given.")(command)
