"""`Client`: the synchronous client of the native API (httpx.Client underneath)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from cogview_api.client import _base as base
from cogview_api.client import _errors as errors
from cogview_api.client._models import (
    Account,
    Batch,
    BatchPage,
    GenerationRequest,
    Image,
    ServerInfo,
    Submitted,
    Task,
    TaskPage,
)


class Client:
    """A client of one cogview-api server, for one API key.

    `base_url` defaults to `$COGVIEW_SERVER` (else `http://127.0.0.1:8000`), `api_key` to
    `$COGVIEW_API_KEY`. `timeout` bounds each HTTP request (not a wait for a task: give `wait`
    and `generate` their own). Failed requests are retried `max_retries` times (connect errors,
    timeouts, 429/502/503/504, honouring `Retry-After`); a submit keeps one Idempotency-Key over
    its retries, so a retry never pays twice. Use it as a context manager, or call `close()`.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        max_retries: int = 4,
        poll_interval: float = 1.0,
        http_client: httpx.Client | None = None,
    ) -> None:
        self.base_url = base.default_server(base_url)
        self._key = base.default_key(api_key)
        self.retry = base.RetryPolicy(max_retries=max_retries)
        self.poll_interval = poll_interval
        self._own_http = http_client is None
        self._http = http_client or httpx.Client(timeout=timeout)
        self._headers = base.base_headers(self._key)

    # -- plumbing --------------------------------------------------------------------------

    def close(self) -> None:
        if self._own_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        safe: bool = True,
        timeout: float | None = None,
    ) -> httpx.Response:
        """One API call with the retry rule; an error answer is raised as its APIError."""
        attempt = 0
        while True:
            try:
                response = self._http.request(
                    method,
                    self.base_url + path,
                    json=json,
                    params=params,
                    headers={**self._headers, **(headers or {})},
                    timeout=self._http.timeout if timeout is None else timeout,
                )
            except httpx.TransportError as exc:
                wait = (
                    self.retry.delay(attempt) if base.may_retry_transport(exc, safe=safe) else None
                )
                if wait is None:
                    raise base.transport_error(exc, self.base_url) from exc
                time.sleep(wait)
                attempt += 1
                continue
            if response.is_success:
                return response
            error = base.api_error(response, has_key=self._key is not None)
            if base.may_retry_status(response.status_code, safe=safe):
                wait = self.retry.delay(attempt, error.retry_after)
                if wait is not None:
                    time.sleep(wait)
                    attempt += 1
                    continue
            raise error

    def _data(self, method: str, path: str, **kwargs: Any) -> Any:
        return base.data_of(self._request(method, path, **kwargs))

    # -- tasks -----------------------------------------------------------------------------

    def submit(
        self,
        prompt: str | GenerationRequest | Mapping[str, Any],
        *,
        size: str | None = None,
        quality: str | None = None,
        negative_prompt: str | None = None,
        seed: int | None = None,
        n: int | None = None,
        output_format: str | None = None,
        user_id: str | None = None,
        callback_url: str | None = None,
        model: str | None = None,
        idempotency_key: str | None = None,
    ) -> Submitted:
        """Submit one generation; returns once it is queued (credits reserved). Without
        `idempotency_key` the client makes one, kept over its retries."""
        body = base.generation_body(
            prompt,
            {
                "size": size,
                "quality": quality,
                "negative_prompt": negative_prompt,
                "seed": seed,
                "n": n,
                "output_format": output_format,
                "user_id": user_id,
                "callback_url": callback_url,
                "model": model,
            },
        )
        key = idempotency_key or base.new_idempotency_key()
        response = self._request(
            "POST", "/api/v1/images/generations", json=body, headers={"Idempotency-Key": key}
        )
        data = base.data_of(response)
        return Submitted.model_validate({**data, "replayed": base.replayed(response)})

    def generate(
        self,
        prompt: str | GenerationRequest | Mapping[str, Any],
        *,
        timeout: float | None = None,
        **fields: Any,
    ) -> Task:
        """Submit and wait: the COMPLETED task, with its images. Raises TaskFailed if it ended
        FAILED or CANCELLED, TimeoutError after `timeout` seconds (the task goes on)."""
        submitted = self.submit(prompt, **fields)
        return self.wait(submitted.task_id, timeout=timeout, check=True)

    def get(self, task_id: str) -> Task:
        return Task.model_validate(self._data("GET", f"/api/v1/tasks/{task_id}"))

    def cancel(self, task_id: str) -> Task:
        """Cancel a task in progress (refunded). 409 Conflict if it had already ended."""
        return Task.model_validate(
            self._data("POST", f"/api/v1/tasks/{task_id}/cancel", safe=False)
        )

    def list_tasks(
        self, *, status: str | None = None, limit: int | None = None, cursor: str | None = None
    ) -> TaskPage:
        params = base.page_params(status=status, limit=limit, cursor=cursor)
        return TaskPage.model_validate(self._data("GET", "/api/v1/tasks", params=params))

    def iter_tasks(self, *, status: str | None = None) -> Iterator[Task]:
        """Every task of the key, newest first, page after page."""
        cursor: str | None = None
        while True:
            page = self.list_tasks(status=status, limit=100, cursor=cursor)
            yield from page.tasks
            if not page.has_more or page.next_cursor is None:
                return
            cursor = page.next_cursor

    def watch(self, task_id: str, *, timeout: float | None = None) -> Iterator[Task]:
        """The task at once, then at every change, ending with its terminal state: over the event
        stream, or by polling every `poll_interval` s if the stream cannot be had."""
        deadline = base.deadline_of(timeout)
        for frame in self._follow(f"/api/v1/tasks/{task_id}", "task", deadline):
            task = Task.model_validate(frame)
            yield task
            if task.done:
                return

    def wait(self, task_id: str, *, timeout: float | None = None, check: bool = False) -> Task:
        """The task once it has ended. `check=True`: raise TaskFailed unless COMPLETED."""
        task: Task | None = None
        for seen in self.watch(task_id, timeout=timeout):
            task = seen
        assert task is not None and task.done
        if check and not task.ok:
            raise errors.TaskFailed(task)
        return task

    def download(self, image: Image | str, path: str | os.PathLike[str]) -> Path:
        """Save an image (an Image of a task, or its URL) to `path`; returns the path. The file
        appears whole or not at all (written beside it, then renamed)."""
        url = image.url if isinstance(image, Image) else image
        return self._save(url, Path(path), keyed=False)

    # -- account ---------------------------------------------------------------------------

    def account(self) -> Account:
        return Account.model_validate(self._data("GET", "/api/v1/account"))

    def info(self) -> ServerInfo:
        return ServerInfo.model_validate(self._data("GET", "/api/v1/info"))

    # -- batches ---------------------------------------------------------------------------

    def create_batch(
        self,
        requests: Sequence[GenerationRequest | Mapping[str, Any] | str],
        *,
        callback_url: str | None = None,
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> Batch:
        """Submit many generations as one batch (credits for all of it reserved at once). Each
        request is a GenerationRequest, a body mapping, or a prompt."""
        body = base.batch_body(requests, callback_url, metadata)
        key = idempotency_key or base.new_idempotency_key()
        response = self._request(
            "POST",
            "/api/v1/batches",
            json=body,
            headers={"Idempotency-Key": key},
            # Up to 10,000 tasks written in one transaction: give it longer than a submit.
            timeout=max(base.BATCH_TIMEOUT, self._http.timeout.read or 0),
        )
        return Batch.model_validate({**base.data_of(response), "replayed": base.replayed(response)})

    def get_batch(self, batch_id: str) -> Batch:
        return Batch.model_validate(self._data("GET", f"/api/v1/batches/{batch_id}"))

    def list_batches(self, *, limit: int | None = None, cursor: str | None = None) -> BatchPage:
        params = base.page_params(limit=limit, cursor=cursor)
        return BatchPage.model_validate(self._data("GET", "/api/v1/batches", params=params))

    def iter_batches(self) -> Iterator[Batch]:
        cursor: str | None = None
        while True:
            page = self.list_batches(limit=100, cursor=cursor)
            yield from page.batches
            if not page.has_more or page.next_cursor is None:
                return
            cursor = page.next_cursor

    def batch_tasks(
        self,
        batch_id: str,
        *,
        status: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> TaskPage:
        """One page of the batch's tasks, in batch order."""
        params = base.page_params(status=status, limit=limit, cursor=cursor)
        path = f"/api/v1/batches/{batch_id}/tasks"
        return TaskPage.model_validate(self._data("GET", path, params=params))

    def iter_batch_tasks(self, batch_id: str, *, status: str | None = None) -> Iterator[Task]:
        cursor: str | None = None
        while True:
            page = self.batch_tasks(batch_id, status=status, limit=100, cursor=cursor)
            yield from page.tasks
            if not page.has_more or page.next_cursor is None:
                return
            cursor = page.next_cursor

    def cancel_batch(self, batch_id: str) -> Batch:
        """Cancel every task of the batch not yet ended (refunded). 409 if it had ended."""
        path = f"/api/v1/batches/{batch_id}/cancel"
        return Batch.model_validate(self._data("POST", path, safe=False))

    def watch_batch(self, batch_id: str, *, timeout: float | None = None) -> Iterator[Batch]:
        """The batch at once, then at every change, ending with its terminal state."""
        deadline = base.deadline_of(timeout)
        for frame in self._follow(f"/api/v1/batches/{batch_id}", "batch", deadline):
            batch = Batch.model_validate(frame)
            yield batch
            if batch.done:
                return

    def wait_batch(self, batch_id: str, *, timeout: float | None = None) -> Batch:
        batch: Batch | None = None
        for seen in self.watch_batch(batch_id, timeout=timeout):
            batch = seen
        assert batch is not None
        return batch

    def download_archive(self, batch_id: str, path: str | os.PathLike[str]) -> Path:
        """Save the batch's ZIP (every finished image and manifest.jsonl) to `path`."""
        return self._save(f"/api/v1/batches/{batch_id}/archive", Path(path), keyed=True)

    # -- streams and files -----------------------------------------------------------------

    def _follow(self, path: str, event: str, deadline: float | None) -> Iterator[dict[str, Any]]:
        """Frames of `path`/events; polling `path` instead while the stream cannot be had
        (refused: 429, the route missing, a proxy that buffers; or the connection drops)."""
        streaming = True
        while True:
            if streaming:
                try:
                    yield from self._stream(path + "/events", event, deadline)
                    # The stream ended without a terminal frame (the server shut down): reconnect
                    # once through a poll, so a server gone for good is noticed.
                except (
                    # A stream refused (the key's cap on open streams, a busy server), a proxy
                    # that breaks it, or no such route: the poll below goes on (and raises
                    # NotFound itself for an unknown id).
                    errors.RateLimited,
                    errors.ServiceUnavailable,
                    errors.NotFound,
                    errors.ConnectionError,
                    errors.ServerError,
                ):
                    streaming = False
            yield self._data("GET", path)
            left = base.remaining(deadline)
            if left is not None and left <= 0:
                raise errors.TimeoutError(f"Still in progress after the wait: GET {path}")
            pause = base.poll_delay(self.poll_interval)
            time.sleep(pause if left is None else max(0.0, min(pause, left)))

    def _stream(self, path: str, event: str, deadline: float | None) -> Iterator[dict[str, Any]]:
        left = base.remaining(deadline)
        read = base.STREAM_READ_TIMEOUT if left is None else max(0.1, min(left, 60.0))
        timeout = httpx.Timeout(self._http.timeout.connect, read=read)
        headers = {**self._headers, "Accept": "text/event-stream"}
        try:
            with self._http.stream(
                "GET", self.base_url + path, headers=headers, timeout=timeout
            ) as response:
                if not response.is_success:
                    response.read()
                    raise base.api_error(response, has_key=self._key is not None)
                decoder = base.SSEDecoder()
                for line in response.iter_lines():
                    frame = base.decode_frame(decoder.feed(line), event)
                    if frame is not None:
                        yield frame
                    left = base.remaining(deadline)
                    if left is not None and left <= 0:
                        raise errors.TimeoutError(f"Still in progress after the wait: {path}")
        except httpx.TimeoutException as exc:
            left = base.remaining(deadline)
            if left is not None and left <= 0:
                raise errors.TimeoutError(f"Still in progress after the wait: {path}") from exc
            # No frame and no keep-alive for a minute: the stream is broken; poll instead.
            raise errors.ConnectionError(f"The event stream {path} went silent.") from exc
        except httpx.TransportError as exc:
            raise base.transport_error(exc, self.base_url) from exc

    def _save(self, url: str, path: Path, *, keyed: bool) -> Path:
        """Stream `url` to `path` (a temporary name, then renamed), retried from the start."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.part")
        absolute = url if base.is_absolute(url) else self.base_url + url
        # The key goes only to this server's API, never to an image URL (which may be a
        # bucket's presigned URL on another host).
        headers = self._headers if keyed else {"User-Agent": base.USER_AGENT}
        attempt = 0
        while True:
            try:
                with self._http.stream("GET", absolute, headers=headers) as response:
                    if not response.is_success:
                        response.read()
                        error = base.api_error(response, has_key=self._key is not None)
                        wait = (
                            self.retry.delay(attempt, error.retry_after)
                            if base.may_retry_status(response.status_code, safe=True)
                            else None
                        )
                        if wait is None:
                            raise error
                    else:
                        with open(partial, "wb") as out:
                            for chunk in response.iter_bytes():
                                out.write(chunk)
                        os.replace(partial, path)
                        return path
            except httpx.TransportError as exc:
                wait = self.retry.delay(attempt)
                if wait is None:
                    partial.unlink(missing_ok=True)
                    raise base.transport_error(exc, self.base_url) from exc
            time.sleep(wait)
            attempt += 1
