"""`python -m bench.compare REV`: this working tree's figures against another commit's, measured
in turns on the same machine (``--pairs`` times: REV, then this code).

On a shared machine the same code moves by 40 % between runs an hour apart, so "nothing
regresses" can only be told by runs interleaved with the old code's. The old code runs from a
git worktree of REV. Putting that worktree first on PYTHONPATH is NOT enough with an editable
install of dockercomp: the install's import finder maps ``dockercomp.coordinator`` and the other
roles to this checkout's folders, so such a run mixes the two (its ``dockercomp/`` with our
``coordinator/``). Here every process of the old run imports the old roles through a finder
that comes first (a ``sitecustomize`` written for it), and the run checks which files it
imported before measuring anything.

    python -m bench.compare HEAD~3 --only e2e --only window1 --pairs 3
    python -m bench.compare HEAD~3 --only scale --bench-args "--scale-workers 50000"

Prints, per figure, the median of each side, this / REV, and every pair. Exit codes: 0 done,
1 a run failed (its output is shown), 2 bad options or an unknown commit.
"""

from __future__ import annotations

import configparser
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from bench.harness import REPO_ROOT
from bench.run import PHASES

EXIT_RUN_FAILED = 1
EXIT_USAGE = 2

# Written next to the old checkout and put first on PYTHONPATH: every Python process of its run
# (the bench, `serve`, agents, task processes) imports dockercomp's roles from the old folders.
_SITECUSTOMIZE = '''\
import sys
from importlib.util import spec_from_file_location

MAPPING = {mapping!r}


class _OldCheckout:  # a MetaPathFinder ahead of the editable install's
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        folder = MAPPING.get(fullname)
        if folder is None:
            return None  # submodules follow their package's __path__, i.e. the old folders
        return spec_from_file_location(fullname, folder + "/__init__.py", submodule_search_locations=[folder])


sys.meta_path.insert(0, _OldCheckout)
'''

# The packages whose files prove which code a run imports.
_PROBE = ("dockercomp.coordinator.service", "dockercomp.agent.agent", "dockercomp.broker.connection")


def package_mapping(checkout: Path) -> dict[str, str]:
    """setup.cfg's package_dir of ``checkout`` as {package: absolute folder}."""
    config = configparser.ConfigParser()
    config.read(checkout / "setup.cfg")
    lines = config.get("options", "package_dir", fallback="").strip().splitlines()
    mapping = {}
    for line in lines:
        name, _, folder = line.partition("=")
        if name.strip() and folder.strip():
            mapping[name.strip()] = str((checkout / folder.strip()).resolve())
    return mapping


def figures(results: dict[str, Any]) -> dict[str, float]:
    """The comparable numbers of one bench run, by readable name."""
    out: dict[str, float] = {}
    for run in results.get("e2e", []):
        key = run["key"]
        out[f"{key} tasks/s"] = run["tasks_per_s"]
        out[f"{key} p50 ms"] = run["latency"]["p50_ms"]
        out[f"{key} p99 ms"] = run["latency"]["p99_ms"]
        for group, ms in (run.get("cpu_ms_per_task") or {}).items():
            out[f"{key} CPU ms/task, {group}"] = ms
    if results.get("ratio"):
        out["e2e/raw"] = results["ratio"]
    peer = results.get("peer") or {}
    e2e = out.get("e2e-mosquitto tasks/s")
    if e2e and peer.get("tasks_per_s"):
        out["e2e / Celery+Redis"] = round(e2e / peer["tasks_per_s"], 2)
    for fleet in results.get("scale_fleets") or ([results["scale"]] if results.get("scale") else []):
        for job in fleet.get("jobs", []):
            where = f"scale {fleet['workers']:,} workers, {job['tasks']:,} tasks"
            out[f"{where}: tasks/s"] = job["tasks_per_s"]
            out[f"{where}: coordinator CPU ms/task"] = job["cpu_ms_per_task"]
    for phase in ("replicas", "metrics"):
        ratio = (results.get(phase) or {}).get("ratio")
        if isinstance(ratio, (int, float)):
            out[f"{phase} ratio"] = ratio
    return out


