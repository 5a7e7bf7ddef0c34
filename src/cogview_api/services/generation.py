"""Use cases around generation tasks: submit, look up, list, cancel."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Connection

from cogview_api import clock
from cogview_api.addresses import UnsafeTarget, check_url, parse_allow_list
from cogview_api.config import Settings
from cogview_api.domain import ApiKey, GenerationRequest, Task, TaskState
from cogview_api.errors import (
    AuthenticationFailed,
    CogviewError,
    Conflict,
    InvalidRequest,
    LimitState,
    NotFound,
    ServiceUnavailable,
)
from cogview_api.log_context import current_request_id
from cogview_api.services import paging
from cogview_api.services.keys import authenticate_in, usable_key
from cogview_api.services.limits import effective_limits
from cogview_api.services.text import refuse_unstorable_text
from cogview_api.store import idempotency as idempotency_store
from cogview_api.store import ratelimit as rate_store
from cogview_api.store import sync_requests as sync_store
from cogview_api.store import tasks as task_store
from cogview_api.store.db import Database
from cogview_api.store.ratelimit import SubmitRate


@dataclass(frozen=True)
class IdempotencyKey:
    """An `Idempotency-Key` header, and the hash of the request it came with (which surface
    and body: the API layer computes it, as only it knows the wire form)."""

    value: str
    request_hash: str


SyncAnswer = sync_store.Answer  # how a synchronous route's request ended


@dataclass(frozen=True)
class RetryMatch:
    """What tells a synchronous route's retry from a new request (docs/api.md, "Retries"): the
    hash of its surface and body (the API layer computes it), and whether it carries an SDK's
    retry marker."""

    request_hash: str
    marked: bool


@dataclass(frozen=True)
class Submission:
    task: Task
    # True: an earlier request made the task (same Idempotency-Key, or an SDK retry joined it)
    replayed: bool
    # The key's limits after this submit (none for a replay, which counted against nothing).
    limits: tuple[LimitState, ...] = ()


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
    _refuse_unstorable(request)
    if idempotency is not None:
        with db.read() as conn:
            prior = _prior(conn, key, idempotency, settings.max_batch_size)
            if prior is not None:
                return prior
    return _submit_new(db, settings, key=key, request=request, base_url=base_url, idem=idempotency)


@dataclass(frozen=True)
class SubmitRequest:
    """What a surface read from a submit's body and headers."""

    generation: GenerationRequest
    idempotency: IdempotencyKey | None = None
    surface: str = "native"  # the API it came in by, recorded for the usage reports
    # Set by the synchronous routes: a retry of an earlier request joins its task.
    retry: RetryMatch | None = None


def submit_for(
    db: Database,
    settings: Settings,
    *,
    secret: str | None,
    read_request: Callable[[], SubmitRequest],
    base_url: str | None = None,
) -> Submission:
    """The HTTP submit from a bearer secret, answered as `submit_idempotent` would be after
    authenticating: a request with no valid key is 401 whatever its body (`read_request`'s
    InvalidRequest is raised only once the key is good).

    Without an Idempotency-Key or a callback_url, one write transaction checks the key and
    writes the task. With either, the key's check and the Idempotency-Key's look-up share a
    read transaction, and the task is written in the next one, after the callback's DNS check
    (which must not hold a lock)."""
    try:
        submit: SubmitRequest | None = read_request()
        problem: InvalidRequest | None = None
    except InvalidRequest as exc:  # answered after the key's check, as if read after it
        submit, problem = None, exc
    if submit is not None and submit.idempotency is None and not submit.generation.callback_url:
        # The common submit: nothing to look up and no DNS to wait for, so the key's check
        # and the insert share one write transaction (a failed check writes nothing).
        request = submit.generation
        with db.write() as conn:
            key = authenticate_in(conn, secret)
            _refuse_unstorable(request)
            return _join_or_insert(conn, settings, key=key, submit=submit, base_url=base_url)
    with db.read() as conn:
        key = authenticate_in(conn, secret)
        if problem is not None:
            raise problem
        assert submit is not None  # read_request returned, or raised `problem`
        request, idem = submit.generation, submit.idempotency
        _refuse_unstorable(request)
        if idem is not None:
            prior = _prior(conn, key, idem, settings.max_batch_size)
            if prior is not None:
                return prior
    return _submit_new(
        db,
        settings,
        key=key,
        request=request,
        base_url=base_url,
        idem=idem,
        surface=submit.surface,
        retry=submit.retry,
    )


def _refuse_unstorable(request: GenerationRequest) -> None:
    refuse_unstorable_text(
        prompt=request.prompt, negative_prompt=request.negative_prompt, user_id=request.user_id
    )


