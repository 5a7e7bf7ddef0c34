"""The one clock: aware UTC datetimes, as the store keeps them and every deadline compares.

A leaf: stdlib only, so the store, the queue, the worker and the API's image URLs all read the
same time without importing each other.
"""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)
