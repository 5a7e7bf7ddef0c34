"""The one clock: aware UTC datetimes, as the store keeps them and every deadline compares.

A leaf: stdlib only, so the store, the queue, the worker and the API's image URLs all read the
same time without importing each other.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)


def epoch_seconds() -> float:
    """Seconds since the epoch, for the per-key submit rate (every replica compares its own
    clock with the time stored in the database, so their clocks must agree, as NTP keeps them).
    Callers read it as `clock.epoch_seconds()`, so a test can move it."""
    return time.time()