def _prior(
    conn: Connection, key: ApiKey, idem: IdempotencyKey, batch_size: int
) -> Submission | None:
    """The task an earlier request with this Idempotency-Key made, if any. Looked up before
    the callback's DNS check: a retry gets its task even while the host does not resolve (DNS
    down, host moved); the check is for a task about to be created."""
    prior = idempotency_store.find(conn, key_id=key.id, idem_key=idem.value)
    if prior is None:
        return None
    return Submission(_replay(conn, idem, prior, batch_size), replayed=True)


def _submit_new(
    db: Database,
    settings: Settings,
    *,
    key: ApiKey,
    request: GenerationRequest,
    base_url: str | None,
    idem: IdempotencyKey | None,
    surface: str = "native",
    retry: RetryMatch | None = None,
) -> Submission:
    refuse_unsafe_callback(request.callback_url, settings)
    for _ in range(_CLAIM_PASSES):
        try:
            with db.write() as conn:
                if idem is not None:
                    prior = _prior(conn, key, idem, settings.max_batch_size)
                    if prior is not None:
                        return prior
                    idempotency_store.claim(
                        conn, key_id=key.id, idem_key=idem.value, request_hash=idem.request_hash
                    )
                # With an Idempotency-Key, its record answers the retries instead.
                joins = retry if idem is None else None
                submit = SubmitRequest(request, idempotency=idem, surface=surface, retry=joins)
                done = _join_or_insert(conn, settings, key=key, submit=submit, base_url=base_url)
                if idem is not None:
                    idempotency_store.attach(
                        conn, key_id=key.id, idem_key=idem.value, task_id=done.task.id
                    )
                return done
        except idempotency_store.KeyClaimedMeanwhile:
            continue  # rolled back; the next pass finds the record that won
    raise ServiceUnavailable("The Idempotency-Key is busy; try again shortly.", retry_after=1)


def _join_or_insert(
    conn: Connection,
    settings: Settings,
    *,
    key: ApiKey,
    submit: SubmitRequest,
    base_url: str | None,
) -> Submission:
    """Insert the task, in the caller's transaction; for a synchronous route's request, first
    look for the task it retries (joined: replayed, charged nothing), and remember the new
    task's request for its own retries."""
    retry = submit.retry
    window = timedelta(seconds=settings.retry_window_seconds)
    if retry is not None and window:
        now = clock.utcnow()
        joined = sync_store.find_retried(
            conn,
            key_id=key.id,
            request_hash=retry.request_hash,
            since=now - window,
            marked=retry.marked,
        )
        if joined is not None:
            task = task_store.get_task(conn, joined, batch_size=settings.max_batch_size)
            return Submission(task, replayed=True)
    task, limits = _insert(
        conn,
        settings,
        key=key,
        request=submit.generation,
        base_url=base_url,
        surface=submit.surface,
    )
    if retry is not None and window:
        sync_store.record(
            conn,
            key_id=key.id,
            request_hash=retry.request_hash,
            task_id=task.id,
            now=task.created_at,
            window=window,
        )
    return Submission(task, replayed=False, limits=limits)


def note_answer(db: Database, *, task_id: str, answer: SyncAnswer) -> None:
    """Record how a synchronous route's request for the task ended: `gone` (its client hung up
    before the answer, so a retry may join the task) or `delivered`."""
    with db.write() as conn:
        sync_store.mark(conn, task_id=task_id, answer=answer)


def _insert(
    conn: Connection,
    settings: Settings,
    *,
    key: ApiKey,
    request: GenerationRequest,
    base_url: str | None = None,
    surface: str = "native",
) -> tuple[Task, tuple[LimitState, ...]]:
    """Count the submit against the key's rate, then reserve and enqueue (task_store), in the
    caller's transaction; returns the task and the state of the key's limits after it."""
    limits = effective_limits(settings, key)
    states: list[LimitState] = []
    if limits.submit_rate:
        rate = SubmitRate(rate=limits.submit_rate, burst=limits.submit_burst)
        states.append(
            rate_store.take_submit(conn, key_id=key.id, limit=rate, now=clock.epoch_seconds())
        )
    task, waiting = task_store.insert_task(
        conn,
        key_id=key.id,
        request=request,
        steps=settings.steps_for(request.quality),
        guidance_scale=settings.guidance_scale,
        price=settings.price_for(request.quality) * request.n,
        max_attempts=settings.max_attempts,
        max_queue=settings.max_queue,
        max_waiting_per_key=limits.max_waiting,
        base_url=base_url,
        batch_size=settings.max_batch_size,
        surface=surface,
        request_id=current_request_id(),  # the request's, bound by the API's middleware
    )
    states.append(task_store.waiting_state(limits.max_waiting, waiting))
    return task, tuple(states)


