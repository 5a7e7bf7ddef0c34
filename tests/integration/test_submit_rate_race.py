"""The submit rate under concurrent submits of one key (each its own connection and
transaction, as replicas make them): exactly `burst` are admitted at one instant, never more."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from cogview_api.errors import RateLimited
from cogview_api.services import keys as key_service
from cogview_api.store import ratelimit as rate_store
from cogview_api.store.db import Database

NOW = 1_800_000_000.0


def test_concurrent_submits_of_one_key_admit_exactly_the_burst(db: Database) -> None:
    key, _ = key_service.create_key(db, name="k", credits=0)
    limit = rate_store.SubmitRate(rate=2.0, burst=5)

    def submit(_: int) -> bool:
        try:
            with db.write() as conn:
                rate_store.take_submit(conn, key_id=key.id, limit=limit, now=NOW)
        except RateLimited:
            return False
        return True

    with ThreadPoolExecutor(max_workers=6) as pool:
        admitted = list(pool.map(submit, range(16)))
    assert sum(admitted) == 5
    with db.write() as conn:  # half a second later: one more, at 1/rate
        state = rate_store.take_submit(conn, key_id=key.id, limit=limit, now=NOW + 0.5)
    assert (state.remaining, state.reset, state.window) == (0, 3, 3)
