"""What `dockercomp agent run` is configured with, validated once, and how the defaults are found.

Worker id rule: ``--worker-id`` / DOCKERCOMP_WORKER_ID when given; else the host name,
sanitised to a topic level. Inside a container the host name is the container's (unique
per container), so it is used as is; outside one, ``-{pid}`` is appended so two agents on
one laptop never share an id (a restarted agent is then a new worker; the old one said
goodbye). Volunteer: ``--volunteer`` / DOCKERCOMP_VOLUNTEER, else the broker user name,
else ``local``.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from dockercomp.agent.defaults import (
    GRACE_SECONDS,
    HEALTH_FILE,
    HEALTH_FILE_ENV,
    HEARTBEAT_SECONDS,
    IMAGE_ENV,
    PREFETCH_PER_SLOT,
)
from dockercomp.agent.errors import ConfigError
from dockercomp.broker.defaults import DEFAULT_VOLUNTEER, MAX_HEARTBEAT_SECONDS, MAX_NAME_LENGTH
from dockercomp.broker.errors import InvalidName, SettingsError
from dockercomp.broker.settings import BrokerSettings
from dockercomp.broker.topics import WorkerRef, validate_name

_CONTAINER_IN_CGROUP = re.compile(r"([0-9a-f]{64})")
# Docker bind-mounts /etc/hostname from .../containers/<id>/hostname; containerd uses sandboxes/.
_CONTAINER_IN_MOUNTINFO = re.compile(r"/(?:containers|sandboxes)/([0-9a-f]{64})/")
_SHORT_CONTAINER_ID = re.compile(r"[0-9a-f]{12}\Z")
_NOT_NAME = re.compile(r"[^A-Za-z0-9_\-]+")  # broker.topics.validate_name's characters


def package_version() -> str:
    try:
        return version("dockercomp")
    except PackageNotFoundError:  # running from a source tree without pip install
        return "0+unknown"


def container_id(
    cgroup: Path = Path("/proc/self/cgroup"),
    mountinfo: Path = Path("/proc/self/mountinfo"),
    dockerenv: Path = Path("/.dockerenv"),
    host: str | None = None,
) -> str | None:
    """The short (12 hex) id of the container we run in, or None outside one.

    cgroup v1 names the container in /proc/self/cgroup; with cgroup v2 only the mounts
    (/etc/hostname from .../containers/<id>/) still tell. As a last resort, when
    /.dockerenv exists and the host name looks like Docker's default (12 hex digits), that is
    the id. A host merely *built* in Docker, with another name, counts as not a container.
    """
    for path, pattern in ((cgroup, _CONTAINER_IN_CGROUP), (mountinfo, _CONTAINER_IN_MOUNTINFO)):
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        match = pattern.search(text)
        if match:
            return match.group(1)[:12]
    host = socket.gethostname() if host is None else host
    if dockerenv.exists() and _SHORT_CONTAINER_ID.match(host):
        return host
    return None


def sanitize_name(text: str, max_length: int = MAX_NAME_LENGTH) -> str:
    """Turn a host name into a valid topic level: invalid runs become '-', trimmed."""
    cleaned = _NOT_NAME.sub("-", text).strip("-_")[:max_length].rstrip("-_")
    return cleaned or "worker"


def default_worker_id(host: str, container: str | None, pid: int) -> str:
    if container is not None:
        return sanitize_name(host)
    suffix = f"-{pid}"
    return sanitize_name(host, MAX_NAME_LENGTH - len(suffix)) + suffix


@dataclass(frozen=True)
class AgentSettings:
    """Everything an Agent needs, validated: build it with ``from_options``."""

    broker: BrokerSettings
    worker: WorkerRef
    concurrency: int
    prefetch: int = 0  # tasks wanted queued here beyond the concurrency (announced in the presence)
    grace: float = GRACE_SECONDS
    health_file: Path | None = Path(HEALTH_FILE)
    host: str = ""
    container: str | None = None
    image: str | None = None
    heartbeat: float = HEARTBEAT_SECONDS  # seconds between heartbeats (agent/liveness.py); 0: none
    # Mosquitto lets any logged-in account take over a client id in use (disconnecting its
    # holder); a random part per agent process keeps the id unguessable from topics or status.
    client_token: str = field(default_factory=lambda: secrets.token_hex(6))

    @property
    def keepalive(self) -> int:
        return self.broker.keepalive

    @property
    def client_id(self) -> str:
        """``volunteer/worker/TOKEN``: names the worker for broker logs, unguessable by others."""
        return f"{self.worker.key}/{self.client_token}"

    @classmethod
    def from_options(
        cls,
        broker_url: str,
        *,
        worker_id: str | None = None,
        volunteer: str | None = None,
        concurrency: int | None = None,
        prefetch: int | None = None,
        keepalive: int | None = None,
        grace: float | None = None,
        username: str | None = None,
        password: str | None = None,
        health_file: str | None = None,
        environ: Mapping[str, str] = os.environ,
        host: str | None = None,
        container: str | None | bool = True,
        pid: int | None = None,
        heartbeat: float | None = None,
    ) -> AgentSettings:
        """Validate options (CLI values, already merged with the environment by click).

        ``container=True`` detects the container; pass None/str to fix it (tests).
        Raises ConfigError or broker.errors.SettingsError saying what to change.
        """
        try:
            settings = BrokerSettings.from_url(broker_url)
        except SettingsError as exc:
            raise ConfigError("--broker", str(exc)) from None
        settings = settings.with_credentials(username, password)
        if keepalive is not None:
            if not 1 <= keepalive <= 65535:
                raise ConfigError("--keepalive", "must be between 1 and 65535 seconds")
            settings = settings.with_keepalive(keepalive)
        if concurrency is None:
            concurrency = os.cpu_count() or 1
        if concurrency < 1:
            raise ConfigError("--concurrency", "must be at least 1 (the number of tasks run at once)")
        if prefetch is None:
            prefetch = concurrency * PREFETCH_PER_SLOT
        if prefetch < 0:
            raise ConfigError("--prefetch", "must not be negative (0: no task waits here beyond those running)")
        if grace is None:
            grace = GRACE_SECONDS
        if grace < 0:
            raise ConfigError("--grace", "must not be negative")
        heartbeat = HEARTBEAT_SECONDS if heartbeat is None else heartbeat
        if not 0 <= heartbeat <= MAX_HEARTBEAT_SECONDS:
            raise ConfigError("--heartbeat", f"must be from 0 (no heartbeat) to {MAX_HEARTBEAT_SECONDS} seconds")
        host = socket.gethostname() if host is None else host
        found = container_id(host=host) if container is True else (container or None)
        name = worker_id or default_worker_id(host, found, os.getpid() if pid is None else pid)
        volunteer_name = volunteer or settings.username or DEFAULT_VOLUNTEER
        try:
            validate_name(name, "worker id")
        except InvalidName as exc:
            raise ConfigError("--worker-id", f"{exc} (it becomes an MQTT topic level)") from None
        try:
            validate_name(volunteer_name, "volunteer name")
        except InvalidName as exc:
            source = "--volunteer" if volunteer else "the broker user name"
            raise ConfigError("--volunteer", f"{exc} (from {source}); pass --volunteer NAME") from None
        health = health_file if health_file is not None else environ.get(HEALTH_FILE_ENV) or HEALTH_FILE
        return cls(
            broker=settings,
            worker=WorkerRef(volunteer_name, name),
            concurrency=concurrency,
            prefetch=prefetch,
            grace=grace,
            health_file=Path(health) if health else None,
            host=host[:255],
            container=found,
            image=(environ.get(IMAGE_ENV) or None),
            heartbeat=float(heartbeat),
        )

    def with_broker(self, broker: BrokerSettings) -> AgentSettings:
        return replace(self, broker=broker)
