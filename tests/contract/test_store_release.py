"""The store contract for a released attempt (issue 10, item 1): closed without using the
task's attempt budget, over every store (the ``store`` fixture of test_store.py)."""

from __future__ import annotations

import time

from dockercomp.coordinator.store import AttemptOutcome, Changes, Store, TaskState, dump_json
from tests.contract.test_store import add_worker, send, store, task_ids  # noqa: F401 - `store` is a fixture


def test_a_released_attempt_leaves_the_budget_as_it_was(store: Store) -> None:  # noqa: F811
    job = store.create_job("add", [[1, 2]], max_attempts=1)
    worker = add_worker(store, "local/w1")
    [task] = task_ids(store, job)
    first = send(store, task, 1, worker)
    changes = Changes()
    changes.close(first, AttemptOutcome.RELEASED, dump_json({"type": "Shutdown", "message": "drained"}), None)
    changes.uncharge(task)
    changes.set_task(task, TaskState.PENDING)
    store.apply(changes, time.time())

    assert not changes
    [(task_id, _, attempts, retries_from)] = store.pending_tasks(job.id, 10)
    # The next attempt is number 2, and number 2 - retries_from 1 = the first of its budget.
    assert (task_id, attempts, retries_from) == (task, 1, 1)
    assert store.find_attempt(task, 1).outcome == "released"  # type: ignore[union-attr]
    assert [w.tasks_failed for w in store.workers()] == [0]
    [row] = store.results(job)
    assert row.errors == []  # not a failure of the task
