"""Errors of the installer. Each carries the fix to print and the process exit code
(dockercomp.exits: the table every role shares)."""

from __future__ import annotations

from dockercomp.exits import Exit


class InstallerError(Exception):
    """Base of every installer failure: one readable line plus how to fix it."""

    exit_code: int = Exit.FAILED

    def __init__(self, message: str, fix: str = "") -> None:
        self.message = message
        self.fix = fix
        super().__init__(message + (f"\nfix: {fix}" if fix else ""))

    @property
    def hint(self) -> str:
        """The fix, under the name every role's errors use."""
        return self.fix


class ConfigError(InstallerError):
    """The options given cannot work (bad broker URL, too many CPUs, wrong network...)."""

    exit_code = Exit.USAGE


class EngineUnreachable(InstallerError):
    """The Docker engine is missing, stopped, or refuses this user."""

    exit_code = Exit.DOCKER


class ImageUnavailable(InstallerError):
    """The worker image is not here and could not be pulled, loaded or built."""

    exit_code = Exit.IMAGE


class BrokerUnreachable(InstallerError):
    """No TCP connection to the broker from this machine."""

    exit_code = Exit.BROKER


class NameConflict(InstallerError):
    """A container the installer does not own already uses a name it needs."""

    exit_code = Exit.CONFLICT


class UpgradeHalted(InstallerError):
    """A replaced worker did not become healthy; the remaining ones were left as they were."""

    exit_code = Exit.HALTED

    def __init__(self, message: str, fix: str = "", *, container: str = "") -> None:
        super().__init__(message, fix)
        self.container = container


class NoSuchWorker(InstallerError, LookupError):
    """No worker container of this installation matches the name given."""

    exit_code = Exit.NOT_FOUND
