"""The SQL store's queries for replication, trust and credit (issue 11): a mixin of
``sqlstore.SqlStore``, kept apart so that file stays one domain. Plain SQL on the tables
sqlstore.py models (attempt.value/elapsed, job.replication, quarantine)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Iterator

from dockercomp.coordinator.replication import ReplicaAttempt, VolunteerStats
from dockercomp.coordinator.store import FAILED_OUTCOMES, AttemptOutcome, Changes, TaskState

if TYPE_CHECKING:
    import peewee as pw

_OK, _OPEN = AttemptOutcome.OK.value, AttemptOutcome.OPEN.value
_INVALID, _UNVALIDATED = AttemptOutcome.INVALID.value, AttemptOutcome.UNVALIDATED.value
_FINISHED = (TaskState.DONE.value, TaskState.FAILED.value)
# Rows per IN (...) list, as sqlstore's.
_IN = 900


def _parts(items: list[Any]) -> Iterator[list[Any]]:
    for start in range(0, len(items), _IN):
        yield items[start:start + _IN]


def _in(p: str, values: Iterable[Any]) -> str:
    return ", ".join(p for _ in values)


class ReplicaQueries:
    db: "pw.Database"

    def bind(self) -> None: ...

    def _sql(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        self.bind()
        cursor = self.db.execute_sql(sql.replace("?", self.db.param), list(params))
        return list(cursor.fetchall()) if cursor.description else []

    def write_replicas(self, changes: Changes, now: float) -> None:
        """The replica part of ``apply``: values received, values found invalid."""
        p = self.db.param
        if changes.reported:
            self.db.cursor().executemany(
                f"UPDATE attempt SET outcome = {p}, value = {p}, elapsed = {p}, error = {p}, finished_at = {p} "
                f"WHERE id = {p}", [(_UNVALIDATED, value, elapsed, error, now, attempt_id)
                                    for attempt_id, value, elapsed, error in changes.reported])
        for ids in _parts(changes.invalid_attempts):
            self._sql(f"UPDATE attempt SET outcome = ?, finished_at = ? WHERE id IN ({_in('?', ids)})",
                      [_INVALID, now, *ids])

    def replica_values(self, task_ids: list[int]) -> dict[int, list[dict[str, Any]]]:
        """Every value received per task (results view)."""
        import json

        found: dict[int, list[dict[str, Any]]] = {}
        for ids in _parts(task_ids):
            rows = self._sql("SELECT a.task_id, a.number, a.outcome, a.value, w.key FROM attempt a "
                             f"JOIN worker w ON w.id = a.worker_id WHERE a.task_id IN ({_in('?', ids)}) "
                             "AND a.value IS NOT NULL ORDER BY a.task_id, a.number", ids)
            for task_id, number, outcome, value, key in rows:
                found.setdefault(task_id, []).append(
                    {"attempt": number, "worker": key, "outcome": outcome, "value": json.loads(value)})
        return found

    def replica_attempts(self, job_id: int) -> list[ReplicaAttempt]:
        rows = self._sql("SELECT t.id, t.args, t.retries_from, a.id, a.number, a.worker_id, a.outcome, a.value, "
                         "a.elapsed FROM task t JOIN attempt a ON a.task_id = t.id "
                         "WHERE t.job_id = ? AND t.state = ? ORDER BY t.id, a.number",
                         [job_id, TaskState.ASSIGNED.value])
        return [ReplicaAttempt(*row) for row in rows]

    def replica_counts(self, job_id: int) -> tuple[int, int, int]:
        [(finished,)] = self._sql("SELECT COUNT(*) FROM task WHERE job_id = ? AND state IN (?, ?)",
                                  [job_id, *_FINISHED])
        [(values,)] = self._sql("SELECT COUNT(*) FROM attempt a JOIN task t ON t.id = a.task_id "
                                "WHERE t.job_id = ? AND t.state IN (?, ?) AND (a.value IS NOT NULL OR a.outcome = ?)",
                                [job_id, *_FINISHED, _OK])
        [(waiting,)] = self._sql("SELECT COUNT(*) FROM task t WHERE t.job_id = ? AND t.state = ? AND NOT EXISTS "
                                 "(SELECT 1 FROM attempt a WHERE a.task_id = t.id AND a.outcome = ?)",
                                 [job_id, TaskState.ASSIGNED.value, _OPEN])
        return int(finished), int(values), int(waiting)

    def volunteer_stats(self) -> list[VolunteerStats]:
        tally: dict[str, list[Any]] = {name: [int(n), 0, 0, 0, 0.0] for name, n in
                                       self._sql("SELECT volunteer, COUNT(*) FROM worker GROUP BY volunteer")}
        rows = self._sql(
            "SELECT w.volunteer, "
            "SUM(CASE WHEN a.outcome = ? AND a.elapsed IS NOT NULL THEN 1 ELSE 0 END), "
            "SUM(CASE WHEN a.outcome = ? THEN 1 ELSE 0 END), "
            f"SUM(CASE WHEN a.outcome IN ({_in('?', FAILED_OUTCOMES)}) THEN 1 ELSE 0 END), "
            "SUM(CASE WHEN a.outcome = ? AND a.elapsed IS NOT NULL THEN a.elapsed ELSE 0 END) "
            "FROM attempt a JOIN worker w ON w.id = a.worker_id GROUP BY w.volunteer",
            [_OK, _INVALID, *FAILED_OUTCOMES, _OK])
        for name, validated, invalid, failed, credit in rows:
            tally[name][1:] = [int(validated or 0), int(invalid or 0), int(failed or 0), float(credit or 0.0)]
        held = {name: (reason, since) for name, reason, since in
                self._sql("SELECT volunteer, reason, since FROM quarantine")}
        for name in held:
            tally.setdefault(name, [0, 0, 0, 0, 0.0])
        stats = [VolunteerStats(name, *counts, *held.get(name, (None, None))) for name, counts in tally.items()]
        return sorted(stats, key=lambda r: (-r.credit, r.volunteer))

    def quarantines(self) -> dict[str, str]:
        return dict(self._sql("SELECT volunteer, reason FROM quarantine"))  # type: ignore[arg-type]

    def quarantine(self, volunteer: str, reason: str, now: float) -> None:
        self._sql("INSERT INTO quarantine (volunteer, reason, since) VALUES (?, ?, ?) "
                  "ON CONFLICT (volunteer) DO NOTHING RETURNING id", [volunteer, reason, now])

    def release(self, volunteer: str) -> bool:
        with self.db.atomic():
            return bool(self._sql("DELETE FROM quarantine WHERE volunteer = ? RETURNING id", [volunteer]))
