"""The `dockercomp` command: one group per role, each loaded only when it is used.

Loading lazily keeps `dockercomp agent check` (run by Docker's health check every 15 s on a
volunteer's machine) from importing the coordinator's database layer, and lets a role whose
extra is not installed (the worker image has no peewee, no amqtt) fail with the pip command
that adds it instead of an ImportError for everything.

Every role's group is a :class:`Group` (the shared click layer): -h/--help everywhere, and a
command line click cannot parse still honours --json (dockercomp.exits has the codes).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, NoReturn

import click

from dockercomp import __version__
from dockercomp.exits import Exit, Failure, fail

# Role group -> (module:attribute of its click group, the pip extra that brings its dependencies).
ROLES: dict[str, tuple[str, str, str]] = {
    "broker": ("dockercomp.broker.cli:main", "broker", "Run the embedded MQTT broker."),
    "agent": ("dockercomp.agent.cli:main", "", "Run a worker that takes tasks from the broker."),
    "coordinator": ("dockercomp.coordinator.cli:main", "coordinator",
                    "Submit jobs, run the engine, read results, manage volunteers."),
    "installer": ("dockercomp.installer.cli:main", "installer", "Start and manage worker containers on this machine."),
}
# Third-party packages that only the extras bring (see setup.cfg): an ImportError for one of
# them means an extra is missing, not a bug.
EXTRA_PACKAGES = frozenset({"amqtt", "cryptography", "peewee", "rich", "docker", "psycopg2", "PIL"})
CONTEXT = {"help_option_names": ["-h", "--help"]}


class _HelpEverywhere:
    """-h/--help on the command itself, not only inherited: click caches a command's help
    option the first time it is built, so one run as a stand-alone command (a test's CliRunner,
    `python -m dockercomp.coordinator`) would otherwise drop -h for every later run."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["context_settings"] = {**CONTEXT, **(kwargs.get("context_settings") or {})}
        super().__init__(*args, **kwargs)


class Command(_HelpEverywhere, click.Command):
    """A command whose usage errors come out as the JSON error object when --json was given.

    click reports them before the command runs, so the command's own handler never sees them.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        as_json = "--json" in args
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            if not as_json:
                raise
            fail(Failure(Exit.USAGE, type(exc).__name__, exc.format_message(),
                         f"`{ctx.command_path} --help` lists the options"), as_json=True)


class Group(_HelpEverywhere, click.Group):
    """A role's group: its commands are :class:`Command`, its sub-groups :class:`Group`."""

    command_class = Command


Group.group_class = Group


class RoleGroup(click.Group):
    """Lists every role without importing it; imports one only when it is invoked."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(ROLES)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in ROLES:
            return None
        target, extra, _ = ROLES[name]
        module, attribute = target.split(":")
        try:
            command = getattr(importlib.import_module(module), attribute)
        except ImportError as exc:
            _missing_dependency(name, exc)
        return command

    def invoke(self, ctx: click.Context) -> Any:
        # Some commands import their dependency only when they run (`broker serve`: amqtt,
        # `broker certs`: cryptography), so the same hint is owed there too.
        try:
            return super().invoke(ctx)
        except ImportError as exc:
            _missing_dependency(ctx.invoked_subcommand or "", exc)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Help must not import the roles (their dependencies may be missing): say it from ROLES.
        with formatter.section("Roles"):
            formatter.write_dl([(name, help_) for name, (_, _, help_) in ROLES.items()])


def _missing_dependency(role: str, exc: ImportError) -> NoReturn:
    """Exit with the pip command that brings a role's missing third-party package; re-raise
    anything else (a bug of ours, or a scientist's task module, must show its traceback)."""
    top = (exc.name or "").partition(".")[0]
    if role not in ROLES or top not in EXTRA_PACKAGES:
        raise exc
    extra = ROLES[role][1]
    hint = f"pip install 'dockercomp[{extra}]'" if extra else "reinstall dockercomp"
    fail(Failure(Exit.USAGE, "MissingExtra", f"`dockercomp {role}` needs the Python package "
                 f"{top!r}, which is not installed", f"install it with: {hint}"),
         as_json="--json" in sys.argv)


@click.group(cls=RoleGroup, context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="dockercomp")
def main() -> None:
    """Volunteer computing over MQTT: a coordinator hands tasks to volunteers' worker
    containers through a broker. Each role has its own group of commands."""
