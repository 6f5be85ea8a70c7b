"""The installer's worker containers on this machine, and the operations that change them.

Everything here acts only on containers that carry the installer's labels for one instance
(spec.owned_filter, checked again with spec.is_owned): a volunteer's other containers are
never listed, stopped or removed. Stopping is always `docker stop` with the worker's grace
period, which sends SIGTERM so the agent drains, and SIGKILL only when the grace runs out.
"""

from __future__ import annotations

import io
import tarfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker.errors

from dockercomp.installer import defaults as d
from dockercomp.installer.errors import NameConflict, UpgradeHalted
from dockercomp.installer.identity import worker_prefix
from dockercomp.installer.spec import CONTAINER_CA, WorkerSpec, is_owned, owned_filter

Say = Callable[[str], None]

# Seconds between polls of a container's state while waiting for it to start or turn healthy.
POLL_SECONDS = 0.5
# Seconds a container without a HEALTHCHECK must stay running to count as started.
SETTLE_SECONDS = 3.0


@dataclass
class Changes:
    """What one `up` did, by container name, for the summary printed to the volunteer."""

    created: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    started: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    drained: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class WorkerView:
    """One row of `dockercomp installer status`."""

    name: str
    container_id: str
    worker_id: str
    slot: int
    state: str  # docker's: created, running, restarting, exited...
    health: str  # healthy, unhealthy, starting, or "-" without a HEALTHCHECK
    image: str
    image_id: str
    up_to_date: bool  # runs the image its name points at now
    restarts: int
    started_at: str
    # Filled by `status` from the coordinator's retained counters and Docker's statistics
    # (installer/usage.py); None when that source did not answer.
    tasks_done: int | None = None
    tasks_failed: int | None = None
    credit: float | None = None
    cpu_percent: float | None = None
    memory_bytes: float | None = None
    memory_limit: float | None = None


def _single_file_tar(name: str, text: str) -> bytes:
    """A tar archive of one world-readable file, for docker's put_archive."""
    data = text.encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        info.mtime = int(time.time())
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def slot_of(container: Any) -> int:
    try:
        return int(container.labels.get(d.LABEL_SLOT, "0"))
    except ValueError:
        return 0


