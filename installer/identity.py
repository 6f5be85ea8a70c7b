"""Worker ids and container names, derived from the host so they are stable and unique.

A worker id is ``{hostname}-{machine}-w{slot}``: the hostname makes it recognisable in the
coordinator's tables, and a short hash of the machine id tells apart the many volunteers
whose machines are all called "ubuntu" or "raspberrypi". The same slot on the same machine
always gets the same id, so a restarted container is the same worker to the coordinator.
"""

from __future__ import annotations

import hashlib
import re
import socket
import uuid
from pathlib import Path

from dockercomp.installer.defaults import INSTANCE

# Longest topic level the broker accepts (broker.defaults.MAX_NAME_LENGTH).
MAX_ID_LENGTH = 64
# Longest hostname part kept, so the slot and machine hash always fit in MAX_ID_LENGTH.
MAX_HOST_LENGTH = 32

_MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")
# Outside broker.topics.validate_name's characters ('.' too: RabbitMQ splits a topic level at it).
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]+")


def machine_tag(files: tuple[str, ...] = _MACHINE_ID_FILES) -> str:
    """Six hex digits identifying this machine: from its machine id, else its MAC address.

    Hashed, because the machine id is meant to stay private to the machine.
    """
    seed = ""
    for name in files:
        try:
            seed = Path(name).read_text().strip()
        except OSError:
            continue
        if seed:
            break
    if not seed:
        seed = f"mac:{uuid.getnode():012x}"
    return hashlib.sha256(seed.encode()).hexdigest()[:6]


def host_label(hostname: str | None = None) -> str:
    """The short hostname, reduced to characters allowed in a topic level."""
    name = (hostname if hostname is not None else socket.gethostname()).split(".")[0]
    name = _UNSAFE.sub("-", name).strip("-_")[:MAX_HOST_LENGTH].strip("-_")
    return name or "host"


def worker_prefix(instance: str = INSTANCE, hostname: str | None = None, tag: str | None = None) -> str:
    """What every worker id of this installation on this host starts with."""
    base = f"{host_label(hostname)}-{tag if tag is not None else machine_tag()}"
    if instance != INSTANCE:
        base = f"{base}-{instance}"
    return base


def worker_id(prefix: str, slot: int) -> str:
    """The id of the worker in `slot` (1-based)."""
    suffix = f"-w{slot}"
    return prefix[: MAX_ID_LENGTH - len(suffix)] + suffix


def container_name(instance: str, slot: int) -> str:
    """dockercomp-worker-3, or dockercomp-{instance}-worker-3 for a named instance."""
    if instance == INSTANCE:
        return f"dockercomp-worker-{slot}"
    return f"dockercomp-{instance}-worker-{slot}"


def valid_instance(name: str) -> bool:
    """An instance name usable in container names, labels and worker ids (no '.': it is part of
    every worker id, a topic level that RabbitMQ would split at a dot)."""
    return bool(re.fullmatch(r"[a-z0-9][a-z0-9_\-]{0,23}", name))
