"""Use cases around batches: submit many generation requests at once, read, list, page their
tasks, cancel, and read what an archive of one holds.

A batch's lines are validated by the API with the single submit's schema; here, with the same
rules as `services.generation`, the text a database cannot hold and the callback URLs' targets
are checked for every line before anything is written, and every bad line is reported at once
(InvalidBatch). Then one transaction reserves the credits of the whole batch and writes the batch
and its tasks (store/batches.py): all of it, or nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import Connection

from cogview_api import clock
from cogview_api.config import Settings
from cogview_api.domain import ApiKey, Batch, GenerationRequest, Task, TaskState, new_batch_id
from cogview_api.errors import (
    Conflict,
    InvalidBatch,
    InvalidRequest,
    LineError,
    ServiceUnavailable,
)
from cogview_api.log_context import current_request_id
from cogview_api.services import paging
from cogview_api.services.generation import (
    STATUS_FILTERS,
    IdempotencyKey,
    refuse_unsafe_callback,
)
from cogview_api.services.keys import authenticate_in
from cogview_api.services.limits import effective_limits
from cogview_api.services.text import refuse_unstorable_text
from cogview_api.store import batches as batch_store
from cogview_api.store import idempotency as idempotency_store
from cogview_api.store import ratelimit as rate_store
from cogview_api.store.batches import ArchiveEntry, NewTask
from cogview_api.store.db import Database
from cogview_api.store.ratelimit import SubmitRate

CANCELLED_MESSAGE = "Cancelled by the client (batch cancel)."
_CLAIM_PASSES = 3  # as services.generation: a retry that lost a race reads the winner's record


@dataclass(frozen=True)
class BatchRequest:
    """What the API read from a batch's body and headers: its lines, each already valid as a
    single submit's body, and the batch's own fields."""

    lines: Sequence[GenerationRequest]
    callback_url: str | None = None
    metadata: Mapping[str, str] | None = None
    idempotency: IdempotencyKey | None = None


@dataclass(frozen=True)
class BatchSubmission:
    batch: Batch
    replayed: bool  # an earlier request with the same Idempotency-Key made it


def submit_batch_for(
    db: Database,
    settings: Settings,
    *,
    secret: str | None,
    read_batch: Callable[[], BatchRequest],
    base_url: str | None = None,
) -> BatchSubmission:
    """The HTTP batch submit from a bearer secret: a request with no valid key is 401 whatever
    its body (`read_batch`'s InvalidRequest is raised only once the key is good). With an
    Idempotency-Key, a live record of the same request answers with its batch, of another
    request Conflict. `task_columns`: more columns for every task (their priority class)."""
    try:
        submit: BatchRequest | None = read_batch()
        problem: InvalidRequest | None = None
    except InvalidRequest as exc:  # answered after the key's check, as if read after it
        submit, problem = None, exc
    with db.read() as conn:
        key = authenticate_in(conn, secret)
        if problem is not None:
            raise problem
        assert submit is not None
        idem = submit.idempotency
        if idem is not None:
            prior = _prior(conn, key, idem)
            if prior is not None:
                return prior
    _refuse_bad_lines(submit, settings)
    for _ in range(_CLAIM_PASSES):
        try:
            with db.write() as conn:
                if idem is not None:
                    prior = _prior(conn, key, idem)
                    if prior is not None:
                        return prior
                    idempotency_store.claim(
                        conn, key_id=key.id, idem_key=idem.value, request_hash=idem.request_hash
                    )
                batch = _insert(conn, settings, key, submit, base_url)
                if idem is not None:
                    idempotency_store.attach_batch(
                        conn, key_id=key.id, idem_key=idem.value, batch_id=batch.id
                    )
                return BatchSubmission(batch, replayed=False)
        except idempotency_store.KeyClaimedMeanwhile:
            continue  # rolled back; the next pass finds the record that won
    raise ServiceUnavailable("The Idempotency-Key is busy; try again shortly.", retry_after=1)


def _refuse_bad_lines(submit: BatchRequest, settings: Settings) -> None:
    """InvalidBatch listing every line whose text a database cannot hold or whose callback_url
    targets an address webhooks may not reach (each distinct URL resolved once). The text is
    checked again here for callers other than the API (which reports it with the lines' other
    problems)."""
    errors: list[LineError] = []
    checked: dict[str, InvalidRequest | None] = {}
    for index, line in enumerate(submit.lines):
        try:
            refuse_unstorable_text(
                prompt=line.prompt, negative_prompt=line.negative_prompt, user_id=line.user_id
            )
            if line.callback_url is not None:
                if line.callback_url not in checked:
                    checked[line.callback_url] = _callback_problem(line.callback_url, settings)
                found = checked[line.callback_url]
                if found is not None:
                    raise found
        except InvalidRequest as exc:
            errors.append(LineError(index=index, param=exc.param, message=exc.message))
    if errors:
        raise InvalidBatch(errors)
    refuse_unsafe_callback(submit.callback_url, settings)  # the batch's own: param callback_url


def _callback_problem(url: str, settings: Settings) -> InvalidRequest | None:
    try:
        refuse_unsafe_callback(url, settings)
    except InvalidRequest as exc:
        return exc
    return None


def _insert(
    conn: Connection,
    settings: Settings,
    key: ApiKey,
    submit: BatchRequest,
    base_url: str | None,
) -> Batch:
    """A batch counts as one submit against the key's submit rate (its size is bounded by
    COGVIEW_BATCH_MAX_REQUESTS and paid for up front); then reserve and write."""
    limits = effective_limits(settings, key)
    if limits.submit_rate:
        rate = SubmitRate(rate=limits.submit_rate, burst=limits.submit_burst)
        rate_store.take_submit(conn, key_id=key.id, limit=rate, now=clock.epoch_seconds())
    lines = [
        NewTask(
            request=r,
            steps=settings.steps_for(r.quality),
            price=settings.price_for(r.quality) * r.n,
        )
        for r in submit.lines
    ]
    return batch_store.insert_batch(
        conn,
        batch_id=new_batch_id(),
        key_id=key.id,
        lines=lines,
        guidance_scale=settings.guidance_scale,
        max_attempts=settings.max_attempts,
        callback_url=submit.callback_url,
        metadata=submit.metadata,
        base_url=base_url,
        request_id=current_request_id(),
    )


def _prior(conn: Connection, key: ApiKey, idem: IdempotencyKey) -> BatchSubmission | None:
    prior = idempotency_store.find(conn, key_id=key.id, idem_key=idem.value)
    if prior is None:
        return None
    if prior.request_hash != idem.request_hash or prior.batch_id is None:
        raise Conflict(
            "This Idempotency-Key was already used with a different request in the last 24 "
            "hours; use a new key for a new request.",
            param="Idempotency-Key",
        )
    return BatchSubmission(batch_store.get_batch(conn, prior.batch_id), replayed=True)


def get_batch_for(db: Database, *, secret: str | None, batch_id: str) -> Batch:
    """A bearer secret's batch (another key's: NotFound), the key checked in the same read."""
    with db.read() as conn:
        key = authenticate_in(conn, secret)
        return batch_store.get_batch(conn, batch_id, key_id=key.id)


def list_batches_for(
    db: Database, *, secret: str | None, limit: int, cursor: str | None
) -> tuple[list[Batch], str | None]:
    """One page of the key's batches, newest first, and the next page's cursor (or None)."""
    paging.check_limit(limit)
    before = paging.decode_cursor("b", cursor) if cursor else None
    with db.read() as conn:
        key = authenticate_in(conn, secret)
        page = batch_store.list_batches(conn, key_id=key.id, limit=limit + 1, before_seq=before)
    if len(page) > limit:
        return page[:limit], paging.encode_cursor("b", page[limit - 1].seq)
    return page, None


def batch_tasks_for(
    db: Database,
    *,
    secret: str | None,
    batch_id: str,
    status: str | None,
    limit: int,
    cursor: str | None,
    batch_size: int = 1,
) -> tuple[list[Task], str | None]:
    """One page of a batch's tasks in line order (filtered by `status` as GET /tasks is), and
    the next page's cursor (or None)."""
    states: tuple[TaskState, ...] | None = None
    if status is not None:
        states = STATUS_FILTERS.get(status.upper())
        if states is None:
            raise InvalidRequest(
                "status must be one of " + ", ".join(STATUS_FILTERS), param="status"
            )
    paging.check_limit(limit)
    # A cursor is the index of the page's last line.
    after = paging.decode_cursor("bt", cursor) if cursor else None
    with db.read() as conn:
        key = authenticate_in(conn, secret)
        batch_store.get_batch(conn, batch_id, key_id=key.id)  # NotFound for another key's
        page = batch_store.batch_tasks(
            conn,
            batch_id=batch_id,
            limit=limit + 1,
            after_index=after,
            states=states,
            batch_size=batch_size,
        )
    if len(page) > limit:
        last = page[limit - 1].batch_index
        assert last is not None
        return page[:limit], paging.encode_cursor("bt", last)
    return page, None


def cancel_batch_for(db: Database, *, secret: str | None, batch_id: str) -> Batch:
    """Cancel the batch's tasks not yet ended, with refunds, and end it CANCELLED: one
    transaction, the key checked in it. NotFound (another key's), Conflict (already ended)."""
    with db.write() as conn:
        key = authenticate_in(conn, secret)
        return batch_store.cancel_batch(
            conn, batch_id=batch_id, key_id=key.id, message=CANCELLED_MESSAGE
        )


def archive_page(
    db: Database, *, batch_id: str, after_index: int, limit: int
) -> list[ArchiveEntry]:
    """A page of the batch's lines for its archive (the key was checked when it began)."""
    with db.read() as conn:
        return batch_store.archive_entries(
            conn, batch_id=batch_id, after_index=after_index, limit=limit
        )


def batch_of(db: Database, batch_id: str) -> Batch:
    """The batch, read without a key (the batch event stream's later frames; its key and the
    batch were checked by its first)."""
    with db.read() as conn:
        return batch_store.get_batch(conn, batch_id)
