"""How jobs, workers and results look to people (rich tables) and to scripts (JSON, CSV).

Pure functions from the store's dataclasses to renderables or plain dicts, so the CLI stays
a thin layer and the same shapes serve ``--json``, ``results --format`` and the API.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from rich import box
from rich.console import Group, RenderableType
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from dockercomp.coordinator.store import AttemptRow, JobProgress, ResultRow

if TYPE_CHECKING:
    from dockercomp.broker.accounts import Account
    from dockercomp.broker.settings import BrokerSettings
    from dockercomp.coordinator.api import WorkerInfo

# Characters of a value or argument list shown in a table cell before it is cut.
CELL_CHARS = 40

# Width a table may take when written to a pipe or file, or with --wide: wider than any real
# row, so no column is cut (rich would otherwise assume 80 columns when it sees no terminal).
WIDE_COLUMNS = 10_000

# Colour of each task/job/worker state in tables.
STATE_STYLES = {
    "pending": "yellow", "assigned": "cyan", "done": "green", "failed": "red", "ok": "green",
    "cancelled": "magenta", "active": "cyan", "online": "green", "lost": "red",
    "offline": "dim", "purged": "dim", "draining": "yellow", "paused": "yellow",
}  # fmt: skip

# Columns of `dockercomp coordinator results --format csv`, in order (JSON-valued ones as JSON text).
CSV_COLUMNS = ["index", "task_id", "state", "worker", "attempts", "elapsed", "args", "value", "errors"]


# -------------------------------------------------------------------------- plain data
def progress_dict(progress: JobProgress) -> dict[str, Any]:
    """A job's progress for --json: every JobProgress field plus derived ones."""
    data = asdict(progress)
    data["finished"] = progress.finished
    data["queued"] = progress.queued
    data["percent"] = round(_fraction(progress) * 100.0, 1)
    return data


def _fraction(progress: JobProgress) -> float:
    """Share of the tasks computed (done or failed): a cancelled task was not, so a cancelled
    job never shows 100 %."""
    return (progress.done + progress.failed) / progress.total if progress.total else 1.0


def worker_dict(worker: WorkerInfo) -> dict[str, Any]:
    """A worker for --json; ``running`` and ``queued`` split what it holds (in_flight)."""
    data = asdict(worker)
    data["running"] = min(worker.in_flight, worker.capacity)
    data["queued"] = worker.in_flight - data["running"]
    return data


def row_dict(row: ResultRow) -> dict[str, Any]:
    """One task's outcome as written by `results --format jsonl` (and `--json`)."""
    return {
        "index": row.index, "task_id": row.task_id, "args": row.args, "state": row.state,
        "value": row.value, "worker": row.worker, "attempts": row.attempts,
        "elapsed": row.elapsed, "errors": row.errors,
        **({"replicas": row.replicas} if row.replicas else {}),
    }  # fmt: skip


def dumps(data: Any) -> str:
    """Compact JSON, one line (for --json output and JSON lines files)."""
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def write_json(rows: Iterable[ResultRow], out: IO[str]) -> int:
    """One JSON document: an array of the rows as `results --format jsonl` writes them, streamed."""
    count = 0
    out.write("[")
    for row in rows:
        out.write(("," if count else "") + "\n" + dumps(row_dict(row)))
        count += 1
    out.write("\n]\n")
    return count


def write_jsonl(rows: Iterable[ResultRow], out: IO[str]) -> int:
    count = 0
    for row in rows:
        out.write(dumps(row_dict(row)) + "\n")
        count += 1
    return count


