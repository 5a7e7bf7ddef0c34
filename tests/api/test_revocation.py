"""Revoking a key ends what it has under way (issue: hardening, finding 8): its waiting and
running tasks are cancelled with a refund in the revoking transaction, its open event stream
ends and its `Prefer: wait` request answers 403 within a second or so."""

from __future__ import annotations

import threading
import time

import httpx

from cogview_api.domain import TaskState
from cogview_api.services import keys as key_service
from cogview_api.store import tasks as task_store
from tests.api.test_bad_input import assert_error
from tests.support import EXAMPLE_BODY, InProcessApi, auth, submit_task

PRICE_HD = 4


def _key_id(api: InProcessApi, name: str) -> str:
    return next(k.id for k in key_service.list_keys(api.db) if k.name == name)


def test_revoking_cancels_the_keys_tasks_with_a_refund(api: InProcessApi) -> None:
    key = api.make_key(credits=40, name="gone")
    other = api.make_key(credits=40, name="stays")
    ids = [submit_task(api.client, key) for _ in range(2)]
    kept = submit_task(api.client, other)
    key_service.revoke_key(api.db, _key_id(api, "gone"))
    with api.db.read() as conn:
        tasks = [task_store.get_task(conn, i) for i in ids]
        assert task_store.get_task(conn, kept).state is TaskState.QUEUED
    assert [t.state for t in tasks] == [TaskState.CANCELLED] * 2
    assert all(t.credits_refunded == t.credits_charged == PRICE_HD for t in tasks)
    assert all(t.error_message == key_service.REVOKED_MESSAGE for t in tasks)
    (revoked,) = [k for k in key_service.list_keys(api.db) if k.name == "gone"]
    assert revoked.balance == 40
    r = api.client.get(f"/api/v1/tasks/{ids[0]}", headers=auth(key))
    assert_error(r, 403, "permission_denied")


def test_an_open_stream_and_a_wait_end_soon_after_the_revoke(api: InProcessApi) -> None:
    key = api.make_key(credits=40, name="gone")
    task_id = submit_task(api.client, key)
    ended: dict[str, float] = {}
    waited: list[httpx.Response] = []

    def follow() -> None:
        path = f"/api/v1/tasks/{task_id}/events"
        with (
            httpx.Client(base_url=api.base_url, timeout=30) as c,
            c.stream("GET", path, headers=auth(key)) as r,
        ):
            for _ in r.iter_lines():
                pass
        ended["stream"] = time.monotonic()

    def wait() -> None:
        with httpx.Client(base_url=api.base_url, timeout=30) as c:
            waited.append(
                c.post(
                    "/api/v1/images/generations",
                    json=EXAMPLE_BODY,
                    headers={**auth(key), "Prefer": "wait=30"},
                )
            )
        ended["wait"] = time.monotonic()

    threads = [threading.Thread(target=follow), threading.Thread(target=wait)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # both under way
    assert ended == {}
    revoked_at = time.monotonic()
    key_service.revoke_key(api.db, _key_id(api, "gone"))
    for t in threads:
        t.join(timeout=10)
    assert set(ended) == {"stream", "wait"}
    assert max(ended.values()) - revoked_at < 5
    (answer,) = waited
    assert_error(answer, 403, "permission_denied")
