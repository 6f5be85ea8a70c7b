"""`python -m bench` (what `make bench` runs): options in, one library call, results out.

Human output: progress lines, tables, the JSON file's path, and as the very last line
``e2e/raw = R (E tasks/s vs B tasks/s)``. ``--json``: the results document on stdout only.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from bench import defaults
from bench.cluster import BROKERS
from bench.errors import BenchError
from bench.harness import REPO_ROOT
from bench.report import render, write_json
from bench.run import PHASES, BenchOptions, run

# Exit codes: 1 = a phase failed (its figures are missing), 2 = bad options.
EXIT_PHASE_FAILED = 1
EXIT_USAGE = 2


def _sizes(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter("give job sizes separated by commas, e.g. 10000,100000") from None
    if not sizes or any(size < 1 for size in sizes):
        raise click.BadParameter("give at least one positive job size")
    return sizes


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--tasks", default=defaults.E2E_TASKS, type=click.IntRange(1), help="Tasks in the raw and e2e runs.")
@click.option("--workers", default=defaults.WORKERS, type=click.IntRange(1), help="Raw worker processes = agents.")
@click.option("--window", default=defaults.WINDOW, type=click.IntRange(1), help="Raw requests outstanding.")
@click.option("--concurrency", default=defaults.AGENT_CONCURRENCY, type=click.IntRange(1),
              help="Tasks in flight per agent (task processes + prefetch; workers x this = tasks in flight).")
@click.option("--latency-samples", default=defaults.LATENCY_SAMPLES, type=click.IntRange(1),
              help="Round trips measured at window 1.")
@click.option("--submit-tasks", default=defaults.SUBMIT_TASKS, type=click.IntRange(1), help="Tasks in the submit test.")
@click.option("--stream-tasks", default=defaults.STREAM_TASKS, type=click.IntRange(1),
              help="Tasks streamed from a generator in the streaming-submit test.")
@click.option("--pickup-samples", default=defaults.PICKUP_SAMPLES, type=click.IntRange(1),
              help="One-task jobs per mode (nudge, poll) in the pickup test.")
@click.option("--scale-workers", default=",".join(map(str, defaults.SCALE_WORKERS)), callback=_sizes,
              help="Simulated-worker fleets, run one after the other (the first is the reference).")
@click.option("--scale-per-volunteer", default=defaults.SCALE_PER_VOLUNTEER, type=click.IntRange(1),
              help="Simulated workers per volunteer.")
@click.option("--scale-leaves", default=None, type=click.IntRange(0),
              help="Leaf brokers bridged to the coordinator's  [default: as many as the fd and port limits need]")
@click.option("--scale-processes", default=defaults.SCALE_PROCESSES, type=click.IntRange(1),
              help="Processes the simulated workers are packed into.")
@click.option("--scale-tasks", default=",".join(map(str, defaults.SCALE_TASKS)), callback=_sizes,
              help="Job sizes run through the simulated workers.")
@click.option("--scale-slice", default=defaults.SCALE_SLICE, type=click.IntRange(1),
              help="Completed tasks per cost slice inside a scale job.")
@click.option("--broker", default="mosquitto", type=click.Choice(BROKERS),
              help="The scale phase's broker: one Mosquitto, or three RabbitMQ nodes (bench/cluster.py).")
@click.option("--only", "only", multiple=True, type=click.Choice(PHASES), help="Run only these phases (repeatable).")
@click.option("--skip", "skip", multiple=True, type=click.Choice(PHASES), help="Skip these phases (repeatable).")
@click.option("--rounds", default=defaults.E2E_ROUNDS, type=click.IntRange(1),
              help="E2e and window-1 jobs, each followed by a raw run; their ratios to raw are the median "
              "round's.")
@click.option("--quick", is_flag=True, help="Small sizes everywhere (~1 minute): a check, not a measurement.")
@click.option("--profile", is_flag=True, help="Sample the coordinator and one agent with py-spy during the e2e "
              "and window-1 runs (slows them: its figures are not comparable).")
@click.option("--out", "out", default=str(REPO_ROOT / defaults.RESULTS_DIR), type=click.Path(file_okay=False),
              help="Directory for the results JSON.")
@click.option("--no-save", is_flag=True, help="Do not write a results file.")
@click.option("--keep", is_flag=True, help="Keep the work directory (logs, databases).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout, nothing else.")
def main(tasks: int, workers: int, window: int, concurrency: int, latency_samples: int, submit_tasks: int,
         stream_tasks: int, pickup_samples: int, scale_workers: tuple[int, ...], scale_per_volunteer: int,
         scale_leaves: int | None, broker: str, scale_processes: int, scale_tasks: tuple[int, ...], scale_slice: int,
         only: tuple[str, ...], skip: tuple[str, ...], rounds: int, quick: bool, profile: bool, out: str, no_save: bool,
         keep: bool, as_json: bool) -> None:
    """Measure dockercomp end to end against the raw paho + Mosquitto round trip (issue 6)."""
    if quick:
        tasks, latency_samples, submit_tasks = min(tasks, 2_000), min(latency_samples, 200), min(submit_tasks, 10_000)
        stream_tasks, pickup_samples = min(stream_tasks, 100_000), min(pickup_samples, 10)
        scale_workers, scale_tasks, scale_slice = (min(scale_workers[0], 100),), (1_000, 5_000), 1_000
        rounds = 1
    phases = tuple(p for p in (only or PHASES) if p not in skip)
    options = BenchOptions(tasks=tasks, workers=workers, window=window, concurrency=concurrency,
                           latency_samples=latency_samples, submit_tasks=submit_tasks, stream_tasks=stream_tasks,
                           pickup_samples=pickup_samples, scale_workers=scale_workers,
                           scale_per_volunteer=scale_per_volunteer, scale_leaves=scale_leaves, broker=broker,
                           scale_processes=scale_processes, scale_tasks=scale_tasks,
                           scale_slice=scale_slice, phases=phases, rounds=rounds, profile=profile, keep=keep)
    # Wide enough for the tables when the output is a file or a pipe (rich assumes 80 there).
    console = Console(stderr=as_json, highlight=False, width=None if sys.stdout.isatty() else 120)
    try:
        results = run(options, say=console.print)
    except BenchError as exc:
        console.print(f"[red]error:[/] {exc}")
        sys.exit(EXIT_USAGE)
    if not no_save:
        path = write_json(results, Path(out), _started(results))
        results_file = str(path)
    else:
        results_file = None
    if as_json:
        click.echo(json.dumps(results))
    else:
        render(results, console)
        if results_file:
            console.print(f"results: {results_file}")
        if results.get("cpu_ratio"):
            console.print(f"CPU per task: the raw round trip uses {results['cpu_ratio']:.2f} of what dockercomp "
                          "uses (all processes); the throughput ratio when both are CPU-bound")
        for name, error in (results.get("errors") or {}).items():
            console.print(f"[red]{name} failed:[/] {error.splitlines()[0]}")
        click.echo(results["summary"])
    if results.get("errors"):
        sys.exit(EXIT_PHASE_FAILED)


def _started(results: dict[str, Any]) -> dt.datetime:
    return dt.datetime.fromisoformat(results["started"])
