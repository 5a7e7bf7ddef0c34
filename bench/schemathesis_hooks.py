"""schemathesis hooks for `bench/schemathesis_deep.py` (loaded through SCHEMATHESIS_HOOKS):
a serializer for the batch route's JSON Lines body (`application/jsonl`), which schemathesis
has none of, so the examples phase sends it instead of erroring on it."""

from __future__ import annotations

import json
from typing import Any

import schemathesis


@schemathesis.serializer("application/jsonl")
def json_lines(ctx: Any, value: Any) -> bytes:
    """The described body is a string of lines, sent as it is; anything else generated for it
    (negative data) as one JSON value a line."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    values = value if isinstance(value, list) else [value]
    return "".join(json.dumps(v) + "\n" for v in values).encode()
