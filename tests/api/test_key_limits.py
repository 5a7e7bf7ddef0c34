"""One key cannot starve the others (issue: hardening, finding 2: while one key flooded,
another with nothing queued got "queue is full" on a quarter of its submits). A key over its
waiting tasks gets 429 with Retry-After in its surface's envelope, charged nothing; while the
whole queue is full, a key under its equal share of it is still admitted."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cogview_api.config import Settings
from tests.api.test_bad_input import assert_error
from tests.support import EXAMPLE_BODY, InProcessApi, auth, in_process_api

SUBMIT = "/api/v1/images/generations"


@pytest.fixture
def limited(settings: Settings) -> Iterator[InProcessApi]:
    small = settings.model_copy(update={"max_queue": 4, "max_waiting_per_key": 3})
    with in_process_api(small) as running:
        yield running


def _submit(api: InProcessApi, key: str, path: str = SUBMIT) -> int:
    return api.client.post(path, json=EXAMPLE_BODY, headers=auth(key)).status_code


def test_a_key_over_its_waiting_tasks_gets_429_and_pays_nothing(limited: InProcessApi) -> None:
    a, b = limited.make_key(credits=100, name="a"), limited.make_key(credits=100, name="b")
    assert [_submit(limited, a) for _ in range(3)] == [200, 200, 200]
    r = limited.client.post(SUBMIT, json=EXAMPLE_BODY, headers=auth(a))
    assert_error(r, 429, "rate_limit_exceeded")
    assert r.headers["retry-after"].isdigit()
    assert "3 tasks waiting" in r.json()["error"]["message"]
    account = limited.client.get("/api/v1/account", headers=auth(a)).json()["data"]
    assert account["balance"] == 100 - 3 * 4
    openai = limited.client.post("/v1/images/generations", json=EXAMPLE_BODY, headers=auth(a))
    assert openai.status_code == 429
    assert openai.json()["error"]["code"] == "rate_limit_exceeded"
    zhipu = limited.client.post(
        "/api/paas/v4/images/generations", json=EXAMPLE_BODY, headers=auth(a)
    )
    assert zhipu.status_code == 429 and zhipu.json()["error"]["code"] == "1302"
    assert _submit(limited, b) == 200  # another key is not held up


def test_a_full_queue_still_admits_a_key_under_its_share(limited: InProcessApi) -> None:
    a, b, c = (limited.make_key(credits=100, name=n) for n in "abc")
    assert [_submit(limited, a) for _ in range(3)] + [_submit(limited, c)] == [200] * 4
    # The queue holds 4 = max_queue. b has nothing waiting: its share of 4 among 3 keys is 1.
    assert _submit(limited, b) == 200
    # c has 1 waiting, its share (4 // 3 = 1): the queue is full for it.
    r = limited.client.post(SUBMIT, json=EXAMPLE_BODY, headers=auth(c))
    assert_error(r, 503, "service_unavailable")
    assert _submit(limited, a) == 429  # a is over its own limit first