def _replay(
    conn: Connection,
    idempotency: IdempotencyKey,
    prior: idempotency_store.IdempotencyRecord,
    batch_size: int,
) -> Task:
    if prior.request_hash != idempotency.request_hash:
        raise Conflict(
            "This Idempotency-Key was already used with a different request in the last 24 "
            "hours; use a new key for a new request.",
            param="Idempotency-Key",
        )
    if prior.task_id is None:  # only ever seen inside the claiming transaction
        raise CogviewError("An Idempotency-Key record has no task.")
    return task_store.get_task(conn, prior.task_id, batch_size=batch_size)


def refuse_unsafe_callback(url: str | None, settings: Settings) -> None:
    """InvalidRequest, before anything is written, for a callback_url whose host resolves to an
    address webhooks may not reach (loopback, private, link-local...; see cogview_api.addresses)."""
    if url is None:
        return
    try:
        check_url(url, parse_allow_list(settings.webhook_allow_hosts))
    except UnsafeTarget as exc:
        raise InvalidRequest(str(exc), param="callback_url") from exc


def get_task_for(db: Database, *, secret: str | None, task_id: str, batch_size: int = 1) -> Task:
    """A bearer secret's task: the key checked and the task read in one transaction, by one
    statement (a finished task's images, a waiting one's position, by a few more; the position
    for workers that claim `batch_size` tasks at a time)."""
    if not secret:
        raise AuthenticationFailed()
    with db.read() as conn:
        key, task = task_store.find_key_and_own_task(
            conn, secret=secret, task_id=task_id, batch_size=batch_size
        )
        usable_key(key)
        if task is None:
            raise NotFound(f"No task with id {task_id!r}.")
        return task


CANCELLED_MESSAGE = "Cancelled by the client."


def cancel(db: Database, *, key: ApiKey, task_id: str) -> Task:
    """Cancel a task in progress and refund it, in one transaction; returns it, CANCELLED.

    A running task's worker finds out at its next denoising step, when its progress write
    (fenced on state RUNNING and its id) matches no row, and stops without storing anything.
    Raises NotFound (unknown, or another key's task) or Conflict (already terminal: a task
    that completed first keeps its images and its charge).
    """
    with db.write() as conn:
        return _cancel(conn, key=key, task_id=task_id)


def cancel_for(db: Database, *, secret: str | None, task_id: str) -> Task:
    """`cancel` from a bearer secret, the key checked in the cancelling transaction."""
    with db.write() as conn:
        return _cancel(conn, key=authenticate_in(conn, secret), task_id=task_id)


def _cancel(conn: Connection, *, key: ApiKey, task_id: str) -> Task:
    task = task_store.get_task(conn, task_id, key_id=key.id)
    if not task.state.terminal and task_store.cancel_task(
        conn, task_id=task_id, message=CANCELLED_MESSAGE
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
    db: Database,
    *,
    key: ApiKey,
    status: str | None,
    limit: int,
    cursor: str | None,
    batch_size: int = 1,
) -> tuple[list[Task], str | None]:
    """One page of the key's tasks, newest first, and the cursor of the next page (or None)."""
    with db.read() as conn:
        return _list(
            conn, key=key, status=status, limit=limit, cursor=cursor, batch_size=batch_size
        )


def list_tasks_for(
    db: Database,
    *,
    secret: str | None,
    status: str | None,
    limit: int,
    cursor: str | None,
    batch_size: int = 1,
) -> tuple[list[Task], str | None]:
    """`list_tasks` from a bearer secret, the key checked in the same read transaction."""
    with db.read() as conn:
        key = authenticate_in(conn, secret)
        return _list(
            conn, key=key, status=status, limit=limit, cursor=cursor, batch_size=batch_size
        )


def _list(
    conn: Connection,
    *,
    key: ApiKey,
    status: str | None,
    limit: int,
    cursor: str | None,
    batch_size: int,
) -> tuple[list[Task], str | None]:
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
    page = task_store.list_tasks(
        conn,
        key_id=key.id,
        limit=limit + 1,
        before_seq=before,
        states=states,
        batch_size=batch_size,
    )
    if len(page) > limit:
        return page[:limit], encode_cursor(page[limit - 1].seq)
    return page, None


def encode_cursor(seq: int) -> str:
    return paging.encode_cursor("t", seq)


def decode_cursor(cursor: str) -> int:
    return paging.decode_cursor("t", cursor)
