"""The engine's settings: intervals and limits, validated once (``dockercomp coordinator serve`` options)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from dockercomp.coordinator import defaults
from dockercomp.coordinator.errors import SettingsError


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
    rebirth_timeout: float = defaults.REBIRTH_TIMEOUT

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
            zero_ok = f.name in ("purge_after", "lease_margin", "gather")
            if not number or value < 0 or (value == 0 and not zero_ok):
                raise SettingsError(f"{f.name.replace('_', '-')} must be a positive number of seconds, got {value!r}")
