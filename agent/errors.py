"""Errors raised by the agent package. Broker and transport errors stay in broker.errors."""

from __future__ import annotations

from dockercomp.exits import Exit


class AgentError(Exception):
    """Base of every error the agent raises; the message says what to do next."""

    #: Exit code of a command that stops on this error (dockercomp.exits).
    exit_code: int = Exit.FAILED


class ConfigError(AgentError, ValueError):
    """An option or environment variable of `dockercomp agent run` is invalid."""

    exit_code = Exit.USAGE

    def __init__(self, option: str, reason: str) -> None:
        self.option = option
        self.reason = reason
        super().__init__(f"{option}: {reason}")


class TaskRefused(AgentError):
    """A task cannot be run here: it gets a `rejected` result with this type and message."""

    def __init__(self, type_: str, message: str) -> None:
        self.type = type_
        self.message = message
        super().__init__(f"{type_}: {message}")


class UnknownFunction(TaskRefused):
    """The task names a function this worker does not offer."""

    def __init__(self, name: str, available: list[str]) -> None:
        self.name = name
        offered = ", ".join(available) or "nothing"
        super().__init__("UnknownFunction", f"no task function {name!r} on this worker; it offers: {offered}")


class BadArguments(TaskRefused):
    """The task's arguments do not fit the function's signature."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        super().__init__("BadArguments", f"{name}(): {reason}")


class HealthError(AgentError):
    """`dockercomp agent check` found this machine's agent not healthy; the message says why.

    Exits 1 (Exit.FAILED): Docker's HEALTHCHECK knows only 0 (healthy) and 1 (unhealthy).
    """
