"""Retries of the synchronous OpenAI and Zhipu routes: what marks a request as an SDK's retry.

A client whose timeout is shorter than the generation retries the same body; the retry joins
the first request's task (charged once) and is answered with its result, marked
`Idempotent-Replayed: true` as an Idempotency-Key replay is. Rule in docs/api.md, "Retries".
"""

from __future__ import annotations

from typing import Any

from fastapi import Request

from cogview_api.api.idempotency import request_hash
from cogview_api.services.generation import RetryMatch

# The OpenAI SDKs (Python, Node, and the other Stainless-built ones) number their attempts:
# 0 on the first, 1 and up on each retry.
RETRY_COUNT_HEADER = "X-Stainless-Retry-Count"


def retry_match(request: Request, surface: str, body: dict[str, Any]) -> RetryMatch:
    """The request's body hash and whether it carries a retry marker. A malformed count is no
    marker (the header is the SDK's, not part of our API, so it is never refused)."""
    count = request.headers.get(RETRY_COUNT_HEADER, "").strip()
    marked = count.isascii() and count.isdigit() and int(count) >= 1
    return RetryMatch(request_hash=request_hash(surface, body), marked=marked)
