"""Per-key limits: the settings' defaults, a key's own values over them, and setting those.

The limits: the submit rate and burst and the waiting tasks (held by services/generation.py),
and the caps on open event streams and waiting `Prefer: wait` requests (held by
services/follow_limits.py). Used by the CLI (`cogview-api keys limits`, and its older
`keys follow-limits` for the two caps) and the admin API (`/admin/v1/keys/{id}/limits`): each
reads and sets a key's limits here, with the same checks.
Given an `actor` (the admin token's name, or `cli:<user>`), a read or a change writes its audit
row in the same transaction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cogview_api.config import Settings
from cogview_api.domain import MIN_SUBMIT_RATE, ApiKey
from cogview_api.errors import InvalidRequest
from cogview_api.store import audit as audit_store
from cogview_api.store import keys as key_store
from cogview_api.store.db import Database

# The bounds of a key's own values: those of the settings (config.py), and the integer column.
MAX_SUBMIT_RATE = 1_000_000.0
MAX_SUBMIT_BURST = 1_000_000
MAX_WAITING = 2**31 - 1
# Highest own cap on open streams or waits: far more than any client holds open, as the settings.
MAX_OWN_CAP = 100_000

NAMES = ("submit_rate", "submit_burst", "max_waiting", "max_streams", "max_waits")


@dataclass(frozen=True)
class KeyLimits:
    """A key's limits in effect: its own values where it has them, else the settings'.
    `submit_rate` 0: no submit rate limit. `own`: the names of the values that are the key's."""

    key_id: str
    submit_rate: float
    submit_burst: int
    max_waiting: int
    max_streams: int
    max_waits: int
    own: frozenset[str]


def effective_limits(settings: Settings, key: ApiKey) -> KeyLimits:
    own = {name for name in NAMES if getattr(key, name) is not None}
    return KeyLimits(
        key_id=key.id,
        submit_rate=settings.submit_rate if key.submit_rate is None else key.submit_rate,
        submit_burst=settings.submit_burst if key.submit_burst is None else key.submit_burst,
        max_waiting=settings.max_waiting_per_key if key.max_waiting is None else key.max_waiting,
        max_streams=settings.max_streams_per_key if key.max_streams is None else key.max_streams,
        max_waits=settings.max_waits_per_key if key.max_waits is None else key.max_waits,
        own=frozenset(own),
    )


def key_limits(
    db: Database, settings: Settings, key_id: str, *, actor: str | None = None
) -> KeyLimits:
    """The key's limits in effect. NotFound for an unknown key."""
    if actor is None:
        with db.read() as conn:
            return effective_limits(settings, key_store.get_key(conn, key_id))
    with db.write() as conn:
        key = key_store.get_key(conn, key_id)
        audit_store.record(conn, actor=actor, action="keys.limits.get", key_id=key_id)
        return effective_limits(settings, key)


def set_key_limits(
    db: Database,
    settings: Settings,
    key_id: str,
    *,
    submit_rate: float | None = None,
    submit_burst: int | None = None,
    max_waiting: int | None = None,
    max_streams: int | None = None,
    max_waits: int | None = None,
    reset: bool | frozenset[str] = False,
    actor: str | None = None,
) -> KeyLimits:
    """Give the key its own values for the limits named (the others keep theirs), or with
    `reset`, drop all its own values (it follows the settings again). `reset` may instead name
    the limits to drop, beside new values for others (`keys follow-limits --reset`). They hold
    from the key's next submit (the caps: its next stream or wait), on every replica; a new rate
    or burst (or a reset) starts the key with a full burst. Returns the limits in effect;
    InvalidRequest for a value out of range (or values given with `reset`), NotFound for an
    unknown key."""
    values = {
        "submit_rate": submit_rate,
        "submit_burst": submit_burst,
        "max_waiting": max_waiting,
        "max_streams": max_streams,
        "max_waits": max_waits,
    }
    given = {name: value for name, value in values.items() if value is not None}
    dropped = frozenset(NAMES if reset is True else reset or ())
    if dropped & given.keys():
        raise InvalidRequest("Give either new limits or reset, not both.", param="reset")
    if submit_rate is not None and not (
        math.isfinite(submit_rate)
        and (submit_rate == 0 or MIN_SUBMIT_RATE <= submit_rate <= MAX_SUBMIT_RATE)
    ):
        raise InvalidRequest(
            f"The submit rate must be 0 (no limit) or from {MIN_SUBMIT_RATE:g} to "
            f"{MAX_SUBMIT_RATE:g} a second.",
            param="submit_rate",
        )
    if submit_burst is not None and not 1 <= submit_burst <= MAX_SUBMIT_BURST:
        raise InvalidRequest(
            f"The burst must be from 1 to {MAX_SUBMIT_BURST} submits.", param="submit_burst"
        )
    if max_waiting is not None and not 1 <= max_waiting <= MAX_WAITING:
        raise InvalidRequest(
            f"The waiting tasks limit must be from 1 to {MAX_WAITING}.", param="max_waiting"
        )
    for name, value in (("max_streams", max_streams), ("max_waits", max_waits)):
        if value is not None and not 1 <= value <= MAX_OWN_CAP:
            raise InvalidRequest(
                f"The {name.replace('_', ' ')} must be from 1 to {MAX_OWN_CAP}; got {value}.",
                param=name,
            )
    with db.write() as conn:
        changes: dict[str, object] = {**dict.fromkeys(dropped), **given}
        if {"submit_rate", "submit_burst"} & changes.keys():
            # The key's rate state was kept in the old rate's terms: a slow rate's TAT can lie
            # hours ahead and would hold a faster new rate (or the defaults) back as long. A new
            # rate starts the key afresh, with its full burst.
            changes["submit_tat"] = None
        key = (
            key_store.set_limits(conn, key_id, changes)
            if changes
            else key_store.get_key(conn, key_id)
        )
        if actor is not None:
            action = "keys.limits.reset" if dropped else "keys.limits.set"
            if not changes:
                action = "keys.limits.get"
            audit_store.record(
                conn, actor=actor, action=action, key_id=key_id, detail=given or None
            )
        return effective_limits(settings, key)
