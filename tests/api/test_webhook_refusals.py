"""Without an operator allow-list, a callback_url on loopback is refused at submit like any
other internal address: 400 on `callback_url`, nothing written, nothing charged."""

from __future__ import annotations

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
