"""`python -m bench.compare REV`: the old side really runs the old code.

With an editable install, a worktree of REV first on PYTHONPATH still imports this checkout's
``coordinator/``, ``agent/`` and ``broker/`` (the install's finder maps them): a comparison made
that way compares the code with itself. These tests pin the tool's own finder, then run it once
on a tiny size (a check of the tool, not a measurement).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.compare import _SITECUSTOMIZE, figures, package_mapping
from tests.support import REPO_ROOT, require
from tests.support.brokers import find_mosquitto


def _fake_checkout(root: Path) -> Path:
    """A checkout whose setup.cfg maps the roles like ours, with a coordinator that says so."""
    tree = root / "tree"
    for package, folder in (("dockercomp", "dockercomp"), ("dockercomp.coordinator", "coordinator")):
        (tree / folder).mkdir(parents=True)
        (tree / folder / "__init__.py").write_text("")
    (tree / "coordinator" / "service.py").write_text("WHICH = 'the old checkout'\n")
    (tree / "setup.cfg").write_text("[options]\npackage_dir =\n    dockercomp = dockercomp\n"
                                    "    dockercomp.coordinator = coordinator\n")
    return tree


def _which_service(tree: Path, site: Path | None) -> str:
    path = [str(site)] if site is not None else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*path, str(tree)])}
    done = subprocess.run([sys.executable, "-c", "import dockercomp.coordinator.service as s; print(s.__file__)"],
                          cwd=tree, env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_the_old_checkout_is_imported_through_its_own_finder(tmp_path: Path) -> None:
    tree = _fake_checkout(tmp_path)
    assert package_mapping(tree) == {"dockercomp": str(tree / "dockercomp"),
                                     "dockercomp.coordinator": str(tree / "coordinator")}
    # The trap: first on PYTHONPATH alone, the installed (this) checkout's coordinator is imported.
    assert not _which_service(tree, None).startswith(str(tree))

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE.format(mapping=package_mapping(tree)))

    assert _which_service(tree, site) == str(tree / "coordinator" / "service.py")


def test_figures_pick_the_comparable_numbers() -> None:
    results = {"ratio": 1.3, "e2e": [{"key": "e2e-window1", "tasks_per_s": 600.0,
                                      "latency": {"p50_ms": 1.5, "p99_ms": 3.0},
                                      "cpu_ms_per_task": {"coordinator": 0.9}}],
               "peer": {"tasks_per_s": 0}, "replicas": {"ratio": 0.95}}

    assert figures(results) == {"e2e-window1 tasks/s": 600.0, "e2e-window1 p50 ms": 1.5, "e2e-window1 p99 ms": 3.0,
                                "e2e-window1 CPU ms/task, coordinator": 0.9, "e2e/raw": 1.3, "replicas ratio": 0.95}


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_tiny_comparison_with_head_runs_both_sides(tmp_path: Path) -> None:
    require(find_mosquitto(), "the mosquitto binary", "apt-get install mosquitto (or run `make system`)")
    require((REPO_ROOT / ".git").exists() or None, "a git checkout", "run the tests from a clone")

    done = subprocess.run([sys.executable, "-m", "bench.compare", "HEAD", "--pairs", "1", "--only", "window1",
                           "--quick", "--json"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=170)

    assert done.returncode == 0, f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    compared = json.loads(done.stdout)
    assert set(compared["e2e-window1 p50 ms"]) == {"HEAD", "this"}
    assert all(len(values) == 1 and values[0] > 0 for values in compared["e2e-window1 p50 ms"].values())
    # The old side said where its code came from: the worktree, then removed.
    probe = [line for line in done.stderr.splitlines() if "dockercomp-compare-" in line]
    assert probe and "/tree/" in probe[0]
    worktrees = subprocess.run(["git", "-C", str(REPO_ROOT), "worktree", "list"], capture_output=True, text=True)
    assert "dockercomp-compare-" not in worktrees.stdout
