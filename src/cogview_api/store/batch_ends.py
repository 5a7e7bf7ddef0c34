"""How a batch ends: the transaction that ends the last of its tasks ends the batch.

`batches.live` counts a batch's tasks not yet ended. Every terminal transition of a batch task
(store/tasks.py `complete_task` and `fail_task`, the batch cancel) decrements it in its own
transaction, after the task's row: the decrement takes the batch row's lock, so on PostgreSQL
two tasks ending at once are counted one after the other and exactly one transaction sees 0.
That one marks the batch COMPLETED (CANCELLED is the batch cancel's) and queues its webhook.
"""

from __future__ import annotations

from sqlalchemy import Connection, bindparam, update

from cogview_api.clock import utcnow
from cogview_api.domain import BatchEvent, BatchStatus
from cogview_api.store.tables import batches
from cogview_api.store.webhooks import enqueue_batch_delivery

_DECREMENT = (
    update(batches)
    .where(batches.c.id == bindparam("batch_id"))
    .values(live=batches.c.live - bindparam("ended"))
    .returning(batches.c.live, batches.c.status)
)


def batch_task_ended(
    conn: Connection, batch_id: str, *, ended: int = 1, status: BatchStatus | None = None
) -> bool:
    """Count `ended` of the batch's tasks as ended, in the caller's transaction. Ends the batch
    (COMPLETED, or `status`) once none is left; True if this call ended it."""
    row = conn.execute(_DECREMENT, {"batch_id": batch_id, "ended": ended}).first()
    if row is None or row.live > 0 or row.status != BatchStatus.IN_PROGRESS:
        return False
    final = status or BatchStatus.COMPLETED
    conn.execute(
        update(batches).where(batches.c.id == batch_id).values(status=final, finished_at=utcnow())
    )
    event = BatchEvent.CANCELLED if final is BatchStatus.CANCELLED else BatchEvent.COMPLETED
    enqueue_batch_delivery(conn, batch_id=batch_id, event=event)
    return True
