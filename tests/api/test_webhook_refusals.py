"""Without an operator allow-list, a callback_url on loopback is refused at submit like any
other internal address: 400 on `callback_url`, nothing written, nothing charged. So is a host
that is no host name; an idempotent retry is answered with its task whatever DNS says now."""

from __future__ import annotations

import socket

import pytest

from cogview_api import addresses
from tests.support import EXAMPLE_BODY, InProcessApi, auth


def test_loopback_callback_is_refused_without_the_allow_list(api: InProcessApi) -> None:
    key = api.make_key(credits=100)
    for url in (f"{api.base_url}/hook", "http://localhost:9/hook"):
        r = api.client.post(
            "/api/v1/images/generations",
            json={**EXAMPLE_BODY, "callback_url": url},
            headers=auth(key),
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "callback_url"
        assert "loopback" in r.json()["error"]["message"]
    assert api.client.get("/api/v1/account", headers=auth(key)).json()["data"]["balance"] == 100
    assert api.client.get("/api/v1/tasks", headers=auth(key)).json()["data"]["tasks"] == []


def test_a_malformed_callback_host_is_a_400_not_a_500(api: InProcessApi) -> None:
    key = api.make_key(credits=100)
    for url in ("http://a..b/hook", f"http://{'x' * 64}.example/hook"):
        r = api.client.post(
            "/api/v1/images/generations",
            json={**EXAMPLE_BODY, "callback_url": url},
            headers=auth(key),
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"]["type"] == "invalid_request"
        assert r.json()["error"]["param"] == "callback_url"
    assert api.client.get("/api/v1/account", headers=auth(key)).json()["data"]["balance"] == 100


def test_an_idempotent_retry_gets_its_task_while_the_callback_host_no_longer_resolves(
    api: InProcessApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The callback is checked for a task about to be created, not for a replay of one."""
    key = api.make_key(credits=100)
    body = {**EXAMPLE_BODY, "callback_url": "https://hooks.example/done"}
    headers = {**auth(key), "Idempotency-Key": "order-7"}
    monkeypatch.setattr(addresses, "system_resolve", lambda host, port: ["93.184.215.14"])
    first = api.client.post("/api/v1/images/generations", json=body, headers=headers)
    assert first.status_code == 200 and "idempotent-replayed" not in first.headers, first.text

    def dns_down(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(addresses, "system_resolve", dns_down)
    again = api.client.post("/api/v1/images/generations", json=body, headers=headers)
    assert again.status_code == 200, again.text
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["data"]["task_id"] == first.json()["data"]["task_id"]
    fresh = api.client.post(  # a new task is still checked
        "/api/v1/images/generations", json=body, headers={**auth(key), "Idempotency-Key": "o-8"}
    )
    assert fresh.status_code == 400 and "does not resolve" in fresh.text, fresh.text
