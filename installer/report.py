"""How the installer shows its state: a rich table for people, JSON for scripts and tests."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import TextIO

from rich.console import Console
from rich.table import Table

from dockercomp.installer.fleet import Changes, WorkerView

_STATE_STYLE = {"running": "green", "restarting": "yellow", "exited": "red", "dead": "red"}
_HEALTH_STYLE = {"healthy": "green", "starting": "yellow", "unhealthy": "red"}


def status_json(rows: list[WorkerView]) -> str:
    return json.dumps([asdict(row) for row in rows], indent=2)


def status_table(rows: list[WorkerView], console: Console, credit: object = None) -> None:
    if not rows:
        console.print("no dockercomp workers on this machine (start some with `dockercomp installer up`)")
        return
    title = f"dockercomp workers ({len(rows)})" + (f", your credit: {credit:g}" if isinstance(credit, (int, float)) else "")
    table = Table(title=title)
    for column in ("slot", "container", "worker id", "state", "health", "done", "failed", "credit", "CPU", "memory",
                   "image", "restarts", "started"):
        # Fold rather than cut: a worker id with its last characters replaced by "…" is useless.
        table.add_column(column, overflow="fold")
    for row in rows:
        image = row.image + ("" if row.up_to_date else " [yellow](newer image available)[/]")
        table.add_row(
            str(row.slot),
            row.name,
            row.worker_id,
            f"[{_STATE_STYLE.get(row.state, 'white')}]{row.state}[/]",
            f"[{_HEALTH_STYLE.get(row.health, 'white')}]{row.health}[/]",
            "-" if row.tasks_done is None else str(row.tasks_done),
            "-" if row.tasks_failed is None else str(row.tasks_failed),
            "-" if row.credit is None else f"{row.credit:g}",
            "-" if row.cpu_percent is None else f"{row.cpu_percent:.1f}%",
            "-" if row.memory_bytes is None else f"{row.memory_bytes / 2**20:.0f} / {(row.memory_limit or 0) / 2**20:.0f} MiB",
            image,
            str(row.restarts),
            row.started_at[:19].replace("T", " "),
        )
    console.print(table)


def summary(changes: Changes, total: int, out: TextIO) -> None:
    """One line per kind of change, then how to look, stop and uninstall."""
    for verb, names in (
        ("created", changes.created),
        ("re-created with the new settings", changes.replaced),
        ("started", changes.started),
        ("drained and removed", changes.drained),
        ("unchanged", changes.kept),
    ):
        if names:
            print(f"{verb}: {', '.join(names)}", file=out)
    print(f"{total} worker container(s) running. Check them with `dockercomp installer status`; "
          "stop them with `dockercomp installer down`.", file=out)
