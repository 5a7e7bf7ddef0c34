"""`GET /api/v1/info` (public: what the server offers) and `/favicon.ico`, through real HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cogview_api.domain import parse_size
from tests.conftest import make_settings
from tests.support import InProcessApi, auth, in_process_api, submit_task


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path) -> Iterator[InProcessApi]:
    # Prices other than the defaults, to show that the answer follows the settings.
    settings = make_settings(
        tmp_path_factory.mktemp("info"), tiny_cache, price_hd=6, price_standard=3
    )
    with in_process_api(settings) as running:
        yield running


def test_info_needs_no_key_and_follows_the_settings(api: InProcessApi) -> None:
    r = api.client.get("/api/v1/info")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["code"] == 200 and body["message"] == "success"
    data = body["data"]
    assert data["models"][0] == "cogview-4"
    assert data["engine"] == "tiny" and "--model tiny" in data["note"]
    assert data["credits_per_image"] == {"standard": 3, "hd": 6}
    assert data["default_quality"] == "hd"
    assert data["max_prompt_chars"] == 1000 and data["max_images_per_request"] == 4


def test_the_price_it_states_is_the_price_charged(api: InProcessApi) -> None:
    price = api.client.get("/api/v1/info").json()["data"]["credits_per_image"]
    key = api.make_key(credits=100)
    submit_task(api.client, key, quality="standard", n=2)
    balance = api.client.get("/api/v1/account", headers=auth(key)).json()["data"]["balance"]
    assert balance == 100 - 2 * price["standard"]


def test_the_size_rules_it_states_are_the_ones_enforced(api: InProcessApi) -> None:
    rules = api.client.get("/api/v1/info").json()["data"]["sizes"]
    for preset in rules["presets"]:
        parse_size(preset)
    low, high, step = rules["min_side"], rules["max_side"], rules["side_multiple_of"]
    parse_size(f"{low}*{low}")
    for bad in (f"{low - step}*{low}", f"{high + step}*{low}", f"{low + step // 2}*{low}"):
        with pytest.raises(ValueError):
            parse_size(bad)
    with pytest.raises(ValueError, match=str(rules["max_pixels"])):
        parse_size(f"{high}*{high}")


def test_favicon_is_an_icon_not_a_404(api: InProcessApi) -> None:
    r = api.client.get("/favicon.ico")
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/vnd.microsoft.icon"
    assert r.content[:4] == b"\x00\x00\x01\x00"  # an ICO file's header
    svg = api.client.get("/static/favicon.svg")
    assert svg.status_code == 200 and svg.headers["content-type"].startswith("image/svg+xml")
