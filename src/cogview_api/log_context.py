"""What a log line is about: the request id and the task id, carried in context variables.

The API's middleware binds the request id of each request; the worker binds the task id and the
request id that created the task while it works on that task. `ContextFilter`, installed on the
log handler, copies both onto every record, so any module's logger carries them without being
passed them. Context variables follow a request into FastAPI's thread pool and into anyio tasks,
and stay apart between the worker threads of one process.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

request_id_var: ContextVar[str | None] = ContextVar("cogview_request_id", default=None)
task_id_var: ContextVar[str | None] = ContextVar("cogview_task_id", default=None)

# An incoming X-Request-ID is kept when it is 1..128 of these characters (UUIDs, ULIDs, hex,
# base64, a proxy's "host:counter"); anything else is replaced by ours, so a client can neither
# break a log line (spaces, quotes, control characters) nor flood it.
REQUEST_ID_MAX = 128
_VALID_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:+/=-]{1,128}")


def valid_request_id(raw: bytes | None) -> str | None:
    """`raw` as a request id if it is one we keep, else None."""
    if raw is None or _VALID_REQUEST_ID.fullmatch(raw) is None:
        return None
    return raw.decode("ascii")


def current_request_id() -> str | None:
    return request_id_var.get()


@contextmanager
def task_context(task_id: str, request_id: str | None) -> Iterator[None]:
    """Log lines inside are about this task (and the request that created it)."""
    task_token = task_id_var.set(task_id)
    request_token = request_id_var.set(request_id)
    try:
        yield
    finally:
        request_id_var.reset(request_token)
        task_id_var.reset(task_token)


class ContextFilter(logging.Filter):
    """Puts `request_id` and `task_id` on every record (None where unknown)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        if not hasattr(record, "task_id"):
            record.task_id = task_id_var.get()
        return True


class TextFormatter(logging.Formatter):
    """The plain-text line; its format may name `%(context)s`: ` [request_id=... task_id=...]`
    when the record is about a request or a task, else nothing."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        ids = [
            f"{name}={value}"
            for name in ("request_id", "task_id")
            if (value := getattr(record, name, None))
        ]
        record.context = f" [{' '.join(ids)}]" if ids else ""
        return super().formatMessage(record)