def write_csv(rows: Iterable[ResultRow], out: IO[str]) -> int:
    """CSV with a header; args, value and errors hold JSON text, empty when missing."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    count = 0
    for row in rows:
        data = row_dict(row)
        writer.writerow([
            data["index"], data["task_id"], data["state"], data["worker"] or "", data["attempts"],
            "" if data["elapsed"] is None else f"{data['elapsed']:.6f}",
            dumps(data["args"]),
            "" if row.state != "done" else dumps(data["value"]),
            dumps(data["errors"]) if data["errors"] else "",
        ])  # fmt: skip
        count += 1
    return count


# -------------------------------------------------------------------------- formatting
def ago(timestamp: float | None, now: float) -> str:
    """``12s ago``, ``3m ago``, ``2h ago``, ``4d ago``; ``-`` for never."""
    if timestamp is None or timestamp <= 0:
        return "-"
    return f"{duration(max(0.0, now - timestamp))} ago"


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def cut(text: str, limit: int = CELL_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def state_text(state: str) -> Text:
    return Text(state, style=STATE_STYLES.get(state, ""))


def _percent(progress: JobProgress) -> str:
    return f"{100.0 * _fraction(progress):.0f}%"


def _computed(progress: JobProgress) -> int:
    return progress.done + progress.failed


# -------------------------------------------------------------------------- tables
def _table(title: str) -> Table:
    """A compact table (no vertical rules, one space between columns): fits 80 columns."""
    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1),
                 collapse_padding=True, pad_edge=False)


def text_bar(done: int, total: int, width: int = 20) -> Text:
    """A progress bar made of characters: readable in a terminal, a pipe or a log file."""
    filled = width if total <= 0 else min(width, round(width * done / total))
    return Text.assemble(("█" * filled, "green"), ("░" * (width - filled), "dim"))


def jobs_table(progresses: list[JobProgress], now: float | None = None) -> Table:
    now = time.time() if now is None else now
    table = _table("Jobs")
    table.add_column("id", justify="right")
    table.add_column("name", no_wrap=True)
    table.add_column("function", overflow="ellipsis", min_width=8, max_width=20)
    table.add_column("state", no_wrap=True)
    table.add_column("progress", no_wrap=True)
    for name in ("failed", "running", "queued", "pending"):
        table.add_column(name, justify="right", min_width=len(name))
    table.add_column("age", justify="right", no_wrap=True)
    for p in progresses:
        table.add_row(
            str(p.job_id), p.name, p.function, state_text(p.state),
            Text.assemble(text_bar(_computed(p), p.total, 6), f" {_computed(p)}/{p.total} {_percent(p)}"),
            Text(str(p.failed), style="red" if p.failed else ""), str(p.running), str(p.queued), str(p.pending),
            duration(max(0.0, now - p.created_at)),
        )  # fmt: skip
    return table


def job_view(progress: JobProgress, now: float | None = None, stalled: str = "") -> RenderableType:
    """One job: a title line, a progress bar, the counts per state, and why it is stalled."""
    now = time.time() if now is None else now
    p = progress
    title = Text.assemble(
        ("Job ", "bold"), (p.name, "bold cyan"), f" (id {p.job_id}) · {p.function} · ", state_text(p.state)
    )
    bar = Text.assemble(text_bar(_computed(p), p.total, 40), f" {_computed(p)}/{p.total} {_percent(p)}")
    counts = Text.assemble(
        ("done ", "green"), str(p.done), " · ", ("failed ", "red"), str(p.failed), " · ",
        ("running ", "cyan"), str(p.running), " · ", ("queued ", "cyan"), str(p.queued), " · ",
        ("pending ", "yellow"), str(p.pending), " · ", ("cancelled ", "magenta"), str(p.cancelled),
    )  # fmt: skip
    if p.replication is not None or p.waiting:
        factor = f"{p.replication:.2f} values per finished task" if p.replication is not None else "no task finished"
        waiting = f" · {p.waiting} task(s) wait for another volunteer to come online" if p.waiting else ""
        counts.append(f"\nreplication: {factor}{waiting}")
    ended = p.finished_at if p.finished_at else now
    timing = Text(f"created {ago(p.created_at, now)}, "
                  + (f"finished in {duration(ended - p.created_at)}" if p.finished_at
                     else f"running for {duration(ended - p.created_at)}"), style="dim")  # fmt: skip
    lines: list[RenderableType] = [title, bar, counts, timing]
    if p.failed and p.finished >= p.total:
        lines.append(Text(f"{p.failed} task(s) failed: `dockercomp coordinator results {p.name} --errors` lists "
                          f"them, `dockercomp coordinator show {p.name} INDEX` shows their tracebacks.", style="red"))
    if stalled and p.finished < p.total:
        lines.append(Text(f"Stalled: {stalled.rstrip('.')}.", style="yellow"))
    return Group(*lines)


def workers_table(workers: list[WorkerInfo], now: float | None = None, live: bool = True) -> Table:
    """``live``: the coordinator runs and hears its broker; otherwise the states are the last
    known ones, and the title and the "last seen" column say so."""
    now = time.time() if now is None else now
    table = _table("Workers" if live else "Workers (last known: the coordinator is not watching them)")
    table.add_column("worker", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("host", overflow="ellipsis", max_width=24)
    for name in ("capacity", "prefetch", "running", "queued", "done", "failed"):
        table.add_column(name, justify="right", min_width=len(name))
    table.add_column("last seen", justify="right", no_wrap=True)
    for w in workers:
        running = min(w.in_flight, w.capacity)  # the agent runs the first `capacity` it holds
        table.add_row(
            w.key, Text("quarantined", style="red") if w.quarantined
            else state_text(w.state if live or w.state not in _CONNECTED else f"{w.state}?"), cut(w.host, 30),
            str(w.capacity), str(w.prefetch), str(running), str(w.in_flight - running),
            str(w.tasks_done), Text(str(w.tasks_failed), style="red" if w.tasks_failed else ""),
            _seen(w, now, live),
        )  # fmt: skip
    held = sorted({(w.volunteer, w.quarantined) for w in workers if w.quarantined})
    if held:
        table.caption = "\n".join(f"{volunteer} quarantined: {reason}" for volunteer, reason in held)
    return table


# Worker states of a connected worker: with no coordinator watching, only "last known".
_CONNECTED = ("online", "draining")


def _seen(worker: WorkerInfo, now: float, live: bool = True) -> str:
    """An online worker is connected now (as far as a running coordinator knows); the others
    were last heard of when they left."""
    if worker.state in _CONNECTED:
        return "now" if live else f"{ago(worker.last_seen, now)} (last known)"
    return ago(worker.purged_at or worker.lost_at or worker.last_seen, now)


def _error_summary(row: ResultRow) -> str:
    if not row.errors:
        return ""
    last = row.errors[-1]
    kind = last.get("type") or last.get("outcome") or "error"
    message = str(last.get("message") or "").splitlines()[0] if last.get("message") else ""
    more = f" (+{len(row.errors) - 1} earlier)" if len(row.errors) > 1 else ""
    return cut(f"{kind}: {message}".rstrip(": "), CELL_CHARS) + more


def _replica_summary(row: ResultRow) -> str:
    """Replicated tasks: how many values agreed, e.g. " (2/3 agree)"."""
    if not row.replicas:
        return ""
    agreed = sum(1 for r in row.replicas if r["outcome"] == "ok")
    return f" ({agreed}/{len(row.replicas)} agree)"
def attempts_view(job: str, row: ResultRow, attempts: list[AttemptRow], now: float | None = None) -> RenderableType:
    """`show JOB TASK`: the task, then each attempt with its error and traceback."""
    now = time.time() if now is None else now
    head = Text.assemble(("Task ", "bold"), (f"#{row.index}", "bold cyan"), f" of job {job} · args {cut(dumps(row.args))} · ",
                         state_text(row.state),
                         f" · value {cut(dumps(row.value))}" if row.state == "done" else "")  # fmt: skip
    parts: list[RenderableType] = [head]
    if not attempts:
        parts.append(Text("Never sent to a worker.", style="dim"))
    for error in row.errors:
        if error.get("attempt") is None:  # failed without an attempt (unroutable.py)
            parts.append(Text(f"  {error.get('type')}: {error.get('message')}", style="red"))
    for attempt in attempts:
        took = f", took {duration(attempt.finished_at - attempt.sent_at)}" if attempt.finished_at else ""
        parts.append(Text.assemble(f"attempt {attempt.number} on {attempt.worker}: ", state_text(attempt.outcome),
                                   (f" (sent {ago(attempt.sent_at, now)}{took})", "dim")))  # fmt: skip
        if attempt.error:
            kind, message = attempt.error.get("type") or attempt.outcome, attempt.error.get("message") or ""
            parts.append(Text(f"  {kind}: {message}".rstrip(": "), style="red"))
            if attempt.error.get("traceback"):
                parts.append(Text("  " + str(attempt.error["traceback"]).rstrip().replace("\n", "\n  "), style="dim"))
    return Group(*parts)


def attempt_dict(attempt: AttemptRow) -> dict[str, Any]:
    return asdict(attempt)


def results_table(rows: list[ResultRow], title: str) -> Table:
    table = _table(title)
    for name, justify in (("#", "right"), ("args", "left"), ("state", "left"), ("value", "left"),
                          ("worker", "left"), ("attempts", "right"), ("elapsed", "right"),
                          ("errors", "left")):  # fmt: skip
        table.add_column(name, justify=justify, overflow="fold" if name == "errors" else "ellipsis")  # type: ignore[arg-type]
    for row in rows:
        table.add_row(
            str(row.index), cut(dumps(row.args)), state_text(row.state),
            cut(dumps(row.value)) if row.state == "done" else "", (row.worker or "") + _replica_summary(row),
            str(row.attempts), "" if row.elapsed is None else f"{row.elapsed:.3f}s",
            _error_summary(row),
        )  # fmt: skip
    return table


# -------------------------------------------------------------------------- progress bars
@contextmanager
def job_progress_bar(name: str, total: int, console: Any = None) -> Iterator[Callable[[JobProgress], None]]:
    """A live bar for one job; yields ``update(progress)``."""
    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TaskProgressColumn(), TextColumn("{task.fields[failed]}", style="red"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console,
    )  # fmt: skip
    task = bar.add_task(name, total=max(total, 1), failed="")

    def update(progress: JobProgress) -> None:
        failed = f"{progress.failed} failed" if progress.failed else ""
        bar.update(task, completed=progress.finished, total=max(progress.total, 1), failed=failed)

    with bar:
        yield update


@contextmanager
def count_progress_bar(
    description: str, total: int, console: Any = None, enabled: bool = True
) -> Iterator[Callable[[int], None]]:
    """A bar counting up to ``total`` (bytes read, tasks stored); yields ``advance_to(n)``.
    Disabled (a no-op) when ``enabled`` is false, e.g. for small inputs or non-terminals."""
    if not enabled:
        yield lambda _n: None
        return
    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeRemainingColumn(),
        console=console, transient=True,
    )  # fmt: skip
    task = bar.add_task(description, total=max(total, 1))
    with bar:
        yield lambda n: bar.update(task, completed=n)


# ------------------------------------------------------------------------- files and lines
def write_atomically(path: Path, write: Callable[[IO[str]], int]) -> int:
    """Writes via a temporary file renamed into place: no half-written results file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or Path("."))
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as out:
            count = write(out)
        os.replace(tmp, path)
        return count
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def workers_line(workers: list[WorkerInfo], unfinished: bool, live: bool = True) -> str:
    """The line under `status`'s jobs table; says how to start a worker when none is online."""
    online = sum(1 for w in workers if w.state == "online")
    lost = sum(1 for w in workers if w.state == "lost")
    known = "" if live else " as last known"
    line = f"Workers{known}: {online} online, {lost} lost (`dockercomp coordinator workers` for details)."
    held = sorted({(w.volunteer, w.quarantined) for w in workers if w.quarantined})
    for volunteer, reason in held:
        line += (f"\nVolunteer {volunteer} is quarantined (no new work): {reason}; "
                 f"`dockercomp coordinator volunteers release {volunteer}` lifts it.")
    if unfinished and online == 0:
        line += ("\nNo worker is online: start one with `dockercomp agent run --broker URL` "
                 "(and `dockercomp coordinator serve`).")
    return line


def clear_presence_commands(broker: BrokerSettings, topics: list[str]) -> str:
    """The mosquitto_pub lines that clear retained presences by hand (`purge` with no broker)."""
    return "\n".join(f"  mosquitto_pub -h {broker.host} -p {broker.port} -r -n -t {topic}" for topic in topics)


def accounts_table(accounts: list[Account], where: str) -> Table:
    """`dockercomp coordinator volunteers list`: every broker account and its role."""
    table = Table("account", "role", "created", title=f"{len(accounts)} broker accounts in {where}")
    for account in accounts:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(account.created)) if account.created else "-"
        table.add_row(account.name, account.role.value, created)
    return table
