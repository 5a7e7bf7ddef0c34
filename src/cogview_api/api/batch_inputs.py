"""Reading a batch's body: a JSON object `{"requests": [...], ...}` or a JSONL upload, one
request per line. Every line is read with the single submit's schema (`GenerationCreate`:
its fields, rules, defaults and messages), and every bad line is reported at once with its
index (InvalidBatch), so the client fixes them all in one round."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from pydantic import ValidationError

from cogview_api.api.batch_schemas import BatchFields
from cogview_api.api.errors import invalid_from_validation
from cogview_api.api.idempotency import idempotency_key
from cogview_api.api.inputs import parse_json_object
from cogview_api.api.schemas import GenerationCreate
from cogview_api.config import Settings
from cogview_api.domain import GenerationRequest
from cogview_api.errors import InvalidBatch, InvalidRequest, LineError
from cogview_api.services.batches import BatchRequest
from cogview_api.services.text import refuse_unstorable_text

SURFACE = "batches"  # the Idempotency-Key hash's surface: a task's key never matches a batch
JSONL_TYPES = frozenset({"application/jsonl", "application/x-ndjson"})
NOT_OBJECT = "A request must be a JSON object (the body of POST /api/v1/images/generations)."


def read_batch(request: Request, raw: bytes, settings: Settings) -> BatchRequest:
    """The batch in the request's body, or InvalidRequest / InvalidBatch; nothing is written."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    errors: list[LineError] = []
    if content_type in JSONL_TYPES:
        items, fields = _jsonl(raw), _query_fields(request)
        hashed: dict[str, Any] = {"jsonl": [item for item, _ in items], **fields}
        lines = items
    elif content_type != "application/json":
        raise InvalidRequest(
            "Content-Type must be application/json, or application/jsonl (also "
            "application/x-ndjson) for one request per line."
        )
    else:
        data = parse_json_object(request, raw)
        requests = data.pop("requests", None)
        if requests is None:
            raise InvalidRequest("Field 'requests' is required.", param="requests")
        if not isinstance(requests, list):
            raise InvalidRequest("Invalid 'requests': it must be an array.", param="requests")
        fields = data
        hashed = {**data, "requests": requests}
        lines = [(item, None if isinstance(item, dict) else NOT_OBJECT) for item in requests]
    _check_count(len(lines), settings)
    try:
        own = BatchFields.model_validate(fields)
    except ValidationError as exc:
        raise invalid_from_validation(exc) from exc
    read: list[GenerationRequest] = []
    for index, (item, problem) in enumerate(lines):
        if problem is not None:
            errors.append(LineError(index=index, param=None, message=problem))
            continue
        try:
            try:
                request_ = GenerationCreate.model_validate(item).to_domain()
            except ValidationError as exc:
                raise invalid_from_validation(exc) from exc
            refuse_unstorable_text(
                prompt=request_.prompt,
                negative_prompt=request_.negative_prompt,
                user_id=request_.user_id,
            )
            read.append(request_)
        except InvalidRequest as bad:
            errors.append(LineError(index=index, param=bad.param, message=bad.message))
    if errors:
        raise InvalidBatch(errors)
    return BatchRequest(
        lines=read,
        callback_url=own.callback_url,
        metadata=own.metadata,
        idempotency=idempotency_key(request, SURFACE, hashed),
    )


def _check_count(count: int, settings: Settings) -> None:
    most = settings.batch_max_requests
    if not 1 <= count <= most:
        raise InvalidRequest(
            f"A batch holds 1 to {most} requests; this one has {count}.", param="requests"
        )


def _jsonl(raw: bytes) -> list[tuple[Any, str | None]]:
    """The upload's requests, one per non-blank line: (its JSON, None), or (None, why the line
    is not a JSON object). Blank lines are not requests and are not counted."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"Request body is not UTF-8 text: {exc}.") from exc
    out: list[tuple[Any, str | None]] = []
    for line in text.split("\n"):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except (ValueError, RecursionError) as exc:
            out.append((None, f"The line is not valid JSON: {exc}."))
            continue
        if not isinstance(item, dict):
            out.append((None, NOT_OBJECT))
            continue
        out.append((item, None))
    return out


def _query_fields(request: Request) -> dict[str, Any]:
    """A JSONL upload's batch fields: `?callback_url=` (metadata is JSON-body only)."""
    unknown = sorted(set(request.query_params) - {"callback_url"})
    if unknown:
        raise InvalidRequest(
            f"Unknown query parameter '{unknown[0]}' (a JSONL upload takes only callback_url).",
            param=unknown[0],
        )
    values = request.query_params.getlist("callback_url")
    if len(values) > 1:
        raise InvalidRequest("callback_url must be given once.", param="callback_url")
    return {"callback_url": values[0]} if values else {}
