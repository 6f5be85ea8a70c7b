"""`agent` command line: `dockercomp agent run`, `dockercomp agent check`, `dockercomp agent functions`.

Thin: click parses options (each also from its DOCKERCOMP_* environment variable), builds
AgentSettings, calls the library, and leaves failures to dockercomp.exits (one line and a
hint, or one JSON object with --json; 1 = failed or unhealthy, 2 = an option or variable
must change).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import click

from dockercomp.agent.defaults import (
    CONCURRENCY_ENV,
    GRACE_SECONDS,
    HEALTH_FILE,
    HEALTH_FILE_ENV,
    HEARTBEAT_ENV,
    HEARTBEAT_SECONDS,
    IDLE_MAX_LOAD_PER_CPU,
    IDLE_ONLY_ENV,
    LOAD_FILE,
    MAX_LOAD_ENV,
    PAUSE_FILE_ENV,
    PASSWORD_ENV,
    PREFETCH_ENV,
    USERNAME_ENV,
    VOLUNTEER_ENV,
    WORKER_ID_ENV,
)
from dockercomp.agent.health import check_health
from dockercomp.agent.settings import AgentSettings
from dockercomp.agent.tasks import Registry
from dockercomp.broker.defaults import BROKER_URL_ENV, DEFAULT_BROKER_URL, KEEPALIVE_SECONDS, MAX_HEARTBEAT_SECONDS
from dockercomp.cli import CONTEXT, Group
from dockercomp.exits import handled


def _setup_logging(verbose: int) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if verbose < 2:
        logging.getLogger("paho").setLevel(logging.WARNING)


@click.group(cls=Group, context_settings=CONTEXT)
def main() -> None:
    """dockercomp worker agent: runs tasks it receives over MQTT."""


@main.command()
@click.option("--broker", "broker_urls", envvar=BROKER_URL_ENV, multiple=True, default=(DEFAULT_BROKER_URL,),
              show_default=True,
              help="Broker URL, mqtt://user:pass@host:port or mqtts://...; the nodes of a broker cluster as a "
                   "comma-separated list (mqtt://user:pass@node1:1883,node2:1883) or a repeated --broker: "
                   f"when one fails the agent connects to the next [env {BROKER_URL_ENV}]")
@click.option("--worker-id", envvar=WORKER_ID_ENV,
              help=f"This worker's name [env {WORKER_ID_ENV}; default: host name, plus -PID outside a container]")
@click.option("--volunteer", envvar=VOLUNTEER_ENV,
              help=f"Volunteer name [env {VOLUNTEER_ENV}; default: broker user name, else 'local']")
@click.option("--concurrency", envvar=CONCURRENCY_ENV, type=click.IntRange(min=1),
              help=f"Tasks run at once, one process each [env {CONCURRENCY_ENV}; default: CPU count]")
@click.option("--prefetch", envvar=PREFETCH_ENV, type=click.IntRange(min=0),
              help="Tasks the coordinator may queue here beyond those running, so a finished task is "
                   "followed at once by the next; 0 for long tasks that other workers should get instead "
                   f"[env {PREFETCH_ENV}; default: the concurrency]")
@click.option("--keepalive", type=click.IntRange(1, 65535),
              help="MQTT keepalive in seconds; a frozen agent is reported lost within 2x this + 5 s "
                   f"[default {KEEPALIVE_SECONDS}]")
@click.option("--heartbeat", envvar=HEARTBEAT_ENV, type=click.FloatRange(0, MAX_HEARTBEAT_SECONDS),
              default=HEARTBEAT_SECONDS, show_default=True, metavar="S",
              help="Seconds between heartbeats (the presence again, not retained): the coordinator marks this "
                   f"worker lost when they stop, even if no will comes; 0: none [env {HEARTBEAT_ENV}]")
@click.option("--grace", type=click.FloatRange(min=0), default=GRACE_SECONDS, show_default=True,
              help="Seconds running tasks get to finish after the first SIGTERM/SIGINT or a pause")
@click.option("--username", envvar=USERNAME_ENV, help=f"Broker user name [env {USERNAME_ENV}]; "
              f"the password comes from {PASSWORD_ENV} or the URL")
@click.option("--health-file", envvar=HEALTH_FILE_ENV, type=click.Path(dir_okay=False),
              help=f"Where `dockercomp agent check` finds this agent's health [env {HEALTH_FILE_ENV}; default {HEALTH_FILE}]")
@click.option("--idle-only", is_flag=True, envvar=IDLE_ONLY_ENV,
              help="Take tasks only while the host's load (minus this agent's own tasks) is below --max-load; "
                   f"pause above it, resume when it falls back [env {IDLE_ONLY_ENV}]")
@click.option("--max-load", type=click.FloatRange(min=0), envvar=MAX_LOAD_ENV,
              help=f"The load --idle-only pauses above [env {MAX_LOAD_ENV}; default: {IDLE_MAX_LOAD_PER_CPU:g} x CPUs]")
@click.option("--load-file", type=click.Path(dir_okay=False, path_type=Path), default=LOAD_FILE, show_default=True,
              help="Where --idle-only reads the 1-minute load average (the host's, also inside a container)")
@click.option("--pause-file", envvar=PAUSE_FILE_ENV, type=click.Path(dir_okay=False, path_type=Path),
              help=f"A file that exists while paused (SIGUSR1), so a restart starts paused [env {PAUSE_FILE_ENV}]")
@click.option("-v", "--verbose", count=True, help="Log every task (-v) and MQTT packets (-vv).")
@handled
def run(broker_urls: tuple[str, ...], worker_id: str | None, volunteer: str | None, concurrency: int | None,
        prefetch: int | None, keepalive: int | None, heartbeat: float, grace: float, username: str | None,
        health_file: str | None, idle_only: bool, max_load: float | None, load_file: Path, pause_file: Path | None,
        verbose: int) -> None:
    """Connect to the broker and run tasks until stopped.

    The first SIGTERM or Ctrl-C drains: a draining presence (the coordinator sends no more),
    queued tasks are handed back unrun, running ones get --grace seconds (then are killed and
    handed back: no task loses an attempt), then an offline presence and a clean disconnect.
    A second one stops at once. SIGUSR1 pauses (a paused presence, queued tasks handed back,
    running ones get --grace seconds; it stays connected) and SIGUSR2 resumes. A broker that refuses this agent for good (password, TLS)
    stops it with exit code 11 (a missing ?ca= file: 6).
    """
    from dockercomp.agent.agent import Agent  # not needed by `check`, which Docker runs every 15 s
    from dockercomp.agent.pause import LoadWatch, default_max_load

    _setup_logging(verbose)
    settings = AgentSettings.from_options(
        ",".join(broker_urls), worker_id=worker_id, volunteer=volunteer, concurrency=concurrency, prefetch=prefetch,
        keepalive=keepalive, grace=grace, username=username, password=os.environ.get(PASSWORD_ENV) or None,
        health_file=health_file, heartbeat=heartbeat,
    )
    if max_load is not None and not idle_only:
        raise click.UsageError("--max-load applies only with --idle-only")
    watch = LoadWatch(load_file, default_max_load() if max_load is None else max_load) if idle_only else None
    agent = Agent(settings, Registry.load(), load_watch=watch)
    if pause_file is not None:
        agent.pauser.remember_in(pause_file)
    agent.install_signal_handlers()
    sys.exit(agent.run())


@main.command()
@click.option("--health-file", envvar=HEALTH_FILE_ENV, default=HEALTH_FILE, show_default=True,
              type=click.Path(dir_okay=False), help=f"The file `dockercomp agent run` writes [env {HEALTH_FILE_ENV}]")
@click.option("--json", "as_json", is_flag=True, help="Print the health as JSON.")
@handled
def check(health_file: str, as_json: bool) -> None:
    """Exit 0 if this machine's agent is running and connected, else 1 with the reason on stderr."""
    health = check_health(Path(health_file))
    if as_json:
        click.echo(json.dumps({"healthy": True, **asdict(health)}))
    else:
        click.echo(f"healthy: {health.describe(time.time())}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the functions as JSON.")
@handled
def functions(as_json: bool) -> None:
    """List the task functions this worker offers (built-ins and installed packages)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    registry = Registry.load()
    rows = [{"name": f.name, "signature": f"{f.name}{f.signature or '(...)'}", "source": f.source,
             "target": f.target, "summary": f.summary} for f in registry]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    # Plain text, not a rich table: the worker image installs only the agent's dependencies.
    click.echo(f"{len(rows)} task functions")
    for row in rows:
        click.echo(f"\n{row['signature']}  [{row['source']}]")
        if row["summary"]:
            click.echo(f"    {row['summary']}")


if __name__ == "__main__":
    main()
