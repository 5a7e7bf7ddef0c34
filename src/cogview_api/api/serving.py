"""Generation for every surface: one serving object that accepts a request, waits for its
result, and hands the routes what they answer with.

Built once in `create_app` and given to the native, OpenAI and Zhipu routes as a dependency
(`ServingDep`), so the submit flow exists once. A submit crosses to the thread pool once: the
key's check, the body's parsing and validation, and the task's insert run there together (the
body after the key, so a request without a valid key is 401 whatever it sent, as before).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Generic, Protocol, Self, TypeVar

import anyio
from fastapi import Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from cogview_api.api.errors import invalid_from_validation, ratelimit_headers
from cogview_api.api.idempotency import idempotency_key
from cogview_api.api.inputs import parse_json_object
from cogview_api.api.metrics import count_submitted
from cogview_api.api.present import ImageLinks, Presign
from cogview_api.api.retries import retry_match
from cogview_api.config import Settings
from cogview_api.domain import GenerationRequest, Task, TaskState
from cogview_api.errors import LimitState, TaskCancelled, TaskFailed, WaitTimedOut
from cogview_api.services import generation
from cogview_api.services.backends import Backends
from cogview_api.services.follow_limits import FollowLimits, Kind, Slot
from cogview_api.services.generation import Submission, SubmitRequest
from cogview_api.services.watch import TaskWatcher


class GenerationBody(Protocol):
    """What a surface's request schema offers: pydantic's validation, and the generation it
    asks for (`GenerationCreate`, `OpenAIImageCreate`, `ZhipuImageCreate`)."""

    @classmethod
    def model_validate(cls, obj: Any) -> Self: ...

    def to_domain(self) -> GenerationRequest: ...


Body = TypeVar("Body", bound=GenerationBody)


@dataclass(frozen=True)
class Accepted(Generic[Body]):
    """A submit taken in: the body as the surface's schema read it, and the task."""

    body: Body
    task: Task
    replayed: bool  # an earlier request with the same Idempotency-Key made the task
    limits: tuple[LimitState, ...] = ()  # the key's limits after the submit; none on a replay

    @property
    def headers(self) -> dict[str, str]:
        """The RateLimit header fields every surface's successful submit answers with."""
        return ratelimit_headers(self.limits)


