"""The per-key submit rate: GCRA (the generic cell rate algorithm) over one column of the key's
row, so every API replica over the database enforces the same rate.

A key may submit `rate` times a second, and up to `burst` at once after a quiet spell. Its row
keeps the "theoretical arrival time" (TAT) of its next submit: each admitted submit moves it
to max(TAT, now) + 1/rate, and a submit is admitted while TAT <= now + (burst - 1)/rate. That is
one conditional UPDATE in the submit's own transaction: a refused or rolled-back submit moves
nothing, and concurrent submits of one key queue on the row's lock (which the credit
reservation takes anyway), so they never both pass on one stale TAT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sqlalchemy import BindParameter, Connection, Double, bindparam, case, func, select, update

from cogview_api.errors import LimitState, RateLimited
from cogview_api.store.tables import api_keys

SUBMITS = "submits"  # the policy's name in the RateLimit headers

_tat = api_keys.c.submit_tat
_now: BindParameter[float] = bindparam("now", type_=Double())
_TAKE = (
    update(api_keys)
    .where(
        api_keys.c.id == bindparam("key_id"),
        func.coalesce(_tat, 0.0) <= bindparam("latest", type_=Double()),
    )
    .values(
        submit_tat=case((_tat > _now, _tat), else_=_now) + bindparam("interval", type_=Double())
    )
    .returning(_tat)
)
_TAT = select(_tat).where(api_keys.c.id == bindparam("key_id"))
# Float slack: `burst` submits at one instant must all pass, whatever the rounding of 1/rate.
_EPSILON = 1e-9


@dataclass(frozen=True)
class SubmitRate:
    """A key's effective submit rate: `rate` a second, `burst` at once."""

    rate: float
    burst: int

    @property
    def interval(self) -> float:
        return 1.0 / self.rate

    @property
    def window(self) -> int:
        """Seconds to earn a whole burst back: the policy's window `w`."""
        return max(1, math.ceil(self.burst / self.rate - _EPSILON))


def take_submit(conn: Connection, *, key_id: str, limit: SubmitRate, now: float) -> LimitState:
    """Count one submit of the key against its rate, in the caller's transaction. Returns the
    limit's state after it; raises RateLimited (nothing written) when the key is over it."""
    interval = limit.interval
    latest = now + (limit.burst - 1) * interval + _EPSILON
    tat = conn.execute(
        _TAKE, {"key_id": key_id, "now": now, "latest": latest, "interval": interval}
    ).scalar_one_or_none()
    if tat is not None:
        remaining = math.floor((now + limit.burst * interval - tat) / interval + _EPSILON)
        return _state(limit, tat, now, max(0, remaining))
    tat = float(conn.execute(_TAT, {"key_id": key_id}).scalar_one())
    state = _state(limit, tat, now, 0)
    wait = max(1, math.ceil(tat - now - (limit.burst - 1) * interval - _EPSILON))
    raise RateLimited(
        f"This key may submit {limit.rate:g} times a second, {limit.burst} at most at once; "
        f"submit again in {wait} s.",
        retry_after=wait,
        limits=(state,),
    )


def _state(limit: SubmitRate, tat: float, now: float, remaining: int) -> LimitState:
    return LimitState(
        name=SUBMITS,
        quota=limit.burst,
        window=limit.window,
        remaining=remaining,
        reset=max(0, math.ceil(tat - now - _EPSILON)),
    )
