"""Use cases around generation tasks: submit, look up, list, cancel."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from sqlalchemy import Connection

from cogview_api.config import Settings
from cogview_api.domain import ApiKey, GenerationRequest, Task, TaskState
from cogview_api.errors import CogviewError, Conflict, InvalidRequest, ServiceUnavailable
from cogview_api.services.text import refuse_unstorable_text
from cogview_api.store import idempotency as idempotency_store
from cogview_api.store import tasks as task_store
from cogview_api.store.db import Database
from cogview_api.webhooks.addresses import UnsafeTarget, check_url, parse_allow_list


@dataclass(frozen=True)
class IdempotencyKey:
    """An `Idempotency-Key` header, and the hash of the request it came with (which surface
    and body: the API layer computes it, as only it knows the wire form)."""

    value: str
    request_hash: str


@dataclass(frozen=True)
class Submission:
    task: Task
    replayed: bool  # True: an earlier request with the same Idempotency-Key created the task


# A retry that lost a race on its Idempotency-Key reads the winner's record on its next pass;
# needing more passes means the key keeps being claimed and freed (expiring) under us.
_CLAIM_PASSES = 3


def submit(
    db: Database,
    settings: Settings,
    *,
    key: ApiKey,
    request: GenerationRequest,
    base_url: str | None = None,
) -> Task:
    """Reserve the credits and enqueue the task in one transaction: all or nothing.

    `base_url`: where this client reaches the API, the base of the image URLs in the task's
    webhook (rendered later, away from any request)."""
    return submit_idempotent(
        db, settings, key=key, request=request, base_url=base_url, idempotency=None
    ).task


def submit_idempotent(
    db: Database,
    settings: Settings,
    *,
    key: ApiKey,
    request: GenerationRequest,
    base_url: str | None = None,
    idempotency: IdempotencyKey | None,
) -> Submission:
    """`submit`, at most once per Idempotency-Key and 24 h when one is given.

    The key's record is written in the same transaction as the task and its credit reservation,
    so retries (also concurrent ones, on either database) give one task and one charge. A live
    record of the same request answers with its task (`replayed`); of another request,
    Conflict, with nothing written.
    """
    refuse_unstorable_text(
        prompt=request.prompt, negative_prompt=request.negative_prompt, user_id=request.user_id
    )
    if idempotency is not None:
        # Before the callback's DNS check: a retry gets its task even while the host does not
        # resolve (DNS down, host moved); the check is for a task about to be created.
        with db.read() as conn:
            prior = idempotency_store.find(conn, key_id=key.id, idem_key=idempotency.value)
            if prior is not None:
                return Submission(_replay(conn, idempotency, prior), replayed=True)
    refuse_unsafe_callback(request.callback_url, settings)
    for _ in range(_CLAIM_PASSES):
        try:
            with db.write() as conn:
                if idempotency is not None:
                    prior = idempotency_store.find(conn, key_id=key.id, idem_key=idempotency.value)
                    if prior is not None:
                        return Submission(_replay(conn, idempotency, prior), replayed=True)
                    idempotency_store.claim(
                        conn,
                        key_id=key.id,
                        idem_key=idempotency.value,
                        request_hash=idempotency.request_hash,
                    )
                task = _insert(conn, settings, key=key, request=request, base_url=base_url)
                if idempotency is not None:
                    idempotency_store.attach(
                        conn, key_id=key.id, idem_key=idempotency.value, task_id=task.id
                    )
                return Submission(task, replayed=False)
        except idempotency_store.KeyClaimedMeanwhile:
            continue  # rolled back; the next pass finds the record that won
    raise ServiceUnavailable("The Idempotency-Key is busy; try again shortly.", retry_after=1)


def _insert(
    conn: Connection,
    settings: Settings,
    *,
    key: ApiKey,
    request: GenerationRequest,
    base_url: str | None = None,
) -> Task:
    return task_store.insert_task(
        conn,
        key_id=key.id,
        request=request,
        steps=settings.steps_for(request.quality),
        guidance_scale=settings.guidance_scale,
        price=settings.price_for(request.quality) * request.n,
        max_attempts=settings.max_attempts,
        max_queue=settings.max_queue,
        base_url=base_url,
    )


def _replay(
    conn: Connection, idempotency: IdempotencyKey, prior: idempotency_store.IdempotencyRecord
) -> Task:
    if prior.request_hash != idempotency.request_hash:
        raise Conflict(
            "This Idempotency-Key was already used with a different request in the last 24 "
            "hours; use a new key for a new request.",
            param="Idempotency-Key",
        )
    if prior.task_id is None:  # only ever seen inside the claiming transaction
        raise CogviewError("An Idempotency-Key record has no task.")
    return task_store.get_task(conn, prior.task_id)


def refuse_unsafe_callback(url: str | None, settings: Settings) -> None:
    """InvalidRequest, before anything is written, for a callback_url whose host resolves to an
    address webhooks may not reach (loopback, private, link-local...; see webhooks.addresses)."""
    if url is None:
        return
    try:
        check_url(url, parse_allow_list(settings.webhook_allow_hosts))
    except UnsafeTarget as exc:
        raise InvalidRequest(str(exc), param="callback_url") from exc


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
