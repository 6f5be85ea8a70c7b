"""A database error in the engine's batched writes is one of the store's ``failures``, as in
every other store call: the engine rolls the step back and reloads (service.py) instead of its
thread dying on a driver exception nobody catches. A SQLite file (no server), made to refuse
the write by a trigger."""

from __future__ import annotations

from pathlib import Path

import pytest

from dockercomp.coordinator.store import AttemptOutcome, Changes, Store, TaskState


@pytest.mark.parametrize("closing", ["failed", "released", "accepted"])
def test_a_refused_write_of_a_step_is_a_store_failure(tmp_path: Path, closing: str) -> None:
    store = Store.open(str(tmp_path / "c.db"))
    job = store.create_job("add", [[1, 2]])
    [task_id] = store.task_ids(job.id, ["pending"])
    worker = store.add_worker("local/w1", "local", "w1", 1.0, capacity=1, functions=["add"])
    with store.transaction():
        attempt_id = store.open_attempts([(task_id, 1, worker.id, 1e10, "n" * 22)], 1.0)[task_id]
        store.pending_tasks(job.id, 10)  # reads go the same way
    store.db.execute_sql("CREATE TRIGGER refuse BEFORE UPDATE ON attempt "
                         "BEGIN SELECT RAISE(ABORT, 'the disk says no'); END")
    changes = Changes()
    if closing == "failed":  # written with executemany
        changes.close(attempt_id, AttemptOutcome.ERROR, '{"type": "ValueError"}', worker.id)
        changes.set_task(task_id, TaskState.PENDING)
    elif closing == "released":
        changes.close(attempt_id, AttemptOutcome.RELEASED, None, None)
        changes.uncharge(task_id)
    else:
        changes.accept(task_id, attempt_id, worker.id, "3", 0.1, 2.0)

    with pytest.raises(store.failures), store.transaction():
        store.apply(changes, 2.0)

    # Rolled back: the attempt is still open, the task still assigned.
    [lease] = store.open_leases()
    assert lease.attempt_id == attempt_id and store.task_counts(job.id)["assigned"] == 1
