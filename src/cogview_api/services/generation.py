"""Use cases around generation tasks: submit, look up, list, cancel."""

from __future__ import annotations

import base64
import binascii

from cogview_api.config import Settings
from cogview_api.domain import ApiKey, GenerationRequest, Task, TaskState
from cogview_api.errors import Conflict, InvalidRequest
from cogview_api.services.text import refuse_unstorable_text
from cogview_api.store import tasks as task_store
from cogview_api.store.db import Database


def submit(db: Database, settings: Settings, *, key: ApiKey, request: GenerationRequest) -> Task:
    """Reserve the credits and enqueue the task in one transaction: all or nothing."""
    refuse_unstorable_text(
        prompt=request.prompt, negative_prompt=request.negative_prompt, user_id=request.user_id
    )
    price = settings.price_for(request.quality) * request.n
    with db.write() as conn:
        return task_store.insert_task(
            conn,
            key_id=key.id,
            request=request,
            steps=settings.steps_for(request.quality),
            guidance_scale=settings.guidance_scale,
            price=price,
            max_attempts=settings.max_attempts,
            max_queue=settings.max_queue,
        )


def get_task(db: Database, *, key: ApiKey, task_id: str) -> Task:
    with db.read() as conn:
        return task_store.get_task(conn, task_id, key_id=key.id)


# The `error` of a cancelled task. 499 is what Google's APIs map their CANCELLED code to
# ("client closed request"); it is never an HTTP status of a response here.
CANCELLED_CODE = 499
CANCELLED_TYPE = "cancelled"
CANCELLED_MESSAGE = "Cancelled by the client."


def cancel(db: Database, *, key: ApiKey, task_id: str) -> Task:
    """Cancel a task in progress and refund it, in one transaction; returns it, CANCELLED.

    A running task's worker finds out at its next denoising step, when its progress write
    (fenced on state RUNNING and its id) matches no row, and stops without storing anything.
    Raises NotFound (unknown, or another key's task) or Conflict (already terminal: a task
    that completed first keeps its images and its charge).
    """
    with db.write() as conn:
        task = task_store.get_task(conn, task_id, key_id=key.id)
        if not task.state.terminal and task_store.fail_task(
            conn,
            task_id=task_id,
            error_code=CANCELLED_CODE,
            error_type=CANCELLED_TYPE,
            message=CANCELLED_MESSAGE,
            state=TaskState.CANCELLED,
        ):
            return task_store.get_task(conn, task_id)
        # Terminal when read, or settled by its worker since (PostgreSQL reads committed rows).
        status = task_store.get_task(conn, task_id).state.wire_status
    raise Conflict(f"The task is already {status}; only a task in progress can be cancelled.")


# `status` filter values a client may send, mapped onto stored states.
STATUS_FILTERS: dict[str, tuple[TaskState, ...]] = {
    "IN_PROGRESS": (TaskState.QUEUED, TaskState.RUNNING),
    "COMPLETED": (TaskState.COMPLETED,),
    "FAILED": (TaskState.FAILED,),
    "CANCELLED": (TaskState.CANCELLED,),
}


def list_tasks(
    db: Database, *, key: ApiKey, status: str | None, limit: int, cursor: str | None
) -> tuple[list[Task], str | None]:
    """One page of the key's tasks, newest first, and the cursor of the next page (or None)."""
    states = None
    if status is not None:
        states = STATUS_FILTERS.get(status.upper())
        if states is None:
            raise InvalidRequest(
                "status must be one of " + ", ".join(STATUS_FILTERS), param="status"
            )
    if not 1 <= limit <= 100:
        raise InvalidRequest("limit must be between 1 and 100", param="limit")
    before = decode_cursor(cursor) if cursor else None
    with db.read() as conn:
        page = task_store.list_tasks(
            conn, key_id=key.id, limit=limit + 1, before_seq=before, states=states
        )
    if len(page) > limit:
        return page[:limit], encode_cursor(page[limit - 1].seq)
    return page, None


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"t:{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, _, value = raw.partition(":")
        if prefix != "t":
            raise ValueError(raw)
        return int(value)
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidRequest("cursor is not valid", param="cursor") from exc
