"""The connection to the Docker engine, and a diagnosis a volunteer can act on when it fails.

docker-py reports every connection problem as one DockerException wrapping a requests error;
we turn the common causes (not installed, not running, no permission, a wrong DOCKER_HOST)
into one sentence and the command that fixes it.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import docker
import docker.errors

from dockercomp.installer.defaults import ENGINE_TIMEOUT_SECONDS
from dockercomp.installer.errors import EngineUnreachable

_SOCKET = "/var/run/docker.sock"


def connect(timeout: int = ENGINE_TIMEOUT_SECONDS) -> Any:
    """A docker.DockerClient that has answered a ping, or EngineUnreachable with the fix."""
    try:
        client = docker.from_env(timeout=timeout)
        client.ping()
    except docker.errors.DockerException as exc:
        raise diagnose(exc) from None
    except OSError as exc:  # raised directly by some transports (ssh://, npipe)
        raise diagnose(exc) from None
    return client


def diagnose(exc: BaseException, environ: dict[str, str] | None = None) -> EngineUnreachable:
    """The most likely reason `exc` was raised while talking to the engine, and its fix."""
    env = os.environ if environ is None else environ
    text = f"{exc!r} {exc}"
    host = env.get("DOCKER_HOST", "")
    where = f"DOCKER_HOST={host}" if host else _SOCKET
    if "PermissionError" in text or "Permission denied" in text:
        return EngineUnreachable(
            f"no permission to use the Docker engine at {where}",
            "add yourself to the docker group: sudo usermod -aG docker $USER "
            "(then log out and in again), or run this command with sudo",
        )
    if not host and shutil.which("docker") is None and shutil.which("dockerd") is None:
        return EngineUnreachable(
            "Docker is not installed on this machine",
            "install it (Debian/Ubuntu: sudo apt-get install docker.io; elsewhere see "
            "https://docs.docker.com/engine/install/), or run install_me.sh which offers to",
        )
    if "FileNotFoundError" in text or "No such file" in text or "Connection refused" in text:
        fix = "start it: sudo systemctl start docker (no systemd: sudo dockerd &)"
        if host:
            fix = f"start the engine DOCKER_HOST points at, or unset DOCKER_HOST ({host})"
        return EngineUnreachable(f"the Docker engine is not running (nothing answers at {where})", fix)
    return EngineUnreachable(
        f"the Docker engine at {where} does not answer: {_first_line(exc)}",
        "check that `docker info` works for this user, then retry",
    )


def engine_cpus(client: Any) -> int:
    """How many CPUs the engine's machine has (what `docker info` reports as CPUs)."""
    return int(client.info().get("NCPU") or os.cpu_count() or 1)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