def bearer_secret(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None


class GenerationServing:
    """Accept, wait, answer: the generation flow of every surface."""

    def __init__(
        self,
        *,
        settings: Settings,
        backends: Backends,
        watcher: TaskWatcher,
        limits: FollowLimits,
        presign: Presign | None,
        on_submit: Sequence[Callable[[], None]] = (),
    ) -> None:
        self.settings = settings
        self.db = backends.db
        self.watcher = watcher
        self.signals = watcher.signals
        self.limits = limits
        self.presign = presign
        self.on_submit = tuple(on_submit)

    def base_url(self, request: Request) -> str:
        """Where this client reaches the API: COGVIEW_PUBLIC_URL, else the request's own URL."""
        if self.settings.public_url:
            return self.settings.public_url.rstrip("/")
        return str(request.base_url).rstrip("/")

    def links(self, request: Request) -> ImageLinks:
        return ImageLinks(base=self.base_url(request), presign=self.presign)

    async def accept(
        self,
        request: Request,
        *,
        surface: str,
        schema: type[Body],
        secret: str,
        joins_retries: bool = False,
    ) -> Accepted[Body]:
        """Submit the request's body, read with `schema`: credits reserved with the task in one
        transaction; with an Idempotency-Key, a retry gets the first request's task; with
        `joins_retries` (the synchronous routes), so does an SDK's retry (api/retries.py).
        Wakes in-process workers for a new task. Raises our errors for the surface to render."""
        raw = await request.body()
        read: list[Body] = []

        def read_request() -> SubmitRequest:
            data = parse_json_object(request, raw)
            try:
                body = schema.model_validate(data)
            except ValidationError as exc:
                raise invalid_from_validation(exc) from exc
            read.append(body)
            return SubmitRequest(
                generation=body.to_domain(),
                idempotency=idempotency_key(request, surface, data),
                surface=surface,
                retry=retry_match(request, surface, data) if joins_retries else None,
            )

        base = self.base_url(request)
        submitted: Submission = await run_in_threadpool(
            lambda: generation.submit_for(
                self.db, self.settings, secret=secret, read_request=read_request, base_url=base
            )
        )
        if not submitted.replayed:
            count_submitted(surface, submitted.task)
            for notify in self.on_submit:
                notify()
        return Accepted(
            body=read[0],
            task=submitted.task,
            replayed=submitted.replayed,
            limits=submitted.limits,
        )

    async def take_slot(self, kind: Kind, secret: str) -> Slot:
        """A slot of the key's cap on streams or waits (429 over it), before anything else is
        read or written for the request. Cancellation-safe: a request cancelled while its
        slot is being taken (the client went away) gives it back once the take is done."""
        taking = asyncio.ensure_future(run_in_threadpool(self.limits.take, kind, secret))
        try:
            return await asyncio.shield(taking)
        except asyncio.CancelledError:
            taking.add_done_callback(_give_back_taken)
            raise

    @contextlib.asynccontextmanager
    async def holding(self, kind: Kind, secret: str) -> AsyncIterator[None]:
        slot = await self.take_slot(kind, secret)
        try:
            yield
        finally:
            await give_back(slot)

    async def read_task(self, secret: str, task_id: str) -> Task:
        """The task as its key may see it now (the key checked again: a revoked key stops)."""
        return await run_in_threadpool(
            lambda: generation.get_task_for(
                self.db, secret=secret, task_id=task_id, batch_size=self.settings.max_batch_size
            )
        )

    async def wait(self, secret: str, task_id: str, seconds: float) -> Task:
        """The task once it is terminal, or as read again after `seconds` or when the server
        stops (its status and queue position fresh). Reads the task once, then follows it
        through the process's watcher, which reads for all followers at once; the terminal task
        is read again with the key (so a key revoked meanwhile gets its 403)."""
        deadline = time.monotonic() + seconds
        task = await self.read_task(secret, task_id)
        if task.state.terminal:
            return task
        with self.watcher.follow(task) as follower:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or self.watcher.closing:
                    return await self.read_task(secret, task_id)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(follower.changed.wait(), timeout=left)
                follower.changed.clear()
                if follower.revoked or follower.gone or follower.task.state.terminal:
                    task = await self.read_task(secret, task_id)
                    if task.state.terminal:
                        return task

    async def generate(
        self, request: Request, *, surface: str, schema: type[Body], secret: str
    ) -> Accepted[Body]:
        """A synchronous compat route from body to finished task: accept, then hold the
        request up to `settings.sync_wait_seconds`.

        Returns the COMPLETED task. Raises TaskFailed or TaskCancelled if it ended without
        images (the credits are refunded by then), WaitTimedOut if it is still running (it
        stays charged and keeps going; the message names it so the client can fetch it from
        the native API). Holds one of the key's `Prefer: wait` slots throughout: RateLimited
        (429) over the cap, before anything is written."""
        async with self.holding("wait", secret):
            accepted = await self.accept(
                request, surface=surface, schema=schema, secret=secret, joins_retries=True
            )
            task = accepted.task
            wait_s = self.settings.sync_wait_seconds
            finished = await self._wait_for_client(request, secret, task.id, wait_s)
        if not finished.state.terminal:
            raise WaitTimedOut(
                f"Task {task.id} did not finish within {wait_s:g} s. It is "
                f"still running: GET /api/v1/tasks/{task.id} with the same key gives its images."
            )
        reason = finished.error_message or "no reason given"
        if finished.state is TaskState.CANCELLED:
            raise TaskCancelled(f"Task {task.id} was cancelled: {reason}")
        if finished.state is not TaskState.COMPLETED:
            raise TaskFailed(f"Task {task.id} failed: {reason}")
        return replace(accepted, task=finished)

    async def accept_streaming(
        self, request: Request, *, surface: str, schema: type[Body], secret: str
    ) -> tuple[Accepted[Body], Slot]:
        """A streaming compat request's start: one of the key's `Prefer: wait` slots (429 over
        the cap, before anything is written), then `accept` as `generate` does. The caller
        streams the task and gives the slot back when the stream ends."""
        slot = await self.take_slot("wait", secret)
        try:
            accepted = await self.accept(
                request, surface=surface, schema=schema, secret=secret, joins_retries=True
            )
        except BaseException:
            await give_back(slot)
            raise
        return accepted, slot

    async def note_answer(self, task_id: str, answer: generation.SyncAnswer) -> None:
        """Record how a synchronous request's answer went (for its retries, api/retries.py)."""
        await self._note(task_id, answer)

    async def _wait_for_client(
        self, request: Request, secret: str, task_id: str, seconds: float
    ) -> Task:
        """`wait`, while watching the connection: a client that hangs up first (its timeout)
        leaves the task marked `gone`, which lets its unmarked retry join it; a terminal answer
        marks it `delivered`, so a later identical request is a new one (docs/api.md)."""
        waiting = asyncio.ensure_future(self.wait(secret, task_id, seconds))
        hang_up = asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait({waiting, hang_up}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hang_up.cancel()
            if not waiting.done():
                waiting.cancel()
                await self._note(task_id, "gone")
        if waiting.cancelled():  # the answer would reach nobody
            raise WaitTimedOut(f"The client hung up before task {task_id} finished.")
        finished = waiting.result()
        # A 504 (still running) is not the answer: a marked retry of it joins the task.
        await self._note(task_id, "delivered" if finished.state.terminal else "timed_out")
        return finished

    async def _note(self, task_id: str, answer: generation.SyncAnswer) -> None:
        with anyio.CancelScope(shield=True):
            await run_in_threadpool(
                lambda: generation.note_answer(self.db, task_id=task_id, answer=answer)
            )


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body is read by then, so the next message of
    the connection is its end)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _give_back_taken(taking: asyncio.Future[Slot]) -> None:
    """For a take whose request was cancelled meanwhile: its slot, if it got one, goes back."""
    if not taking.cancelled() and taking.exception() is None:
        releasing = asyncio.ensure_future(give_back(taking.result()))
        _RELEASING.add(releasing)  # held until done (the loop keeps only a weak reference)
        releasing.add_done_callback(_RELEASING.discard)


_RELEASING: set[asyncio.Future[None]] = set()


async def give_back(slot: Slot) -> None:
    """Release a slot, also from a request being cancelled (the client went away)."""
    with anyio.CancelScope(shield=True):
        await run_in_threadpool(slot.release)
