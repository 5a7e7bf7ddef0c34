"""The `Idempotency-Key` request header: its rules, and the hash that ties it to one request.

A retry with the same key and the same request within 24 h gets the task the first request
created (charged once), marked by the `Idempotent-Replayed: true` response header (Stripe's
name); the same key with another request is 409 conflict. Rules in docs/api.md.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from fastapi import Request

from cogview_api.errors import InvalidRequest
from cogview_api.services.generation import IdempotencyKey

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_CHARS = 255

# How /openapi.json describes the request header and the answer's header.
OPENAPI_PARAMETER = {
    "name": HEADER,
    "in": "header",
    "required": False,
    "description": "Makes retries safe: the same key and body within 24 h answer with the same "
    "task, charged once (`Idempotent-Replayed: true`); another body is 409.",
    "schema": {
        "type": "string",
        "minLength": 1,
        "maxLength": MAX_KEY_CHARS,
        "pattern": "^[!-~]([ -~]*[!-~])?$",  # printable ASCII; HTTP drops outer spaces
    },
}
OPENAPI_ANSWER_HEADER = {
    REPLAYED_HEADER: {
        "description": "`true` when an earlier request with this Idempotency-Key made the task.",
        "schema": {"type": "string", "enum": ["true"]},
    }
}


def idempotency_key(request: Request, surface: str, body: dict[str, Any]) -> IdempotencyKey | None:
    """The request's Idempotency-Key with the hash of (surface, body), or None without one.

    The body is hashed in a canonical form (keys sorted, no whitespace), so a retry that
    serializes the same object differently still matches; a field added, dropped or changed
    (even to its default value) makes it another request. Raises InvalidRequest for a key
    that is empty, longer than 255 characters or not printable ASCII.
    """
    values = request.headers.getlist(HEADER)
    if not values:
        return None
    value = values[0]
    if len(values) > 1 or not 1 <= len(value) <= MAX_KEY_CHARS or not _printable_ascii(value):
        raise InvalidRequest(
            f"{HEADER} must be one value of 1 to {MAX_KEY_CHARS} printable ASCII characters.",
            param=HEADER,
        )
    return IdempotencyKey(value=value, request_hash=request_hash(surface, body))


def request_hash(surface: str, body: dict[str, Any]) -> str:
    """sha256 hex of the surface and the body in a canonical form (keys sorted, no whitespace)."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))  # ASCII: \u escapes
    return hashlib.sha256(f"{surface}\n{canonical}".encode()).hexdigest()


def _printable_ascii(value: str) -> bool:
    return all(" " <= ch <= "~" for ch in value)
