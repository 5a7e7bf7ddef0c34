"""Webhook deliveries: written when a task settles, then claimed and recorded by dispatchers.

`enqueue_delivery` runs inside the transaction that settles the task, so a settled task with a
callback_url always has its delivery row, whatever crashes afterwards. Dispatchers (any number,
in any process) take due rows with `claim_due`, which pushes their due time a lease ahead in
the same short transaction (PostgreSQL: `FOR UPDATE SKIP LOCKED`; SQLite: `BEGIN IMMEDIATE`),
POST them outside any transaction, and write the outcome with `record_attempt`. A dispatcher that
dies mid-POST leaves the row due again when its lease lapses: delivery is at least once, and the
receiver de-duplicates on the webhook-id.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, func, insert, select, update

from cogview_api.clock import utcnow
from cogview_api.domain import (
    BatchEvent,
    DeliveryState,
    TaskState,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEvent,
)
from cogview_api.signing import new_message_id
from cogview_api.store.tables import (
    api_keys,
    batches,
    tasks,
    webhook_attempts,
    webhook_deliveries,
)

_d = webhook_deliveries


@dataclass(frozen=True)
class DueDelivery:
    """A claimed delivery: what one attempt needs."""

    id: str
    task_id: str | None  # None for a batch's webhook
    url: str
    body: str | None  # None until the first attempt fixes it
    number: int  # this attempt's number, from 1
    secret: str  # the key's current signing secret
    batch_id: str | None = None  # a batch's webhook (batch.completed, batch.cancelled)
    event: str = ""  # the delivery's event


def enqueue_delivery(conn: Connection, *, task_id: str) -> None:
    """Queue the webhook of a task that has just settled, if it asked for one."""
    row = conn.execute(
        select(tasks.c.key_id, tasks.c.callback_url, tasks.c.state).where(tasks.c.id == task_id)
    ).first()
    if row is None or row.callback_url is None:
        return
    now = utcnow()
    conn.execute(
        insert(_d).values(
            id=new_message_id(),
            task_id=task_id,
            key_id=row.key_id,
            url=row.callback_url,
            event=WebhookEvent.of(TaskState(row.state)),
            body=None,
            state=DeliveryState.PENDING,
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
    )


def enqueue_batch_delivery(conn: Connection, *, batch_id: str, event: BatchEvent) -> None:
    """Queue the webhook of a batch that has just ended, if it asked for one."""
    row = conn.execute(
        select(batches.c.key_id, batches.c.callback_url).where(batches.c.id == batch_id)
    ).first()
    if row is None or row.callback_url is None:
        return
    now = utcnow()
    conn.execute(
        insert(_d).values(
            id=new_message_id(),
            task_id=None,
            batch_id=batch_id,
            key_id=row.key_id,
            url=row.callback_url,
            event=event,
            body=None,
            state=DeliveryState.PENDING,
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
    )


def pending_deliveries(conn: Connection) -> int:
    """Deliveries neither delivered nor given up (an index range: ix_webhook_deliveries_due)."""
    return int(
        conn.execute(
            select(func.count()).select_from(_d).where(_d.c.state == DeliveryState.PENDING)
        ).scalar_one()
    )


def any_due(conn: Connection, *, now: datetime | None = None) -> bool:
    """A read-only look, so an idle dispatcher does not take SQLite's write lock every poll."""
    due = conn.execute(
        select(_d.c.id)
        .where(_d.c.state == DeliveryState.PENDING, _d.c.next_attempt_at <= (now or utcnow()))
        .limit(1)
    ).first()
    return due is not None


