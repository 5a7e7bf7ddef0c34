"""Cancelling tasks through the HTTP API: refunds, conflicts, other keys' tasks."""

from __future__ import annotations

from typing import Any

import httpx

from cogview_api.services import keys as key_service
from cogview_api.store import keys as key_store
from tests.support import InProcessApi, auth, complete_next_task, submit_task


def cancel(api: InProcessApi, key: str, task_id: str) -> httpx.Response:
    return api.client.post(f"/api/v1/tasks/{task_id}/cancel", headers=auth(key))


def get(api: InProcessApi, key: str, task_id: str) -> dict[str, Any]:
    r = api.client.get(f"/api/v1/tasks/{task_id}", headers=auth(key))
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()["data"]
    return data


def account(api: InProcessApi, key: str) -> dict[str, Any]:
    data: dict[str, Any] = api.client.get("/api/v1/account", headers=auth(key)).json()["data"]
    return data


def test_cancel_while_queued_refunds_at_once(api: InProcessApi) -> None:
    key = api.make_key(credits=40)
    task_id = submit_task(api.client, key, n=2)
    assert account(api, key)["balance"] == 32
    r = cancel(api, key, task_id)
    assert r.status_code == 200, r.text
    assert r.json()["code"] == 200 and r.json()["message"] == "success"
    task = r.json()["data"]
    assert task["task_id"] == task_id and task["status"] == "CANCELLED"
    assert task["error"] == {
        "code": 499,
        "type": "cancelled",
        "message": "Cancelled by the client.",
        "param": None,
    }
    assert task["credits"] == {"charged": 8, "refunded": 8}
    assert task["images"] == [] and task["completed_at"] is not None
    assert task["progress"]["queue_position"] is None
    assert get(api, key, task_id) == task
    acct = account(api, key)
    assert acct["balance"] == 40 and acct["credits_spent"] == 0
    with api.db.read() as conn:
        assert key_store.ledger_sum(conn, acct["key_id"]) == 40
    listed = api.client.get("/api/v1/tasks?status=cancelled", headers=auth(key)).json()["data"]
    assert [t["task_id"] for t in listed["tasks"]] == [task_id]


def test_cancelling_twice_is_a_conflict_and_refunds_once(api: InProcessApi) -> None:
    key = api.make_key(credits=40)
    task_id = submit_task(api.client, key)
    assert cancel(api, key, task_id).status_code == 200
    r = cancel(api, key, task_id)
    assert r.status_code == 409
    assert r.json()["error"]["type"] == "conflict"
    assert "CANCELLED" in r.json()["error"]["message"]
    assert account(api, key)["balance"] == 40


def test_tasks_behind_a_cancelled_one_move_up(api: InProcessApi) -> None:
    key = api.make_key(credits=40)
    first, second = submit_task(api.client, key), submit_task(api.client, key)
    assert get(api, key, second)["progress"]["queue_position"] == 2
    cancel(api, key, first)
    assert get(api, key, second)["progress"]["queue_position"] == 1


def test_another_keys_task_or_an_unknown_one_is_not_found(api: InProcessApi) -> None:
    owner, other = api.make_key(credits=40, name="owner"), api.make_key(credits=40, name="other")
    task_id = submit_task(api.client, owner)
    for key, target in ((other, task_id), (owner, "nope_cv4")):
        r = cancel(api, key, target)
        assert r.status_code == 404
        assert r.json()["error"]["type"] == "not_found"
    assert get(api, owner, task_id)["status"] == "IN_PROGRESS"
    assert account(api, owner)["balance"] == 36
    assert api.client.post(f"/api/v1/tasks/{task_id}/cancel").status_code == 401


def test_a_completed_task_cannot_be_cancelled(api: InProcessApi) -> None:
    secret = api.make_key(credits=40)
    task_id = submit_task(api.client, secret, size="768*1344")
    complete_next_task(api)
    r = cancel(api, secret, task_id)
    assert r.status_code == 409
    assert r.json()["error"] == {
        "code": 409,
        "type": "conflict",
        "message": "The task is already COMPLETED; only a task in progress can be cancelled.",
        "param": None,
    }
    task = get(api, secret, task_id)
    assert task["status"] == "COMPLETED" and len(task["images"]) == 1
    assert task["credits"] == {"charged": 4, "refunded": 0} and task["error"] is None
    assert account(api, secret)["balance"] == 36
    key = key_service.authenticate(api.db, secret)
    with api.db.read() as conn:
        assert key_store.ledger_sum(conn, key.id) == 36
