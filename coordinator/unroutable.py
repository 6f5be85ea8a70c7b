"""Jobs no worker can run: their function is offered by no online worker (a typo, or the wrong
image), so their tasks would wait forever.

`serve --fail-unroutable SECONDS` fails the pending tasks of such a job once no online worker
has offered its function for that long, each with the reason "no online worker offers 'f'"
(kept in the ``unroutable`` table: such a task failed without any attempt to hold a reason).
`retry` sends them again once a worker offers the function. `status` and the API's ``wait()``
name the problem either way (api.Client.unroutable).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from dockercomp.coordinator.store import TaskState, WorkerState

if TYPE_CHECKING:
    from dockercomp.coordinator.dispatch import JobBook, JobInfo
    from dockercomp.coordinator.registry import WorkerRegistry
    from dockercomp.coordinator.store import Store

log = logging.getLogger(__name__)

# The outcome shown in a task's errors when it failed for want of a worker (no attempt).
OUTCOME = "unroutable"

_CREATE = ("CREATE TABLE IF NOT EXISTS unroutable (task_id INTEGER PRIMARY KEY, "
           "reason TEXT NOT NULL, failed_at DOUBLE PRECISION NOT NULL)")


def reason(function: str) -> str:
    return f"no online worker offers {function!r}"


def error_entry(text: str) -> dict[str, Any]:
    """The entry of ResultRow.errors for a task failed by ``fail_pending``."""
    return {"attempt": None, "worker": None, "outcome": OUTCOME, "type": "Unroutable", "message": text}


# -- SQL (sqlstore) -------------------------------------------------------------------------
def create_table(db: Any) -> None:
    db.execute_sql(_CREATE)


def fail_pending(db: Any, job_id: int, text: str, now: float) -> int:
    """Pending tasks of the job to failed, each with ``text`` recorded; returns how many."""
    p = db.param
    pending = f"SELECT id FROM task WHERE job_id = {p} AND state = {p}"
    args = (job_id, TaskState.PENDING.value)
    db.execute_sql(f"DELETE FROM unroutable WHERE task_id IN ({pending})", args)  # an earlier round's
    db.execute_sql(f"INSERT INTO unroutable (task_id, reason, failed_at) SELECT id, {p}, {p} FROM task "
                   f"WHERE job_id = {p} AND state = {p}", (text, now, *args))
    return int(db.execute_sql(f"UPDATE task SET state = {p}, updated_at = {p} WHERE job_id = {p} AND state = {p}",
                              (TaskState.FAILED.value, now, *args)).rowcount)


def reasons(db: Any, task_ids: list[int]) -> dict[int, str]:
    """The recorded reason per task id among ``task_ids`` (at most a few hundred)."""
    if not task_ids:
        return {}
    marks = ", ".join([db.param] * len(task_ids))
    return dict(db.execute_sql(f"SELECT task_id, reason FROM unroutable WHERE task_id IN ({marks})",
                               task_ids).fetchall())


def forget_job(db: Any, job_id: int) -> None:
    db.execute_sql(f"DELETE FROM unroutable WHERE task_id IN (SELECT id FROM task WHERE job_id = {db.param})",
                   (job_id,))


# -- the engine (service.py) -----------------------------------------------------------------
_OFFERING = (WorkerState.ONLINE.value, WorkerState.PAUSED.value)


class UnroutableJobs:
    """Tells when an active job's function has been offered by no online worker for
    ``after`` seconds, and fails its pending tasks then."""

    def __init__(self, store: Store, after: float) -> None:
        self.store = store
        self.after = after
        self._since: dict[int, float] = {}  # job id -> when its function was first seen unoffered

    def check(self, jobs: JobBook, workers: WorkerRegistry, now: float) -> list[JobInfo]:
        """Fail the pending tasks of the jobs unroutable for long enough; returns those jobs."""
        # A paused worker comes back (its volunteer resumes it, the host falls idle): still offered.
        offered = {f for w in workers if w.state in _OFFERING for f in w.functions}
        failed = []
        for job in jobs.active():
            if job.function in offered or not job.counts[TaskState.PENDING.value]:
                self._since.pop(job.id, None)
                continue
            since = self._since.setdefault(job.id, now)
            if now - since < self.after:
                continue
            count = self.store.fail_pending(job.id, reason(job.function), now)
            log.warning("job %s: %s for %.0f s; %d pending task(s) failed", job.name, reason(job.function),
                        now - since, count)
            job.move(TaskState.PENDING.value, TaskState.FAILED.value, count)
            del self._since[job.id]
            failed.append(job)
        return failed
