"""`installer pause` / `resume`: the volunteer takes their machine back without stopping anything.

The installer signals the agent inside each container (``docker kill --signal``: SIGUSR1
pauses, SIGUSR2 resumes; the container's init forwards it to the agent). The agent announces
``paused`` first, hands back what it holds unrun (no attempt used), lets running tasks finish
within its grace period, and stays connected, so the coordinator does not count it lost.
``docker pause`` is not used: a frozen agent stops answering keepalives and its will fires.

A signal, not a control file: it needs no volume, reaches a read-only container, is
delivered at once (no polling), and is the same thing `dockercomp agent run` outside Docker
understands (`kill -USR1 PID`). The agent itself remembers a pause across a container restart
(a reboot) in a marker file in the container's file system (spec.CONTAINER_PAUSE_FILE).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import click

from dockercomp.installer import defaults as d
from dockercomp.installer.errors import InstallerError, NoSuchWorker
from dockercomp.installer.fleet import Fleet, slot_of

# What each command sends, and the agent state (health file) that confirms it.
SIGNALS = {True: ("SIGUSR1", "paused"), False: ("SIGUSR2", "running")}


@dataclass
class Controlled:
    """One container a pause or resume was sent to, and what came of it."""

    name: str
    worker_id: str
    slot: int
    state: str  # the agent's state after the signal, or why it was not sent
    confirmed: bool


def agent_state(container: Any) -> str:
    """The agent's own state from its health file (`dockercomp agent check --json`), or ""."""
    try:
        code, output = container.exec_run(["dockercomp", "agent", "check", "--json"], demux=False)
    except Exception:  # noqa: BLE001 - the container may be stopping: unknown, not fatal
        return ""
    try:
        return str(json.loads(output).get("state", "")) if code == 0 else ""
    except (ValueError, AttributeError):
        return ""


def control(fleet: Fleet, refs: tuple[str, ...], pause: bool, timeout: float) -> list[Controlled]:
    """Pause (or resume) the matching running workers; waits up to ``timeout`` seconds for each
    agent to confirm (0: do not wait)."""
    containers = [c for ref in refs for c in fleet.find(ref)] if refs else fleet.containers()
    if refs and not containers:
        raise NoSuchWorker(f"no worker matches {', '.join(refs)}", "`dockercomp installer status` lists the workers")
    signal, wanted = SIGNALS[pause]
    sent: list[tuple[Controlled, Any]] = []
    done: list[Controlled] = []
    for container in {c.id: c for c in containers}.values():
        container.reload()
        row = Controlled(container.name, container.labels.get(d.LABEL_WORKER_ID, ""), slot_of(container),
                         "signalled", False)
        done.append(row)
        if container.status != "running":
            row.state = f"not running ({container.status})"
            continue
        container.kill(signal=signal)
        sent.append((row, container))
    deadline = time.monotonic() + timeout
    for row, container in sent if timeout else ():
        while True:
            state = agent_state(container)
            if state == wanted:
                row.state, row.confirmed = "paused" if pause else "resumed", True
                break
            if time.monotonic() >= deadline:
                row.state = f"signalled; the agent says {state or 'nothing'} (not confirmed in {timeout:g} s)"
                break
            time.sleep(0.5)
    return done


def register_controls(group: click.Group) -> None:
    """Add `pause` and `resume` to the installer's command group."""
    from dockercomp.installer.cli import installer_errors  # cli.py calls this once it is defined
    from dockercomp.installer.engine import connect

    def command(pause: bool) -> click.Command:
        verb = "pause" if pause else "resume"

        @click.argument("workers", nargs=-1)
        @click.option("--wait", "timeout", type=click.FloatRange(min=0), default=d.CONTROL_TIMEOUT_SECONDS,
                      show_default=True, help="Seconds to wait for each agent to confirm (0: do not wait).")
        @click.option("--json", "as_json", is_flag=True, help="Print JSON instead of lines.")
        @click.pass_obj
        @installer_errors
        def run(instance: str, workers: tuple[str, ...], timeout: float, as_json: bool) -> None:
            rows = control(Fleet(connect(), instance), workers, pause, timeout)
            if as_json:
                click.echo(json.dumps([asdict(row) for row in rows], indent=2))
            else:
                for row in rows:
                    click.echo(f"{row.name}  worker {row.worker_id or '-'}  {row.state}")
                if not rows:
                    click.echo("no workers: `dockercomp installer up` starts them")
            if timeout and any(not r.confirmed and r.state.startswith("signalled") for r in rows):
                raise InstallerError(f"not every worker confirmed the {verb}",
                                     "`dockercomp installer logs WORKER` shows what its agent did")

        run.__doc__ = (
            "Pause WORKERS (worker id, container name or slot; default all): each announces itself "
            "paused, hands back what it holds unrun (no attempt used), lets running tasks finish "
            "within its grace period, and stays connected. `resume` undoes it."
            if pause else "Resume paused WORKERS (default all): they take tasks again.")
        return click.command(verb, help=run.__doc__)(run)

    group.add_command(command(True))
    group.add_command(command(False))