def claim_due(
    conn: Connection, *, limit: int, lease_seconds: float, now: datetime | None = None
) -> list[DueDelivery]:
    """Take up to `limit` due deliveries for one attempt each, oldest due first.

    Each is due again `lease_seconds` from now unless `record_attempt` says otherwise first.
    """
    now = now or utcnow()
    rows = conn.execute(
        select(
            _d.c.id,
            _d.c.task_id,
            _d.c.batch_id,
            _d.c.event,
            _d.c.url,
            _d.c.body,
            _d.c.attempts,
            api_keys.c.webhook_secret,
        )
        .select_from(_d.join(api_keys, api_keys.c.id == _d.c.key_id))
        .where(_d.c.state == DeliveryState.PENDING, _d.c.next_attempt_at <= now)
        .order_by(_d.c.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True, of=_d)
    ).all()
    if not rows:
        return []
    conn.execute(
        update(_d)
        .where(_d.c.id.in_([r.id for r in rows]))
        .values(attempts=_d.c.attempts + 1, next_attempt_at=now + timedelta(seconds=lease_seconds))
    )
    return [
        DueDelivery(
            id=r.id,
            task_id=r.task_id,
            url=r.url,
            body=r.body,
            number=r.attempts + 1,
            secret=r.webhook_secret,
            batch_id=r.batch_id,
            event=r.event,
        )
        for r in rows
    ]


def fix_body(conn: Connection, *, delivery_id: str, body: str) -> None:
    """Store the payload of the first attempt; every retry sends (and signs) the same bytes."""
    conn.execute(update(_d).where(_d.c.id == delivery_id, _d.c.body.is_(None)).values(body=body))


def record_attempt(
    conn: Connection,
    *,
    delivery: DueDelivery,
    status_code: int | None,
    error: str | None,
    retry_delays: Sequence[float],
    now: datetime | None = None,
) -> DeliveryState:
    """Record one attempt and decide what comes next; returns the delivery's state.

    A 2xx answer delivers it; anything else is retried after `retry_delays[number - 1]`
    seconds, and after the last delay's attempt the delivery gives up (FAILED). Only the
    dispatcher holding the current claim moves the state: one whose lease lapsed mid-POST
    still records its attempt, but leaves the schedule to whoever claimed it next.
    """
    now = now or utcnow()
    conn.execute(
        insert(webhook_attempts).values(
            delivery_id=delivery.id,
            number=delivery.number,
            attempted_at=now,
            status_code=status_code,
            error=error,
        )
    )
    if status_code is not None and 200 <= status_code < 300:
        values: dict[str, object] = {"state": DeliveryState.DELIVERED, "next_attempt_at": None}
    elif delivery.number > len(retry_delays):
        values = {"state": DeliveryState.FAILED, "next_attempt_at": None}
    else:
        values = {"next_attempt_at": now + timedelta(seconds=retry_delays[delivery.number - 1])}
    if "state" in values:
        values["finished_at"] = now
    conn.execute(
        update(_d)
        .where(
            _d.c.id == delivery.id,
            _d.c.state == DeliveryState.PENDING,
            _d.c.attempts == delivery.number,
        )
        .values(**values)
    )
    state = conn.execute(select(_d.c.state).where(_d.c.id == delivery.id)).scalar_one()
    return DeliveryState(state)


def deliveries_of(conn: Connection, task_ids: Sequence[str]) -> dict[str, WebhookDelivery]:
    """The webhook delivery of each task that has one, with its attempts in order."""
    if not task_ids:
        return {}
    rows = conn.execute(select(_d).where(_d.c.task_id.in_(task_ids))).all()
    if not rows:
        return {}
    attempts: dict[str, list[WebhookAttempt]] = {}
    for a in conn.execute(
        select(webhook_attempts)
        .where(webhook_attempts.c.delivery_id.in_([r.id for r in rows]))
        .order_by(webhook_attempts.c.id)
    ):
        attempts.setdefault(a.delivery_id, []).append(
            WebhookAttempt(
                number=a.number, at=a.attempted_at, status_code=a.status_code, error=a.error
            )
        )
    return {
        r.task_id: WebhookDelivery(
            id=r.id,
            event=WebhookEvent(r.event),
            state=DeliveryState(r.state),
            attempts=tuple(attempts.get(r.id, ())),
            next_attempt_at=r.next_attempt_at,
        )
        for r in rows
    }
