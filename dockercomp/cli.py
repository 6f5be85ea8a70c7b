"""The `dockercomp` command: one group per role, each loaded only when it is used.

Loading lazily keeps `dockercomp agent check` (run by Docker's health check every 15 s on a
volunteer's machine) from importing the coordinator's database layer, and lets a role whose
extra is not installed (the worker image has no peewee, no amqtt) fail with the pip command
that adds it instead of an ImportError for everything.
"""

from __future__ import annotations

import importlib
import sys

import click

from dockercomp import __version__

# Role group -> (module:attribute of its click group, the pip extra that brings its dependencies).
ROLES: dict[str, tuple[str, str, str]] = {
    "broker": ("dockercomp.broker.cli:main", "broker", "Run the embedded MQTT broker."),
    "agent": ("dockercomp.agent.cli:main", "", "Run a worker that takes tasks from the broker."),
    "coordinator": ("dockercomp.coordinator.cli:main", "coordinator",
                    "Submit jobs, run the engine, read results, manage volunteers."),
    "installer": ("dockercomp.installer.cli:main", "installer", "Start and manage worker containers on this machine."),
}
CONTEXT = {"help_option_names": ["-h", "--help"]}


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
            if not exc.name or exc.name.startswith("dockercomp"):
                raise
            hint = f"pip install 'dockercomp[{extra}]'" if extra else "reinstall dockercomp"
            click.echo(f"error: `dockercomp {name}` needs the Python package {exc.name!r}, which is not "
                       f"installed; install it with: {hint}", err=True)
            sys.exit(2)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Help must not import the roles (their dependencies may be missing): say it from ROLES.
        with formatter.section("Roles"):
            formatter.write_dl([(name, help_) for name, (_, _, help_) in ROLES.items()])


@click.group(cls=RoleGroup, context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="dockercomp")
def main() -> None:
    """Volunteer computing over MQTT: a coordinator hands tasks to volunteers' worker
    containers through a broker. Each role has its own group of commands."""
