"""A database that cannot take writes answers 503 with Retry-After, charges nothing, and
recovers without a restart (issue: hardening, finding 6: submits answered 500). The faults are
the databases' own: SQLite's max_page_count (its "database or disk is full", as from a full
disk) and PostgreSQL's default_transaction_read_only (as on a standby or a read-only volume)."""

from __future__ import annotations

from tests.api.test_bad_input import assert_error
from tests.support import EXAMPLE_BODY, InProcessApi, auth, unwritable


def test_an_unwritable_database_is_503_charges_nothing_and_recovers(api: InProcessApi) -> None:
    key = api.make_key(credits=40)
    # Enough tasks that SQLite needs new pages for the next one.
    for _ in range(3):
        r = api.client.post("/api/v1/images/generations", json=EXAMPLE_BODY, headers=auth(key))
        assert r.status_code == 200, r.text
    with unwritable(api.db):
        for _ in range(20):
            big = {**EXAMPLE_BODY, "prompt": "a lighthouse " * 70}
            r = api.client.post("/api/v1/images/generations", json=big, headers=auth(key))
            if r.status_code != 200:
                break
        assert_error(r, 503, "service_unavailable")
        assert r.headers["retry-after"].isdigit()
        assert "writes" in r.json()["error"]["message"]
        account = api.client.get("/api/v1/account", headers=auth(key)).json()["data"]
        charged = 40 - account["balance"]
    listed = api.client.get("/api/v1/tasks", headers=auth(key), params={"limit": 100}).json()
    assert charged == 4 * len(listed["data"]["tasks"])  # every charge has its task
    r = api.client.post("/api/v1/images/generations", json=EXAMPLE_BODY, headers=auth(key))
    assert r.status_code == 200, r.text  # recovered, same process
