"""Opaque page cursors: a row's ordinal behind a prefix naming the list it belongs to, so a
cursor of one list handed to another is refused rather than misread."""

from __future__ import annotations

import base64
import binascii

from cogview_api.errors import InvalidRequest


def encode_cursor(prefix: str, ordinal: int) -> str:
    return base64.urlsafe_b64encode(f"{prefix}:{ordinal}".encode()).decode().rstrip("=")


def decode_cursor(prefix: str, cursor: str) -> int:
    """The ordinal of a cursor made by `encode_cursor(prefix, ...)`; InvalidRequest otherwise."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        found, _, value = raw.partition(":")
        # ASCII digits, within a 64-bit column (SQLite refuses a bigger bind).
        if found != prefix or not (value.isascii() and value.isdigit()) or len(value) > 19:
            raise ValueError(raw)
        ordinal = int(value)
        if ordinal >= 2**63:
            raise ValueError(raw)
        return ordinal
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidRequest("cursor is not valid", param="cursor") from exc


def check_limit(limit: int, most: int = 100) -> None:
    if not 1 <= limit <= most:
        raise InvalidRequest(f"limit must be between 1 and {most}", param="limit")
