"""Absolute URLs never come from a Host header the operator did not trust (issue: hardening,
finding 10: image URLs were built from whatever Host the client sent). Without
COGVIEW_PUBLIC_URL a request for another host is a 400 in the surface's envelope and writes
nothing; the probes answer whatever the Host."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cogview_api.config import Settings
from tests.api.test_bad_input import assert_error, assert_nothing_written
from tests.support import EXAMPLE_BODY, InProcessApi, auth, background_worker, in_process_api

EVIL = {"Host": "evil.example"}


def test_an_untrusted_host_is_400_on_every_surface_and_writes_nothing(api: InProcessApi) -> None:
    key = api.make_key(credits=40)
    for path in ("/api/v1/images/generations", "/v1/images/generations"):
        r = api.client.post(path, json=EXAMPLE_BODY, headers={**auth(key), **EVIL})
        assert r.status_code == 400, r.text
        assert "evil.example" in r.text
    r = api.client.post(
        "/api/v1/images/generations", json=EXAMPLE_BODY, headers={**auth(key), **EVIL}
    )
    assert_error(r, 400, "invalid_request", "Host")
    assert_nothing_written(api, key, 40)
    r = api.client.post(
        "/api/paas/v4/images/generations", json=EXAMPLE_BODY, headers={**auth(key), **EVIL}
    )
    assert r.status_code == 400 and "evil.example" in r.json()["error"]["message"]
    for probe in ("/healthz", "/readyz"):
        assert api.client.get(probe, headers=EVIL).status_code in (200, 503)
    # The server's own address, with or without its port, and localhost, are answered.
    port = api.base_url.rsplit(":", 1)[1]
    for host in (f"127.0.0.1:{port}", "127.0.0.1", f"localhost:{port}", f"[::1]:{port}"):
        assert api.client.get("/api/v1/account", headers={**auth(key), "Host": host}).is_success


@pytest.fixture
def trusting(settings: Settings) -> Iterator[InProcessApi]:
    trusted = settings.model_copy(update={"trusted_hosts": "images.example.com, Other.Example"})
    with in_process_api(trusted) as running:
        yield running


def test_a_trusted_host_is_answered_and_its_urls_point_there(trusting: InProcessApi) -> None:
    key = trusting.make_key(credits=40)
    host = {"Host": "images.example.com:8443"}
    with background_worker(trusting):
        r = trusting.client.post(
            "/api/v1/images/generations",
            json=EXAMPLE_BODY,
            headers={**auth(key), **host, "Prefer": "wait=30"},
        )
    assert r.status_code == 200, r.text
    (image,) = r.json()["data"]["images"]
    assert image["url"].startswith("http://images.example.com:8443/images/")
    r = trusting.client.get("/api/v1/account", headers={**auth(key), "Host": "other.example"})
    assert r.is_success, r.text
    r = trusting.client.get("/api/v1/account", headers={**auth(key), "Host": "127.0.0.1"})
    assert_error(r, 400, "invalid_request", "Host")  # a list replaces the default


def test_with_a_public_url_any_host_is_answered_and_urls_use_the_public_url(
    settings: Settings, tmp_path: Path
) -> None:
    public = settings.model_copy(update={"public_url": "https://img.example.net"})
    with in_process_api(public) as api:
        key = api.make_key(credits=40)
        with background_worker(api):
            r = api.client.post(
                "/api/v1/images/generations",
                json=EXAMPLE_BODY,
                headers={**auth(key), **EVIL, "Prefer": "wait=30"},
            )
        assert r.status_code == 200, r.text
        (image,) = r.json()["data"]["images"]
        assert image["url"].startswith("https://img.example.net/images/")
