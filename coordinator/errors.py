"""Errors of the coordinator package: one tree, each carrying fields and what to do next.

Transport failures stay in ``broker.errors`` (ConnectionFailed, ...); these are the
coordinator's own: the store, unknown jobs, bad input, bad settings.
"""

from __future__ import annotations

from dockercomp.exits import Exit


class CoordinatorError(Exception):
    """Base of every error the coordinator raises on purpose; ``str()`` is one readable line."""

    #: Process exit code a CLI uses for this error (dockercomp.exits).
    exit_code: int = Exit.FAILED
    #: What to do next; the CLI prints it on its own line (StoreError also keeps it in str()).
    hint: str = ""


class SettingsError(CoordinatorError, ValueError):
    """A coordinator setting is out of range; the message names it and the accepted values."""

    exit_code = Exit.USAGE


class StoreError(CoordinatorError):
    """The database cannot be opened or written, or the input cannot be stored.

    ``hint`` says what to do next (already part of the message).
    """

    exit_code = Exit.STORE

    def __init__(self, message: str, hint: str = "") -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message}; {hint}" if hint else message)


class InvalidInput(StoreError, ValueError):
    """A submitted job is malformed (bad name, bad arguments); nothing was stored.

    ``line`` is the 0-based index of the offending argument list, when there is one.
    """

    exit_code = Exit.USAGE

    def __init__(self, message: str, hint: str = "", line: int | None = None) -> None:
        self.line = line
        super().__init__(message, hint)


class StoreLocked(StoreError):
    """Another process held the SQLite database's write lock for longer than busy_timeout."""


class UnknownJob(StoreError, LookupError):
    """No job has that id or name. ``known`` lists the names that exist (newest first)."""

    exit_code = Exit.NOT_FOUND

    def __init__(self, wanted: str | int, known: list[str]) -> None:
        self.wanted = wanted
        self.known = known
        if known:
            listed = ", ".join(known[:10]) + (f" (and {len(known) - 10} more)" if len(known) > 10 else "")
            hint = f"known jobs: {listed}"
        else:
            hint = "no job was submitted yet (`dockercomp coordinator submit FUNCTION FILE`)"
        super().__init__(f"no job {wanted!r}", hint)


class UnknownTask(StoreError, LookupError):
    """The job has no task with that index."""

    exit_code = Exit.NOT_FOUND


class DatabaseMissing(StoreError):
    """A command that only reads found no database where it looked (only `submit` and `serve`
    create one); the message names the path or URL."""

    exit_code = Exit.NOT_FOUND


class JobBusy(StoreError):
    """A job cannot be deleted (or replaced) while workers hold some of its tasks."""

    exit_code = Exit.USAGE


class PresenceNotCleared(CoordinatorError):
    """Workers were purged from the store, but their retained presence is still on the broker.

    ``hint`` holds the mosquitto_pub commands that clear it by hand.
    """

    exit_code = Exit.BROKER

    def __init__(self, message: str, hint: str = "") -> None:
        self.message = message
        self.hint = hint
        super().__init__(message)
