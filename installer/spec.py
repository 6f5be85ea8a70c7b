"""What a worker container should look like, and how to tell whether an existing one does.

A WorkerSpec is everything the volunteer chose (broker, limits, image...). It is stored on
each container as a label (without passwords), so `up` can compare a running container
with what is asked now through one hash, and `upgrade` can re-create a container exactly as
it was, only on a newer image.

A private CA (`--ca-file`, or `?ca=` in the broker URL, both paths on the volunteer's machine)
travels in the spec as PEM text: a CA certificate is public, the container gets its own copy
(see CONTAINER_CA), and nothing breaks when the volunteer later moves or deletes the file.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from dockercomp.agent.defaults import (
    CONCURRENCY_ENV,
    IDLE_ONLY_ENV,
    IMAGE_ENV,
    MAX_LOAD_ENV,
    PAUSE_FILE_ENV,
    PASSWORD_ENV,
    USERNAME_ENV,
    VOLUNTEER_ENV,
    WORKER_ID_ENV,
)
from dockercomp.broker.defaults import BROKER_URL_ENV
from dockercomp.broker.errors import InvalidName, SettingsError
from dockercomp.broker.settings import BrokerSettings
from dockercomp.broker.topics import ALLOWED_NAME_CHARACTERS, validate_name
from dockercomp.installer import defaults as d
from dockercomp.installer.errors import ConfigError
from dockercomp.installer.identity import container_name, valid_instance, worker_id

_MEMORY = re.compile(r"\d+(\.\d+)?[bkmg]?", re.IGNORECASE)

# Where a worker container finds the broker's CA certificate (written before it starts).
CONTAINER_CA = "/tmp/dockercomp-ca.crt"
# Exists while the volunteer has the worker paused: in the container's own file system, which
# a restart (a reboot) keeps and a re-creation (`up` with new settings, `upgrade`) does not.
CONTAINER_PAUSE_FILE = "/tmp/dockercomp-paused"


def parse_broker(url: str, ca_file: str | Path | None = None) -> tuple[str, str | None]:
    """(normalised broker URL without ?ca=, CA certificate PEM or None), or ConfigError.

    Normalised (explicit port, canonical order), so the same broker given twice in different
    spellings does not look like a configuration change.
    """
    try:
        settings = BrokerSettings.from_url(url)
    except SettingsError as exc:
        raise ConfigError(str(exc), "pass --broker mqtt://HOST:PORT (or mqtts://...)") from None
    path = ca_file if ca_file is not None else settings.ca_file
    return replace(settings, ca_file=None).full_url, (read_ca(Path(path)) if path else None)


def read_ca(path: Path) -> str:
    """The PEM text of a CA certificate file, or ConfigError saying what is wrong with it."""
    try:
        text = path.expanduser().read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the CA file {path}: {exc}",
                          "pass the ca.crt the scientist sent (--ca-file PATH)") from None
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise ConfigError(f"{path} is not a PEM certificate", "pass the ca.crt the scientist sent")
    return text


@dataclass(frozen=True)
class WorkerSpec:
    """The desired configuration shared by all worker containers of one installation."""

    broker: str
    image: str = d.IMAGE
    instance: str = d.INSTANCE
    cpus: float = d.CPUS_PER_WORKER
    memory: str = d.MEMORY
    network: str = d.NETWORK
    concurrency: int | None = None  # None: one task at a time per whole CPU
    volunteer: str | None = None  # None: the agent's default (the broker user name)
    username: str | None = None
    password: str | None = None
    grace: int = d.GRACE_SECONDS
    ca_pem: str | None = None  # the broker's private CA certificate, when it has one
    priority: str = d.PRIORITY
    idle_only: bool = False  # take tasks only while the host's load is below max_load (agent/pause.py)
    max_load: float | None = None  # None: the agent's default share of the host's CPUs

    def validate(self, host_cpus: int | None = None) -> WorkerSpec:
        """Self, or ConfigError naming the option that cannot work and what would."""
        try:
            settings = BrokerSettings.from_url(self.broker)
        except SettingsError as exc:
            raise ConfigError(str(exc), "pass --broker mqtt://HOST:PORT") from None
        if self.network not in d.NETWORKS:
            raise ConfigError(f"unknown network {self.network!r}", f"use one of {', '.join(d.NETWORKS)}")
        if self.network == "bridge" and _is_loopback(settings.host):
            raise ConfigError(
                f"the broker {settings.url} is on this machine's loopback address, which "
                "containers on the bridge network cannot reach",
                "add --network host, or give the broker's LAN address",
            )
        if not valid_instance(self.instance):
            raise ConfigError(f"bad instance name {self.instance!r}", "use lowercase letters, digits, '-' and '_' ('.' would be rewritten by "
                              "a broker such as RabbitMQ)")
        volunteer = self.volunteer or self.username or settings.username
        if volunteer is not None:  # the agent's volunteer name, a topic level: refused here, not in every container
            try:
                validate_name(volunteer, "volunteer name")
            except InvalidName as exc:
                source = "--volunteer" if self.volunteer else "the broker user name"
                raise ConfigError(f"{exc.what} {volunteer!r} (from {source}) cannot be a topic level",
                                  f"pass --volunteer with {ALLOWED_NAME_CHARACTERS}") from None
        if self.cpus <= 0 or (host_cpus is not None and self.cpus > host_cpus):
            raise ConfigError(
                f"--cpus-per-worker {self.cpus:g} is not possible on a machine with {host_cpus} CPUs",
                f"use a value above 0 and at most {host_cpus}",
            )
        if not _MEMORY.fullmatch(self.memory):
            raise ConfigError(f"bad --memory {self.memory!r}", "use a size such as 512m or 2g")
        if self.priority not in d.PRIORITIES:
            raise ConfigError(f"unknown --priority {self.priority!r}", f"use one of {', '.join(d.PRIORITIES)}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ConfigError("--concurrency must be at least 1", "omit it for one task per CPU")
        if self.max_load is not None and self.max_load < 0:
            raise ConfigError(f"bad --max-load {self.max_load:g}", "use a load of 0 or more, e.g. 1.5")
        if self.grace < 0:
            raise ConfigError("--grace must not be negative", f"the default is {d.GRACE_SECONDS} s")
        return self

    @property
    def effective_concurrency(self) -> int:
        return self.concurrency if self.concurrency is not None else max(1, int(self.cpus))

    @property
    def broker_settings(self) -> BrokerSettings:
        return BrokerSettings.from_url(self.broker)

    def config_hash(self) -> str:
        """Changes exactly when a container made from this spec would be different."""
        data = asdict(self)
        for name in ("idle_only", "max_load"):  # added later: unset, they leave older containers' hash as it was
            if data[name] is None or data[name] is False:
                del data[name]
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_label(self) -> str:
        """JSON of the spec without passwords: labels are readable by `docker inspect`."""
        data = asdict(self)
        data.pop("password")
        data["broker"] = self.broker_settings.url  # the password in the URL masked
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_container(cls, attrs: dict[str, Any]) -> WorkerSpec:
        """The spec a container was made from (its label, plus the password from its env)."""
        config = attrs.get("Config") or {}
        labels = config.get("Labels") or {}
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in json.loads(labels[d.LABEL_SPEC]).items() if k in known}
        env = dict(item.split("=", 1) for item in config.get("Env") or [] if "=" in item)
        data["password"] = env.get(PASSWORD_ENV)
        # The label's URL has its password masked; the container's own URL has it.
        masked = BrokerSettings.from_url(data["broker"])
        if masked.password is not None:
            real = BrokerSettings.from_url(env[BROKER_URL_ENV])
            data["broker"] = replace(masked, password=real.password).full_url
        return cls(**data)

    def with_changes(self, **changes: Any) -> WorkerSpec:
        """A copy with the given options replaced; None means keep the current value."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def labels(self, slot: int, worker: str) -> dict[str, str]:
        return {
            d.LABEL_MANAGED_BY: d.MANAGED_BY,
            d.LABEL_ROLE: "worker",
            d.LABEL_INSTANCE: self.instance,
            d.LABEL_SLOT: str(slot),
            d.LABEL_WORKER_ID: worker,
            d.LABEL_CONFIG: self.config_hash(),
            d.LABEL_SPEC: self.to_label(),
        }

    def environment(self, worker: str) -> dict[str, str]:
        ca = CONTAINER_CA if self.ca_pem else None
        env = {
            BROKER_URL_ENV: replace(self.broker_settings, ca_file=ca).full_url,
            WORKER_ID_ENV: worker,
            CONCURRENCY_ENV: str(self.effective_concurrency),
            IMAGE_ENV: self.image,
            PAUSE_FILE_ENV: CONTAINER_PAUSE_FILE,
        }
        optional = {VOLUNTEER_ENV: self.volunteer, USERNAME_ENV: self.username, PASSWORD_ENV: self.password,
                    IDLE_ONLY_ENV: "1" if self.idle_only else None,
                    MAX_LOAD_ENV: f"{self.max_load:g}" if self.max_load is not None and self.idle_only else None}
        env.update({k: v for k, v in optional.items() if v})
        return env

    def create_args(self, slot: int, prefix: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """(create_container kwargs, create_host_config kwargs) of docker's low-level API.

        The low-level API because only it sets stop_timeout, the grace period that a plain
        `docker stop` or a daemon shutdown (the volunteer rebooting) also gives the agent.
        """
        worker = worker_id(prefix, slot)
        container = {
            "image": self.image,
            "name": container_name(self.instance, slot),
            "labels": self.labels(slot, worker),
            "environment": self.environment(worker),
            "stop_timeout": self.grace,
        }
        host = {
            "restart_policy": {"Name": "unless-stopped"},
            "nano_cpus": int(self.cpus * 1e9),
            "mem_limit": self.memory,
            "network_mode": self.network,
            # A tiny init as PID 1 reaps task subprocesses and forwards SIGTERM to the agent.
            "init": True,
            # Task code comes from a scientist, the machine from a volunteer: keep it boxed in.
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges"],
            "pids_limit": d.PIDS_LIMIT,
            **(_LOW_PRIORITY if self.priority == "low" else {}),
            "log_config": {"Type": "json-file", "Config": {"max-size": d.LOG_MAX_SIZE, "max-file": d.LOG_MAX_FILES}},
        }
        return container, host


# Host config of a low-priority worker (installer/defaults.py says why).
_LOW_PRIORITY = {"cpu_shares": d.LOW_CPU_SHARES, "oom_score_adj": d.LOW_OOM_SCORE_ADJ}


def cpu_plan(host_cpus: int, total: float | None, per_worker: float | None, workers: int | None) -> tuple[int, float]:
    """(workers, CPUs per worker) from what the volunteer gave; the rest from a safe share.

    --cpus is the budget of all workers together (default: CPU_SHARE of the machine, at least
    one CPU); it is split evenly, at most CPUS_PER_WORKER each unless --cpus-per-worker is given.
    """
    budget = total if total is not None else max(min(1.0, float(host_cpus)), host_cpus * d.CPU_SHARE)
    if budget <= 0 or budget > host_cpus:
        raise ConfigError(f"--cpus {budget:g} is not possible on a machine with {host_cpus} CPUs",
                          f"use a value above 0 and at most {host_cpus}")
    if workers is None:
        workers = max(1, int(budget // (per_worker or d.CPUS_PER_WORKER)))
    if per_worker is None:
        per_worker = max(0.01, round(min(d.CPUS_PER_WORKER, budget / max(workers, 1)), 2))
    return workers, per_worker


def owned_filter(instance: str | None = None) -> dict[str, list[str]]:
    """Docker `filters` that match only the installer's own worker containers."""
    labels = [f"{d.LABEL_MANAGED_BY}={d.MANAGED_BY}", f"{d.LABEL_ROLE}=worker"]
    if instance is not None:
        labels.append(f"{d.LABEL_INSTANCE}={instance}")
    return {"label": labels}


def is_owned(labels: dict[str, str] | None, instance: str | None = None) -> bool:
    """Double check on the client side: never act on a container the filter let through by mistake."""
    labels = labels or {}
    if labels.get(d.LABEL_MANAGED_BY) != d.MANAGED_BY or labels.get(d.LABEL_ROLE) != "worker":
        return False
    return instance is None or labels.get(d.LABEL_INSTANCE) == instance


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
