"""Errors raised by the broker package: transport failures apart from bad data."""

from __future__ import annotations

from typing import Any


class BrokerError(Exception):
    """Base of every error raised by dockercomp's MQTT layer."""


class SettingsError(BrokerError, ValueError):
    """A broker URL or setting is invalid; the message says which part and why."""


class InvalidName(BrokerError, ValueError):
    """A worker, volunteer or job name cannot be used as a topic level."""

    def __init__(self, what: str, value: Any, reason: str) -> None:
        self.what = what
        self.value = value
        self.reason = reason
        super().__init__(f"invalid {what} {value!r}: {reason}")


class InvalidTopic(BrokerError, ValueError):
    """A topic does not follow dockercomp's layout."""

    def __init__(self, topic: str, reason: str) -> None:
        self.topic = topic
        self.reason = reason
        super().__init__(f"unexpected topic {topic!r}: {reason}")


class DecodeError(BrokerError, ValueError):
    """A payload is not a valid dockercomp message. Carries the offending data (truncated)."""

    def __init__(self, kind: str, reason: str, data: bytes | str | None = None) -> None:
        self.kind = kind
        self.reason = reason
        raw = data if isinstance(data, (bytes, type(None))) else data.encode("utf-8", "replace")
        self.data = raw[:200] if raw is not None else None
        super().__init__(f"bad {kind} message: {reason}")


class ConnectionFailed(BrokerError):
    """The broker could not be reached or refused us; the message says what to do next."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"cannot connect to the MQTT broker at {url}: {reason}")
