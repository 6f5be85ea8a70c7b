"""What a volunteer's workers are doing, for `dockercomp installer status`.

Two sources, each allowed to be missing (the row then shows "-"):
- the coordinator's retained counters: `{root}/status/workers/{volunteer}/{worker}` (tasks
  done and failed, credit when the coordinator publishes it) and
  `{root}/status/volunteers/{volunteer}` (the volunteer's credit), read with the workers'
  own broker account, which the ACL lets read exactly these;
- Docker's statistics of each container (CPU and memory use now).
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from dockercomp.broker.connection import MqttConnection
from dockercomp.broker.errors import ConnectionFailed
from dockercomp.installer import defaults as d
from dockercomp.installer.fleet import WorkerView
from dockercomp.installer.spec import WorkerSpec


@dataclass
class Counters:
    """The coordinator's view: per worker id, and the volunteer's own credit."""

    workers: dict[str, dict[str, Any]] = field(default_factory=dict)
    volunteer: dict[str, Any] = field(default_factory=dict)
    reached: bool = False


def coordinator_counters(spec: WorkerSpec, worker_ids: set[str]) -> Counters:
    """The retained status messages about these workers, or empty Counters if the broker is away."""
    settings = spec.broker_settings
    volunteer = spec.volunteer or settings.username or ""
    found = Counters()
    if not volunteer:
        return found
    done = threading.Event()
    lock = threading.Lock()
    worker_prefix = f"{settings.root}/status/workers/{volunteer}/"
    volunteer_topic = f"{settings.root}/status/volunteers/{volunteer}"

    def on_message(topic: str, payload: bytes, retained: bool) -> None:
        try:
            data = json.loads(payload) if payload else None
        except ValueError:
            return  # not ours to judge: status is the coordinator's; show nothing for it
        if not isinstance(data, dict):
            return
        with lock:
            if topic == volunteer_topic:
                found.volunteer = data
            elif topic.startswith(worker_prefix):
                found.workers[topic[len(worker_prefix):]] = data
            if worker_ids <= set(found.workers) and found.volunteer:
                done.set()

    with tempfile.NamedTemporaryFile("w", suffix=".crt") as ca:
        if spec.ca_pem:
            ca.write(spec.ca_pem)
            ca.flush()
            settings = replace(settings, ca_file=ca.name)
        connection = MqttConnection(settings, f"{volunteer}-status-{int(time.time() * 1000) % 10**9}")
        connection.on_message = on_message
        connection.subscribe(f"{worker_prefix}+")
        connection.subscribe(volunteer_topic)
        connection.start()
        try:
            connection.wait_connected(d.STATUS_CONNECT_SECONDS)
            found.reached = True
            # Retained messages come right after the subscription; a worker the coordinator
            # never saw has none, so the wait is bounded rather than "until all arrived".
            done.wait(d.STATUS_RETAINED_SECONDS)
        except ConnectionFailed:
            pass
        finally:
            connection.close(timeout=1)
    return found


def container_usage(containers: list[Any]) -> dict[str, dict[str, float]]:
    """{container name: {cpu_percent, memory_bytes, memory_limit}} of the running containers."""
    running = [c for c in containers if c.status == "running"]
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(running)))) as pool:
        stats = dict(zip([c.name for c in running], pool.map(_stats, running)))
    return {name: value for name, value in stats.items() if value is not None}


def _stats(container: Any) -> dict[str, float] | None:
    try:
        raw = container.stats(stream=False)
    except Exception:  # noqa: BLE001 - a container that stopped meanwhile has no statistics
        return None
    return usage_of(raw)


def usage_of(raw: dict[str, Any]) -> dict[str, float] | None:
    """CPU (percent of one CPU, as `docker stats` shows it) and memory from one stats sample."""
    try:
        cpu, pre = raw["cpu_stats"], raw["precpu_stats"]
        used = cpu["cpu_usage"]["total_usage"] - pre["cpu_usage"]["total_usage"]
        system = cpu.get("system_cpu_usage", 0) - pre.get("system_cpu_usage", 0)
        cpus = cpu.get("online_cpus") or len(cpu["cpu_usage"].get("percpu_usage") or [1])
        memory = raw["memory_stats"]
        # As `docker stats` shows it: page cache that can be dropped does not count.
        cache = (memory.get("stats") or {}).get("inactive_file", 0)
        return {"cpu_percent": round(100.0 * used / system * cpus, 1) if system > 0 else 0.0,
                "memory_bytes": float(memory.get("usage", 0) - cache),
                "memory_limit": float(memory.get("limit", 0))}
    except (KeyError, TypeError):
        return None


def with_usage(row: WorkerView, usage: dict[str, float] | None, counters: dict[str, Any] | None) -> WorkerView:
    """The row with what Docker and the coordinator said about its worker."""
    counters = counters or {}
    usage = usage or {}

    def number(value: Any) -> float | None:
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    done, failed = number(counters.get("done")), number(counters.get("failed"))
    return replace(row, tasks_done=int(done) if done is not None else None,
                   tasks_failed=int(failed) if failed is not None else None,
                   credit=number(counters.get("credit")), cpu_percent=usage.get("cpu_percent"),
                   memory_bytes=usage.get("memory_bytes"), memory_limit=usage.get("memory_limit"))
