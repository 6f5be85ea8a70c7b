"""The Celery application of the benchmark's peer phase (bench/peer.py): one no-op task.

Imported by the Celery worker (`celery -A bench.peer_app worker`) and by the phase's client,
never by the rest of the benchmark, so a machine without the `bench` extra still runs every
other phase. The Redis URL comes from the environment: the worker is a separate process.
"""

from __future__ import annotations

import os

from celery import Celery

# The environment variable naming the Redis server both sides use (set by bench/peer.py).
REDIS_URL_ENV = "DOCKERCOMP_BENCH_REDIS"

_url = os.environ.get(REDIS_URL_ENV, "redis://127.0.0.1:6379/0")
app = Celery("dockercomp_bench_peer", broker=_url, backend=_url)
app.conf.update(
    # JSON both ways, as dockercomp's wire is JSON: neither side gets a cheaper codec.
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    # No retry loop hiding a missing server: the phase starts Redis before anything connects.
    broker_connection_retry_on_startup=False,
    # Events and remote-control chatter are off, as they would be in a tuned deployment.
    worker_send_task_events=False,
    task_send_sent_event=False,
    worker_hijack_root_logger=False,
)


@app.task(name="noop")
def noop() -> None:
    """The same no-op as dockercomp's built-in `noop`."""
    return None
