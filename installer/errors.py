"""Errors of the installer. Each carries the fix to print and the process exit code."""

from __future__ import annotations


class InstallerError(Exception):
    """Base of every installer failure: one readable line plus how to fix it."""

    exit_code = 1

    def __init__(self, message: str, fix: str = "") -> None:
        self.message = message
        self.fix = fix
        super().__init__(message + (f"\nfix: {fix}" if fix else ""))


class ConfigError(InstallerError):
    """The options given cannot work (bad broker URL, too many CPUs, wrong network...)."""

    exit_code = 2


class EngineUnreachable(InstallerError):
    """The Docker engine is missing, stopped, or refuses this user."""

    exit_code = 3


class ImageUnavailable(InstallerError):
    """The worker image is not here and could not be pulled, loaded or built."""

    exit_code = 4


class BrokerUnreachable(InstallerError):
    """No TCP connection to the broker from this machine."""

    exit_code = 5


class NameConflict(InstallerError):
    """A container the installer does not own already uses a name it needs."""

    exit_code = 6


class UpgradeHalted(InstallerError):
    """A replaced worker did not become healthy; the remaining ones were left as they were."""

    exit_code = 7

    def __init__(self, message: str, fix: str = "", *, container: str = "") -> None:
        super().__init__(message, fix)
        self.container = container
