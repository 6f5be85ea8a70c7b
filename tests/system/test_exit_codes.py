"""One table of exit codes for every role, errors as one JSON object under --json, -h everywhere.

Each role runs as a real `python -m dockercomp` process, as a script would call it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from dockercomp import __version__
from dockercomp.cli import ROLES
from dockercomp.cli import main as dockercomp
from dockercomp.coordinator.store import Store
from dockercomp.exits import Exit

REPO_ROOT = Path(__file__).resolve().parents[2]


def run(*args: str, env: dict[str, str] | None = None, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    """`dockercomp ARGS` as a separate process."""
    return subprocess.run([sys.executable, "-m", "dockercomp", *args], capture_output=True, text=True, cwd=cwd,
                          env=dict(os.environ, **(env or {})), timeout=60, check=False)


# ------------------------------------------------------------------------------- the table
def test_every_code_is_distinct_and_says_what_it_means() -> None:
    codes = [int(member) for member in Exit.__members__.values()]
    assert len(codes) == len(set(codes)), "an alias would give one code two meanings"
    assert all(member.meaning for member in Exit)
    assert (Exit.OK, Exit.USAGE, Exit.INTERRUPTED) == (0, 2, 130)  # the conventions scripts rely on


def test_the_readme_documents_the_table_as_it_is() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    documented = re.findall(r"^\| (\d+) \| `(\w+)` \| (.+) \|$", readme, re.MULTILINE)
    assert documented == [(str(int(e)), e.name, e.meaning) for e in Exit]


# ------------------------------------------------------------------ failures, one per role
def failing_cases(tmp: Path) -> list[tuple[list[str], dict[str, str], Exit, str]]:
    """(arguments, environment, expected code, expected kind): a real failure of each role."""
    Store.open(str(tmp / "c.db")).close()  # only submit and serve create a database
    (tmp / "in.txt").write_text("[1]\n")
    return [
        (["broker", "certs", "init", "--dir", str(tmp / "cfg"), "--host", "not a host", "--json"], {},
         Exit.USAGE, "CertificateError"),
        (["coordinator", "status", "nope", "--db", str(tmp / "c.db"), "--json"], {}, Exit.NOT_FOUND, "UnknownJob"),
        (["coordinator", "submit", "f", str(tmp / "in.txt"), "--db", str(tmp / "no" / "dir" / "c.db"), "--json"], {},
         Exit.STORE, "StoreError"),
        (["coordinator", "status", "--db", str(tmp / "none.db"), "--json"], {}, Exit.NOT_FOUND, "DatabaseMissing"),
        (["coordinator", "volunteers", "remove", "alice", "--dir", str(tmp / "cfg"), "--json"], {},
         Exit.NOT_FOUND, "UnknownAccount"),
        (["coordinator", "submit", "--json"], {}, Exit.USAGE, "MissingParameter"),
        (["agent", "check", "--health-file", str(tmp / "none.json"), "--json"], {}, Exit.FAILED, "HealthError"),
        (["installer", "status", "--json"], {"DOCKER_HOST": "unix:///nonexistent/docker.sock"},
         Exit.DOCKER, "EngineUnreachable"),
    ]


CASES = ["broker-certs", "coordinator-unknown-job", "coordinator-store", "coordinator-no-database",
         "coordinator-unknown-account",
         "coordinator-usage", "agent-unhealthy", "installer-no-docker"]


@pytest.mark.parametrize("case", range(len(CASES)), ids=CASES)
def test_a_failure_under_json_is_one_json_object_on_stderr_with_the_code(case: int, tmp_path: Path) -> None:
    args, env, code, kind = failing_cases(tmp_path)[case]
    done = run(*args, env=env)
    assert done.returncode == code, done.stderr
    error = json.loads(done.stderr)["error"]  # the whole of stderr is the one object
    assert error["code"] == code and error["kind"] == kind
    assert error["message"] and "hint" in error
    assert "Traceback" not in done.stderr


def test_without_json_a_failure_is_one_line_and_its_hint(tmp_path: Path) -> None:
    Store.open(str(tmp_path / "c.db")).close()
    done = run("coordinator", "status", "nope", "--db", str(tmp_path / "c.db"))
    assert done.returncode == Exit.NOT_FOUND
    assert done.stderr.splitlines() == [
        "error: no job 'nope'", "hint: no job was submitted yet (`dockercomp coordinator submit FUNCTION FILE`)"]


def test_a_password_in_a_bad_url_is_never_printed(tmp_path: Path) -> None:
    Store.open(str(tmp_path / "c.db")).close()
    for extra in ([], ["--json"]):
        done = run("coordinator", "purge", "--broker", "http://alice:s3cret@example.org", "--db",
                   str(tmp_path / "c.db"), *extra)
        assert done.returncode == Exit.USAGE
        assert "s3cret" not in done.stderr + done.stdout and "alice:***@" in done.stderr


# ---------------------------------------------------------------------------------- help
def walk(group: click.Group, ctx: click.Context, path: list[str]) -> list[list[str]]:
    """Every command path below ``group`` (the roles loaded as `dockercomp ROLE` loads them)."""
    paths = []
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None, f"{' '.join(path + [name])} is listed but cannot be loaded"
        paths.append(path + [name])
        if isinstance(command, click.Group):
            paths += walk(command, click.Context(command, parent=ctx, info_name=name), path + [name])
    return paths


def test_every_group_and_command_answers_dash_h() -> None:
    runner = CliRunner()
    paths = walk(dockercomp, click.Context(dockercomp, info_name="dockercomp"), [])
    assert {p[0] for p in paths} == set(ROLES)
    assert ["broker", "certs", "init"] in paths and ["coordinator", "volunteers", "remove"] in paths
    for path in [[], *paths]:
        for flag in ("-h", "--help"):
            result = runner.invoke(dockercomp, [*path, flag], prog_name="dockercomp")
            assert result.exit_code == 0, f"dockercomp {' '.join(path)} {flag}: {result.output}"
            assert result.output.startswith(f"Usage: dockercomp {' '.join(path)}".rstrip()), result.output


def test_version() -> None:
    for flag in ("--version", "-V"):
        done = run(flag)
        assert done.returncode == 0 and done.stdout == f"dockercomp, version {__version__}\n"
