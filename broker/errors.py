"""Errors raised by the broker package: transport failures apart from bad data, and the
administration's (accounts, ACL, certificates, reloads).

Each carries the exit code a command maps it to (dockercomp.exits) and a ``hint``.
"""

from __future__ import annotations

from typing import Any

from dockercomp.exits import Exit


class BrokerError(Exception):
    """Base of every error raised by dockercomp's MQTT layer."""

    exit_code: int = Exit.BROKER
    hint: str = ""


class SettingsError(BrokerError, ValueError):
    """A broker URL or setting is invalid; the message says which part and why."""

    exit_code = Exit.USAGE


class InvalidName(BrokerError, ValueError):
    """A worker, volunteer or job name cannot be used as a topic level."""

    exit_code = Exit.USAGE

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

    hint = "check --broker or $DOCKERCOMP_BROKER, and that the broker is running"

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"cannot connect to the MQTT broker at {url}: {reason}")


class ConnectionRejected(ConnectionFailed):
    """A connection error that retrying cannot mend (refused credentials, plain MQTT to a TLS
    port, an untrusted certificate, a missing CA file): agent and coordinator stop on it."""

    exit_code = Exit.REFUSED

    def __init__(self, url: str, reason: str, hint: str, exit_code: int | None = None) -> None:
        super().__init__(url, reason)
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code


# --------------------------------------------------------------------------- administration
class AdminError(BrokerError):
    """Accounts, ACL, certificates or a reload failed; ``hint`` says what to do next.

    ``str()`` is the message and the hint on one line (for logs); the CLI shows them apart.
    """

    exit_code = Exit.USAGE

    def __init__(self, message: str, hint: str = "", *, exit_code: int | None = None) -> None:
        self.message = message
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code
        super().__init__(f"{message}; {hint}" if hint else message)


class AccountError(AdminError):
    """An account cannot be added or removed as asked (bad or reserved name, exists already)."""


class UnknownAccount(AccountError, LookupError):
    """No account of that name in the password file."""

    exit_code = Exit.NOT_FOUND


class AccountsFileError(AdminError):
    """accounts.json (or another file of the broker's directory) cannot be read or written."""

    exit_code = Exit.FILES


class ReloadError(AdminError):
    """The files changed but the broker did not reload them: the change is not in force yet."""

    exit_code = Exit.BROKER


class CertificateError(AdminError):
    """The certificate files cannot be made or read; the message says which and why."""
