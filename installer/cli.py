"""`installer`: runs dockercomp worker containers on a volunteer's machine.

The click layer only parses options, builds a WorkerSpec and calls Fleet; every failure
becomes one line, the fix, and a distinct exit code (installer.errors, dockercomp.exits),
never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import docker.errors
from rich.console import Console

from dockercomp.agent.defaults import PASSWORD_ENV, USERNAME_ENV, VOLUNTEER_ENV
from dockercomp.broker.defaults import BROKER_URL_ENV
from dockercomp.cli import CONTEXT, Group
from dockercomp.exits import Exit, handled
from dockercomp.installer import defaults as d
from dockercomp.installer.control import register_controls
from dockercomp.installer.engine import connect, diagnose, engine_cpus
from dockercomp.installer.errors import ConfigError, InstallerError, NoSuchWorker
from dockercomp.installer.fleet import Fleet
from dockercomp.installer.image import ensure_image
from dockercomp.installer.logs import show
from dockercomp.installer.preflight import check_broker
from dockercomp.installer.report import status_json, status_table, summary
from dockercomp.installer.spec import WorkerSpec, cpu_plan, parse_broker, read_ca
from dockercomp.installer.usage import Counters, container_usage, coordinator_counters, with_usage

def _say(message: str) -> None:
    click.echo(f"installer: {message}", err=True)


def _docker_errors(exc: BaseException) -> BaseException | None:
    """Docker SDK failures (they carry no exit code) as installer errors."""
    if isinstance(exc, docker.errors.APIError):
        return InstallerError(f"Docker refused: {exc.explanation or exc}",
                              "check the options given; `docker info` shows the engine")
    if isinstance(exc, docker.errors.DockerException):  # the engine went away mid-operation
        return diagnose(exc)
    if isinstance(exc, KeyboardInterrupt):
        interrupted = InstallerError("interrupted; containers already changed stay as they are",
                                     "run the command again to finish")
        interrupted.exit_code = Exit.INTERRUPTED
        return interrupted
    return None


#: The error handler of every installer command.
installer_errors = handled(translate=_docker_errors)


@click.group(cls=Group, context_settings=CONTEXT)
@click.option("--instance", envvar=d.INSTANCE_ENV, default=d.INSTANCE, show_default=True,
              help="Name of this installation; each instance manages only its own workers.")
@click.pass_context
def main(ctx: click.Context, instance: str) -> None:
    """Run dockercomp worker containers that compute for a scientist's coordinator."""
    ctx.obj = instance


@main.command()
@click.option("--broker", envvar=BROKER_URL_ENV, help="mqtt://HOST:PORT (or mqtts://USER:PASS@HOST:8883) of the scientist's broker.")
@click.option("--ca-file", type=click.Path(dir_okay=False, path_type=Path), help="The broker's CA certificate (ca.crt from the scientist).")
@click.option("--workers", type=click.IntRange(min=0), help="Number of worker containers [default: one per CPU of --cpus, or the current number].")
@click.option("--cpus", type=float, help=f"CPUs all workers together may use [default: {d.CPU_SHARE:.0%} of this machine].")
@click.option("--cpus-per-worker", type=float, help=f"CPU limit per worker [default: --cpus split evenly, at most {d.CPUS_PER_WORKER:g}].")
@click.option("--priority", type=click.Choice(d.PRIORITIES), help=f"CPU priority of the workers [default: {d.PRIORITY}: your programs come first].")
@click.option("--memory", help=f"Memory limit per worker, e.g. 512m or 2g [default: {d.MEMORY}].")
@click.option("--image", help=f"Worker image [default: {d.IMAGE}].")
@click.option("--image-archive", type=click.Path(dir_okay=False, path_type=Path), help="Load the image from a `docker save` file.")
@click.option("--network", type=click.Choice(d.NETWORKS), help=f"Container network [default: {d.NETWORK}].")
@click.option("--concurrency", type=click.IntRange(min=1), help="Tasks each worker runs at once [default: its CPUs].")
@click.option("--volunteer", envvar=VOLUNTEER_ENV, help="Your volunteer name [default: the broker user name].")
@click.option("--username", envvar=USERNAME_ENV, help="Broker user name.")
@click.option("--password", envvar=PASSWORD_ENV, help="Broker password (prefer the env variable).")
@click.option("--grace", type=click.IntRange(min=0), help=f"Seconds a stopping worker gets to drain [default: {d.GRACE_SECONDS}].")
@click.option("--skip-broker-check", is_flag=True, help="Do not test the TCP connection to the broker first.")
@click.option("--idle-only/--always", "idle_only", default=None, help="Take tasks only while the host's load is below --max-load [default: --always, or as configured].")
@click.option("--max-load", type=click.FloatRange(min=0), help="The host load idle-only workers pause above [default: half the CPUs].")
@click.pass_obj
@installer_errors
def up(instance: str, broker: str | None, ca_file: Path | None, workers: int | None, cpus: float | None,
       cpus_per_worker: float | None, priority: str | None,
       memory: str | None, image: str | None, image_archive: Path | None, network: str | None,
       concurrency: int | None, volunteer: str | None, username: str | None, password: str | None,
       grace: int | None, skip_broker_check: bool, idle_only: bool | None, max_load: float | None) -> None:
    """Converge to exactly N worker containers (safe to run again; fewer drains the extras)."""
    client = connect()
    fleet = Fleet(client, instance, say=_say)
    current = fleet.current_spec()
    if current is None and not broker:
        raise ConfigError("no broker given", "pass --broker mqtt://HOST:PORT (from the scientist)")
    ca_pem = None
    if broker:
        broker, ca_pem = parse_broker(broker, ca_file)
    elif ca_file:
        ca_pem = read_ca(ca_file)
    base = current or WorkerSpec(broker=str(broker), instance=instance)
    host_cpus = engine_cpus(client)
    if workers is None and current is not None:
        workers = len(fleet.containers())
    if current is not None and cpus is None and cpus_per_worker is None:
        workers = workers or 0  # a running installation keeps its CPU limits unless they are given
    else:
        workers, cpus_per_worker = cpu_plan(host_cpus, cpus, cpus_per_worker, workers)
    spec = base.with_changes(
        broker=broker, ca_pem=ca_pem, image=image, cpus=cpus_per_worker, memory=memory, network=network,
        concurrency=concurrency, volunteer=volunteer, username=username, password=password, grace=grace,
        priority=priority, idle_only=idle_only, max_load=max_load,
    )
    if max_load is not None and not spec.idle_only:
        raise ConfigError("--max-load applies only to idle-only workers", "add --idle-only")
    spec.validate(host_cpus)
    if workers > 0 and not skip_broker_check:
        check_broker(spec.broker_settings)
    if workers > 0:
        ensure_image(client, spec.image, archive=image_archive, say=_say)
    changes = fleet.up(spec, workers)
    summary(changes, workers, sys.stdout)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--offline", is_flag=True, help="Do not ask the broker for the coordinator's counters and credit.")
