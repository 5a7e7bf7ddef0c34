"""A batch's progress: the engine's per-task step calls folded into one write per step.

The engine calls its progress function once per task per denoising step. Writing each call
on its own made a batch of 4 at 50 steps 200 write transactions, each taking SQLite's one
writer lock that submits need. Here the calls of one step gather until every task still
running has reported (tasks of one batch step together), or until a task reports again (an
engine that runs the batch's tasks one after another), and go out as one fenced write
(`task_store.record_progress`) that also says which tasks this worker no longer holds:
cancelled, or their lease went to another worker. A task learns that at its next call, at
most one step late.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from cogview_api.domain import Stage
from cogview_api.errors import CogviewError
from cogview_api.store import tasks as task_store
from cogview_api.store.db import Database

log = logging.getLogger(__name__)


class BatchProgress:
    """The progress of one batch's tasks; `report` is called from the engine's thread only."""

    def __init__(
        self,
        *,
        db: Database,
        worker_id: str,
        task_ids: Iterable[str],
        on_changed: Callable[[str], None],
    ) -> None:
        self.db = db
        self.worker_id = worker_id
        self.on_changed = on_changed
        self._live = set(task_ids)
        self._stopped: set[str] = set()
        self._pending: dict[str, tuple[Stage, int | None]] = {}
        self.writes = 0  # write transactions made, for tests and the bench

    def report(self, task_id: str, stage: Stage, step: int | None) -> bool:
        """Record a step; False when the task is no longer this worker's to run."""
        if task_id in self._pending:  # a new step began before every task reported
            self.flush()
        self._pending[task_id] = (stage, step)
        if self._live <= self._pending.keys():
            self.flush()
        return task_id not in self._stopped

    def flush(self) -> None:
        """Write what has gathered, in one transaction."""
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        try:
            with self.db.write() as conn:
                held = task_store.record_progress(conn, worker_id=self.worker_id, progress=pending)
        except CogviewError as exc:  # a missed progress write is no reason to stop the tasks
            log.warning("progress of tasks %s not recorded: %s", sorted(pending), exc.message)
            return
        finally:
            self.writes += 1
        gone = pending.keys() - held
        self._stopped |= gone
        self._live -= gone
        for task_id in held:
            self.on_changed(task_id)

    @property
    def stopped(self) -> frozenset[str]:
        """The tasks found no longer held."""
        return frozenset(self._stopped)
