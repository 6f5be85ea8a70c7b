"""CLI of issue 11: `submit`'s replication options, and `volunteers stats` / `volunteers release`.

``replication_options`` turns --replicas, --quorum, --max-replicas, --distinct, --validator and
--adaptive into one ``replication`` argument; ``register`` adds the commands to the
`volunteers` group (cli.py). The CLI helpers are imported when the commands are registered,
so cli.py may import this module at its top.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import click

from dockercomp.coordinator.errors import CoordinatorError
from dockercomp.coordinator.replication import DISTINCT, Replication, VolunteerStats
from dockercomp.exits import Exit

F = TypeVar("F", bound=Callable[..., Any])


class NotQuarantined(CoordinatorError, LookupError):
    exit_code = Exit.NOT_FOUND

    def __init__(self, volunteer: str, held: list[str]) -> None:
        self.hint = f"quarantined now: {', '.join(held)}" if held else "no volunteer is quarantined"
        super().__init__(f"volunteer {volunteer!r} is not quarantined")


def replication_options(func: F) -> F:
    """The replication options of `submit`, handed over as ``replication`` (a Replication)."""

    @functools.wraps(func)
    def wrapper(*args: Any, replicas: int, quorum: int | None, max_replicas: int | None, distinct: str,
                validator: str | None, adaptive: bool, **kwargs: Any) -> Any:
        replication = Replication.make(replicas, quorum, max_replicas, distinct, validator, adaptive)
        return func(*args, replication=replication, **kwargs)

    options = [
        click.option("--replicas", metavar="N", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Replicas of each task, to distinct volunteers (redundant computing)."),
        click.option("--quorum", metavar="K", type=click.IntRange(min=1), default=None,
                     help="Agreeing values that make a task's result [default: N]."),
        click.option("--max-replicas", metavar="M", type=click.IntRange(min=1), default=None,
                     help="Replicas issued at most when values disagree [default: 2N when replicated]."),
        click.option("--distinct", type=click.Choice(DISTINCT), default="volunteer", show_default=True,
                     help="Replicas go to distinct volunteers (accounts), or only distinct workers."),
        click.option("--validator", metavar="NAME", default=None,
                     help="Agreement function: 'tolerance' (floats), an entry point of dockercomp.validators, "
                          "or module:function [default: equal canonical JSON]."),
        click.option("--adaptive", is_flag=True,
                     help="Accept a trusted volunteer's value alone, spot-checking a share of them."),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper  # type: ignore[return-value]


def stats_dict(row: VolunteerStats) -> dict[str, Any]:
    return {"volunteer": row.volunteer, "workers": row.workers, "validated": row.validated, "invalid": row.invalid,
            "failed": row.failed, "credit": round(row.credit, 3), "quarantined": row.quarantined,
            "quarantined_at": row.quarantined_at}


def register(group: click.Group) -> None:
    """Add `stats` and `release` to the `volunteers` group."""
    from rich.table import Table

    from dockercomp.coordinator.api import Client
    from dockercomp.coordinator.cli import _echo_json, _stdout, command_errors, db_option, json_option

    @group.command("stats")
    @db_option
    @json_option
    @command_errors
    def volunteers_stats(db: str, as_json: bool) -> None:
        """Leaderboard: credit (CPU-seconds of validated results), invalid and failed attempts,
        quarantine, per volunteer."""
        with Client(db, create=False) as client:  # a read or a change: never a new database
            rows = client.store.volunteer_stats()
        if as_json:
            _echo_json([stats_dict(row) for row in rows])
            return
        if not rows:
            click.echo("No volunteer has been seen yet.")
            return
        table = Table(title="Volunteers by credit (CPU-seconds of validated results)")
        for column in ("volunteer", "workers", "validated", "invalid", "failed", "credit", "quarantined"):
            table.add_column(column, justify="left" if column in ("volunteer", "quarantined") else "right")
        for row in rows:
            table.add_row(row.volunteer, str(row.workers), str(row.validated), str(row.invalid), str(row.failed),
                          f"{row.credit:.3f}", "yes" if row.quarantined else "")
        held = [f"{row.volunteer}: {row.quarantined} (`dockercomp coordinator volunteers release {row.volunteer}`)"
                for row in rows if row.quarantined]
        table.caption = "\n".join(held) or None
        _stdout().print(table)

    @group.command("release")
    @click.argument("volunteer")
    @db_option
    @json_option
    @command_errors
    def volunteers_release(volunteer: str, db: str, as_json: bool) -> None:
        """Lift a volunteer's quarantine: its workers get work again (`serve` notices within a poll)."""
        with Client(db, create=False) as client:  # a read or a change: never a new database
            if not client.store.release(volunteer):
                raise NotQuarantined(volunteer, sorted(client.store.quarantines()))
        if as_json:
            _echo_json({"volunteer": volunteer, "released": True})
        else:
            click.echo(f"Volunteer {volunteer} released from quarantine: its workers get work again.")
