"""Arbitrary JSON at the submit route: never a 5xx, every error in the envelope, and a
rejected request leaves the balance as it was."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import EXAMPLE_BODY, InProcessApi, auth

FIELDS = [
    "model",
    "prompt",
    "size",
    "quality",
    "negative_prompt",
    "seed",
    "n",
    "output_format",
    "user_id",
    "callback_url",
    "qualty",
    "",
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=False),
    st.text(max_size=40),
    st.sampled_from(["1024*1024", "512x512", "hd", "cogview-4", "png"]),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
bodies = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), values, max_size=6),
    st.builds(
        lambda extra: {**EXAMPLE_BODY, **extra},
        st.dictionaries(st.sampled_from(FIELDS), values, max_size=3),
    ),
    values,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(payload=bodies)
def test_any_json_body_gets_a_documented_answer(api: InProcessApi, payload: Any) -> None:
    # A fresh key every 50 accepted tasks: nothing runs them, and a key may have at most
    # COGVIEW_MAX_WAITING_PER_KEY (100) waiting.
    key, accepted = getattr(api, "_fuzz_key", (None, 0))
    if key is None or accepted >= 50:
        key, accepted = api.make_key(credits=10**9), 0
    before = api.client.get("/api/v1/account", headers=auth(key)).json()["data"]["balance"]
    r = api.client.post(
        "/api/v1/images/generations",
        content=json.dumps(payload),
        headers={**auth(key), "Content-Type": "application/json"},
    )
    assert r.status_code in (200, 400), r.text
    api._fuzz_key = (key, accepted + (r.status_code == 200))  # type: ignore[attr-defined]
    after = api.client.get("/api/v1/account", headers=auth(key)).json()["data"]["balance"]
    if r.status_code == 400:
        err = r.json()["error"]
        assert err["code"] == 400 and err["type"] == "invalid_request" and err["message"]
        assert after == before
    else:
        assert r.json()["data"]["status"] == "IN_PROGRESS"
        assert before - after == r.json()["data"]["credits_charged"] > 0