class Fleet:
    """The worker containers of one installer instance, through a docker.DockerClient."""

    def __init__(self, client: Any, instance: str = d.INSTANCE, say: Say = lambda _: None,
                 prefix: str | None = None) -> None:
        self.client = client
        self.instance = instance
        self.say = say
        self.prefix = prefix if prefix is not None else worker_prefix(instance)

    # --- reading -------------------------------------------------------------------------

    def containers(self) -> list[Any]:
        """This instance's worker containers (running or not), ordered by slot."""
        found = self.client.containers.list(all=True, filters=owned_filter(self.instance))
        return sorted((c for c in found if is_owned(c.labels, self.instance)), key=lambda c: (slot_of(c), c.name))

    def current_spec(self) -> WorkerSpec | None:
        """The spec the existing workers were made with (lowest slot wins), if any."""
        for container in self.containers():
            try:
                return WorkerSpec.from_container(container.attrs)
            except (KeyError, ValueError, TypeError):
                continue
        return None

    def status(self) -> list[WorkerView]:
        latest: dict[str, str | None] = {}
        rows = []
        for c in self.containers():
            attrs = c.attrs
            state = attrs.get("State") or {}
            image_name = (attrs.get("Config") or {}).get("Image", "")
            if image_name not in latest:
                latest[image_name] = self._image_id(image_name)
            rows.append(WorkerView(
                name=c.name,
                container_id=c.short_id,
                worker_id=c.labels.get(d.LABEL_WORKER_ID, ""),
                slot=slot_of(c),
                state=state.get("Status", c.status),
                health=(state.get("Health") or {}).get("Status", "-"),
                image=image_name,
                image_id=attrs.get("Image", "")[:19],
                up_to_date=latest[image_name] == attrs.get("Image"),
                restarts=int(attrs.get("RestartCount") or 0),
                started_at=state.get("StartedAt", ""),
            ))
        return rows

    def find(self, ref: str) -> list[Any]:
        """Containers matching a worker id, container name, short container id or slot number."""
        return [
            c for c in self.containers()
            if ref in (c.labels.get(d.LABEL_WORKER_ID), c.name, str(slot_of(c))) or c.id.startswith(ref)
        ]

    # --- changing ------------------------------------------------------------------------

    def up(self, spec: WorkerSpec, count: int) -> Changes:
        """Converges to exactly `count` workers made from `spec`, in slots 1..count.

        Containers already matching stay untouched (started if stopped); those with another
        configuration are drained and re-created; those above `count` are drained and removed.
        """
        changes = Changes()
        keep: dict[int, Any] = {}
        retire: list[Any] = []
        for c in self.containers():
            slot = slot_of(c)
            if 1 <= slot <= count and slot not in keep:
                keep[slot] = c
            else:
                retire.append(c)  # an extra slot, or a duplicate of one
        outdated = {s: c for s, c in keep.items() if c.labels.get(d.LABEL_CONFIG) != spec.config_hash()}
        for slot in outdated:
            del keep[slot]
        self._drain([*outdated.values(), *retire])
        changes.drained = [c.name for c in retire]
        changes.replaced = [c.name for c in outdated.values()]
        for slot in range(1, count + 1):
            container = keep.get(slot)
            if container is None:
                container = self._create(spec, slot)
                if slot not in outdated:
                    changes.created.append(container.name)
            elif container.status in ("created", "exited"):
                self.say(f"starting {container.name}")
                container.start()
                changes.started.append(container.name)
            else:
                changes.kept.append(container.name)
        return changes

    def down(self, grace: int | None = None) -> list[str]:
        """Drains and removes every worker of this instance; returns their names."""
        containers = self.containers()
        self._drain(containers, grace)
        return [c.name for c in containers]

    def upgrade(self, image: Any, spec_changes: dict[str, Any] | None = None,
                health_timeout: float = d.HEALTH_TIMEOUT_SECONDS) -> list[str]:
        """Rolling replacement, one worker at a time, of those not running `image`.

        Each new container must turn healthy before the next old one is touched, so a bad
        image takes out at most one worker; UpgradeHalted says which.
        """
        upgraded = []
        changes = spec_changes or {}
        for old in self.containers():
            spec = WorkerSpec.from_container(old.attrs).with_changes(**changes)
            if old.attrs.get("Image") == image.id and old.labels.get(d.LABEL_CONFIG) == spec.config_hash():
                continue
            slot = slot_of(old)
            self._drain([old])
            new = self._create(spec, slot)
            self._wait_healthy(new, health_timeout)
            upgraded.append(new.name)
        return upgraded

    # --- helpers -------------------------------------------------------------------------

    def _create(self, spec: WorkerSpec, slot: int) -> Any:
        params, host = spec.create_args(slot, self.prefix)
        name = params["name"]
        self.say(f"creating {name} (worker {params['labels'][d.LABEL_WORKER_ID]})")
        api = self.client.api
        try:
            created = api.create_container(host_config=api.create_host_config(**host), **params)
        except docker.errors.APIError as exc:
            if exc.status_code == 409:
                raise NameConflict(
                    f"a container named {name} already exists and is not an installer worker",
                    f"rename or remove it (docker rm {name}), or use another --instance",
                ) from None
            raise
        container = self.client.containers.get(created["Id"])
        if spec.ca_pem:
            container.put_archive(str(Path(CONTAINER_CA).parent), _single_file_tar(Path(CONTAINER_CA).name, spec.ca_pem))
        container.start()
        return container

    def _drain(self, containers: Iterable[Any], grace: int | None = None) -> None:
        """SIGTERM all at once, wait up to each one's grace period, then remove them."""
        targets = list(containers)
        if not targets:
            return

        def stop_and_remove(container: Any) -> None:
            timeout = grace if grace is not None else self._grace_of(container)
            self.say(f"draining {container.name} (up to {timeout} s)")
            try:
                if container.status in ("running", "restarting", "paused"):
                    container.stop(timeout=timeout)
                container.remove(force=True)
            except docker.errors.NotFound:
                pass  # already gone (removed by hand meanwhile): the goal is reached

        with ThreadPoolExecutor(max_workers=min(16, len(targets))) as pool:
            for _ in pool.map(stop_and_remove, targets):
                pass

    def _grace_of(self, container: Any) -> int:
        try:
            return WorkerSpec.from_container(container.attrs).grace
        except (KeyError, ValueError, TypeError):
            return d.GRACE_SECONDS

    def _wait_healthy(self, container: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        running_since: float | None = None
        while True:
            container.reload()
            state = container.attrs.get("State") or {}
            health = (state.get("Health") or {}).get("Status")
            if state.get("Status") == "running":
                running_since = running_since or time.monotonic()
                if health == "healthy" or (health is None and time.monotonic() - running_since >= SETTLE_SECONDS):
                    return
            if health == "unhealthy" or state.get("Status") in ("exited", "dead"):
                break
            if time.monotonic() >= deadline:
                break
            time.sleep(POLL_SECONDS)
        raise UpgradeHalted(
            f"{container.name} did not become healthy on the new image "
            f"(state {state.get('Status')}, health {health or '-'}); the other workers were left as they were",
            f"see `dockercomp installer logs {container.labels.get(d.LABEL_WORKER_ID, container.name)}`; "
            "fix the image and run `dockercomp installer upgrade` again",
            container=container.name,
        )

    def _image_id(self, name: str) -> str | None:
        try:
            return str(self.client.images.get(name).id)
        except docker.errors.DockerException:
            return None
