"""What the metrics read from the database: the queue, the workers, the webhook backlog."""

from __future__ import annotations

from cogview_api.config import Settings
from cogview_api.metrics import QueueSnapshot
from cogview_api.store import queue
from cogview_api.store import tasks as task_store
from cogview_api.store import webhooks as delivery_store
from cogview_api.store.db import Database


def queue_snapshot(db: Database, settings: Settings) -> QueueSnapshot:
    """Four counts in one read transaction, each a counter or an index range. Raises
    ServiceUnavailable when the database cannot answer."""
    with db.read() as conn:
        return QueueSnapshot(
            waiting=task_store.waiting_tasks(conn),
            running=task_store.running_tasks(conn),
            # The same window as /readyz (services/health.py).
            live_workers=queue.ready_workers(
                conn, within_seconds=max(30.0, 3 * settings.lease_seconds)
            ),
            webhooks_pending=delivery_store.pending_deliveries(conn),
        )