@click.pass_obj
@installer_errors
def status(instance: str, as_json: bool, offline: bool) -> None:
    """Show each worker: state, health, tasks done and failed, credit, CPU and memory use."""
    fleet = Fleet(connect(), instance)
    rows = fleet.status()
    spec = fleet.current_spec()
    usage = container_usage(fleet.containers()) if rows else {}
    counters = coordinator_counters(spec, {r.worker_id for r in rows}) if spec and rows and not offline else Counters()
    rows = [with_usage(row, usage.get(row.name), counters.workers.get(row.worker_id)) for row in rows]
    if as_json:
        click.echo(status_json(rows))
    else:
        # Piped output has no terminal width; rich would assume 80 columns and fold every cell.
        status_table(rows, Console(width=None if sys.stdout.isatty() else 250), counters.volunteer.get("credit"))
        if rows and spec and not offline and not counters.reached:
            _say("the broker did not answer: tasks and credit are unknown (-)")


@main.command()
@click.argument("worker", required=False)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output.")
@click.option("--tail", type=click.IntRange(min=0), help="Only the last N lines of each worker.")
@click.pass_obj
@installer_errors
def logs(instance: str, worker: str | None, follow: bool, tail: int | None) -> None:
    """Print the output of WORKER (worker id, container name or slot), or of all workers."""
    fleet = Fleet(connect(), instance)
    containers = fleet.find(worker) if worker else fleet.containers()
    if worker and not containers:
        raise NoSuchWorker(f"no worker matches {worker!r}", "`dockercomp installer status` lists the workers")
    show(containers, sys.stdout, follow=follow, tail=tail)


@main.command()
@click.option("--grace", type=click.IntRange(min=0), help="Seconds each worker gets to drain [default: as configured].")
@click.pass_obj
@installer_errors
def down(instance: str, grace: int | None) -> None:
    """Drain and remove every worker container (other containers are never touched)."""
    removed = Fleet(connect(), instance, say=_say).down(grace)
    click.echo(f"removed {len(removed)} worker container(s)" + (f": {', '.join(removed)}" if removed else ""))


@main.command()
@click.option("--image", help="Switch to this image [default: the current one, refreshed].")
@click.option("--image-archive", type=click.Path(dir_okay=False, path_type=Path), help="Load the new image from a `docker save` file.")
@click.option("--health-timeout", type=click.FloatRange(min=0), default=d.HEALTH_TIMEOUT_SECONDS, show_default=True,
              help="Seconds each new worker gets to become healthy before the upgrade halts.")
@click.pass_obj
@installer_errors
def upgrade(instance: str, image: str | None, image_archive: Path | None, health_timeout: float) -> None:
    """Fetch the newest image and replace the workers one at a time (rolling)."""
    client = connect()
    fleet = Fleet(client, instance, say=_say)
    current = fleet.current_spec()
    if current is None:
        raise InstallerError("there are no workers to upgrade", "start them with `dockercomp installer up --broker URL`")
    name = image or current.image
    new_image = ensure_image(client, name, archive=image_archive, refresh=True, say=_say)
    upgraded = fleet.upgrade(new_image, {"image": name}, health_timeout)
    click.echo(f"upgraded {len(upgraded)} worker(s)" + (f": {', '.join(upgraded)}" if upgraded else "; all were up to date"))


register_controls(main)  # pause, resume (installer/control.py)


if __name__ == "__main__":
    main()