@contextmanager
def old_checkout(rev: str) -> Iterator[tuple[Path, dict[str, str]]]:
    """A worktree of ``rev`` and the environment its runs need; removed afterwards."""
    scratch = Path(tempfile.mkdtemp(prefix="dockercomp-compare-"))
    tree = scratch / "tree"
    added = subprocess.run(["git", "-C", str(REPO_ROOT), "worktree", "add", "--detach", str(tree), rev],
                           capture_output=True, text=True, check=False)
    if added.returncode != 0:
        shutil.rmtree(scratch, ignore_errors=True)
        raise click.UsageError(f"cannot check out {rev}: {added.stderr.strip()}")
    try:
        site = scratch / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(_SITECUSTOMIZE.format(mapping=package_mapping(tree)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), str(tree), env.get("PYTHONPATH")]))
        yield tree, env
    finally:
        subprocess.run(["git", "-C", str(REPO_ROOT), "worktree", "remove", "--force", str(tree)],
                       capture_output=True, check=False)
        shutil.rmtree(scratch, ignore_errors=True)


def imported_from(cwd: Path, env: dict[str, str] | None) -> list[str]:
    """The files the probe modules load from, as a run there would import them."""
    code = "import importlib; print('\\n'.join(importlib.import_module(m).__file__ for m in %r))" % (_PROBE,)
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise click.ClickException(f"cannot import dockercomp in {cwd}: {done.stderr.strip()[-500:]}")
    return done.stdout.split()


def bench_once(cwd: Path, env: dict[str, str] | None, args: Sequence[str]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "bench", *args, "--no-save", "--json"], cwd=cwd, env=env,
                          capture_output=True, text=True, check=False)
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        click.echo(f"the bench in {cwd} failed (exit {done.returncode}); its last output:\n"
                   f"{done.stdout[-2000:]}{done.stderr[-3000:]}\n"
                   f"run `python -m bench {' '.join(args)}` there alone to see it whole", err=True)
        raise SystemExit(EXIT_RUN_FAILED) from None


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("rev")
@click.option("--pairs", default=3, type=click.IntRange(1), help="Runs of each side, in turns.")
@click.option("--only", "phases", multiple=True, type=click.Choice(PHASES), default=("raw", "e2e", "window1"),
              help="Bench phases to run (repeatable).")
@click.option("--quick", is_flag=True, help="The bench's small sizes: a check of this tool, not a measurement.")
@click.option("--bench-args", default="", help="More options for both sides' bench, e.g. '--scale-workers 50000'.")
@click.option("--json", "as_json", is_flag=True, help="Print {figure: {rev: [...], this: [...]}} only.")
def main(rev: str, pairs: int, phases: tuple[str, ...], quick: bool, bench_args: str, as_json: bool) -> None:
    args = [arg for phase in phases for arg in ("--only", phase)] + (["--quick"] if quick else [])
    args += shlex.split(bench_args)
    console = Console(stderr=as_json)
    with old_checkout(rev) as (tree, env):
        old_files = imported_from(tree, env)
        if not all(path.startswith(str(tree)) for path in old_files):
            raise click.ClickException(f"the run of {rev} would import {old_files}, not its own files")
        console.print(f"{rev}: {', '.join(old_files)}")
        sides: dict[str, list[dict[str, float]]] = {rev: [], "this": []}
        for turn in range(1, pairs + 1):
            for side, cwd, side_env in ((rev, tree, env), ("this", REPO_ROOT, None)):
                console.print(f"pair {turn}/{pairs}: {side}")
                sides[side].append(figures(bench_once(cwd, side_env, args)))
    names = [name for name in sides["this"][0] if all(name in run for runs in sides.values() for run in runs)]
    if as_json:
        click.echo(json.dumps({name: {side: [run[name] for run in runs] for side, runs in sides.items()}
                               for name in names}, indent=2))
        return
    table = Table(title=f"this working tree vs {rev}, {pairs} pair(s) in turns (medians)")
    for column in ("figure", rev, "this", "this / " + rev, "pairs"):
        table.add_column(column, justify="left" if column in ("figure", "pairs") else "right")
    for name in names:
        old = statistics.median(run[name] for run in sides[rev])
        new = statistics.median(run[name] for run in sides["this"])
        pairs_text = ", ".join(f"{a:g}→{b:g}" for a, b in zip((r[name] for r in sides[rev]),
                                                             (r[name] for r in sides["this"])))
        table.add_row(name, f"{old:g}", f"{new:g}", f"{new / old:.2f}" if old else "—", pairs_text)
    console.print(table)


if __name__ == "__main__":
    main()
