"""Submits per second with a burst, per key, enforced in the database (issue: hardening, finding
2 and "per-key limits that hold across API replicas"). Over it: 429 with Retry-After and the
IETF RateLimit headers in each surface's envelope, nothing charged and nothing written; every
submit that is taken answers with the same headers. The clock is the test's: `clock.epoch_seconds`
is moved instead of sleeping."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from sqlalchemy import select

from cogview_api import clock
from cogview_api.config import Settings
from cogview_api.errors import InvalidRequest
from cogview_api.services import keys as key_service
from cogview_api.services import limits as limit_service
from cogview_api.store.db import Database
from cogview_api.store.tables import api_keys
from tests.api.test_bad_input import assert_error
from tests.conftest import make_settings
from tests.support import (
    CLI,
    EXAMPLE_BODY,
    InProcessApi,
    auth,
    background_worker,
    in_process_api,
    server_env,
)

NATIVE = "/api/v1/images/generations"
OPENAI = "/v1/images/generations"
ZHIPU = "/api/paas/v4/images/generations"
PRICE = 4  # EXAMPLE_BODY: one hd image
# One submit a second, three at once: the policy every test here starts from.
POLICY = '"submits";q=3;w=3, "waiting";q=100'


class MovedClock:
    """The rate limit's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.25

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def moved_clock(monkeypatch: pytest.MonkeyPatch) -> MovedClock:
    test_clock = MovedClock()
    monkeypatch.setattr(clock, "epoch_seconds", test_clock)
    return test_clock


@pytest.fixture
def rated(settings: Settings) -> Settings:
    return settings.model_copy(update={"submit_rate": 1.0, "submit_burst": 3})


@pytest.fixture
def api(rated: Settings, moved_clock: MovedClock) -> Iterator[InProcessApi]:
    with in_process_api(rated) as running:
        yield running


def _post(api: InProcessApi, key: str, path: str = NATIVE) -> httpx.Response:
    return api.client.post(path, json=EXAMPLE_BODY, headers=auth(key))


def _key_id(api: InProcessApi, secret: str) -> str:
    return key_service.authenticate(api.db, secret).id


def _tat(api: InProcessApi, key_id: str) -> object:
    with api.db.read() as conn:
        query = select(api_keys.c.submit_tat).where(api_keys.c.id == key_id)
        return conn.execute(query).scalar_one()


def _state(api: InProcessApi, key: str) -> tuple[int, int]:
    """(balance, tasks) of the key."""
    balance = api.client.get("/api/v1/account", headers=auth(key)).json()["data"]["balance"]
    tasks = api.client.get("/api/v1/tasks", headers=auth(key)).json()["data"]["tasks"]
    return balance, len(tasks)


def test_a_burst_is_taken_then_429_on_every_surface_charging_nothing(api: InProcessApi) -> None:
    key = api.make_key(credits=100)
    answers = [_post(api, key) for _ in range(3)]
    assert [r.status_code for r in answers] == [200, 200, 200]
    assert [r.headers["ratelimit-policy"] for r in answers] == [POLICY] * 3
    assert [r.headers["ratelimit"] for r in answers] == [
        '"submits";r=2;t=1, "waiting";r=99',
        '"submits";r=1;t=2, "waiting";r=98',
        '"submits";r=0;t=3, "waiting";r=97',
    ]
    tat = _tat(api, _key_id(api, key))

    native, openai, zhipu = (_post(api, key, path) for path in (NATIVE, OPENAI, ZHIPU))
    assert_error(native, 429, "rate_limit_exceeded")
    assert "1 times a second, 3 at most at once" in native.json()["error"]["message"]
    assert openai.status_code == 429
    assert openai.json()["error"]["code"] == "rate_limit_exceeded"
    assert openai.json()["error"]["type"] == "requests"
    assert zhipu.status_code == 429 and zhipu.json()["error"]["code"] == "1302"
    for r in (native, openai, zhipu):
        assert r.headers["retry-after"] == "1"  # one submit's worth of time
        assert r.headers["ratelimit-policy"] == '"submits";q=3;w=3'
        assert r.headers["ratelimit"] == '"submits";r=0;t=3'
    # Refused: nothing charged, no task, the key's rate state untouched.
    assert _state(api, key) == (100 - 3 * PRICE, 3)
    assert _tat(api, _key_id(api, key)) == tat
    assert _post(api, api.make_key(credits=100)).status_code == 200  # another key's own rate


def test_the_rate_refills_as_time_passes(api: InProcessApi, moved_clock: MovedClock) -> None:
    key = api.make_key(credits=100)
    assert [_post(api, key).status_code for _ in range(4)] == [200, 200, 200, 429]
    moved_clock.advance(0.5)
    r = _post(api, key)
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    moved_clock.advance(0.5)  # one second since the burst: one more submit
    r = _post(api, key)
    assert r.status_code == 200 and r.headers["ratelimit"].startswith('"submits";r=0;t=3,')
    assert _post(api, key).status_code == 429
    moved_clock.advance(3)  # the whole burst is back
    assert [_post(api, key).status_code for _ in range(4)] == [200, 200, 200, 429]
    assert _state(api, key) == (100 - 7 * PRICE, 7)


def test_replicas_over_one_database_share_the_rate(api: InProcessApi, rated: Settings) -> None:
    key = api.make_key(credits=100)
    with in_process_api(rated) as other:  # a second app, its own pool, the same database
        assert [_post(api, key).status_code for _ in range(2)] == [200, 200]
        assert _post(other, key).status_code == 200
        assert _post(other, key).status_code == 429
        assert _post(api, key).status_code == 429
    assert _state(api, key) == (100 - 3 * PRICE, 3)


def _limits(api: InProcessApi, tiny_cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = server_env(tiny_cache, {"COGVIEW_DATABASE_URL": api.settings.database_url})
    # The server's defaults, so the CLI prints the limits in effect there.
    env.update(COGVIEW_SUBMIT_RATE="1", COGVIEW_SUBMIT_BURST="3")
    return subprocess.run(
        [*CLI, "keys", "limits", *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_a_keys_own_limits_from_the_cli_hold_from_its_next_submit(
    api: InProcessApi, moved_clock: MovedClock, tiny_cache: Path
) -> None:
    key = api.make_key(credits=100)
    key_id = _key_id(api, key)
    shown = _limits(api, tiny_cache, key_id, "--rate", "0.5", "--burst", "1", "--max-waiting", "2")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.split("\n")[1:4] == [
        "  submit_rate            0.5  own",
        "  submit_burst             1  own",
        "  max_waiting              2  own",
    ]
    r = _post(api, key)
    assert r.status_code == 200
    assert r.headers["ratelimit-policy"] == '"submits";q=1;w=2, "waiting";q=2'
    assert r.headers["ratelimit"] == '"submits";r=0;t=2, "waiting";r=1'
    r = _post(api, key)
    assert r.status_code == 429 and r.headers["retry-after"] == "2"
    moved_clock.advance(2)
    assert _post(api, key).status_code == 200
    moved_clock.advance(2)
    # Two tasks wait: the key's own waiting limit answers, with its headers.
    r = _post(api, key)
    assert_error(r, 429, "rate_limit_exceeded")
    assert "2 tasks waiting" in r.json()["error"]["message"]
    assert r.headers["retry-after"].isdigit()
    assert r.headers["ratelimit-policy"] == '"waiting";q=2'
    assert r.headers["ratelimit"] == '"waiting";r=0'
    assert _state(api, key) == (100 - 2 * PRICE, 2)

    back = _limits(api, tiny_cache, key_id, "--reset", "--json")
    assert back.returncode == 0, back.stderr
    assert back.stdout.strip() == (
        f'{{"id": "{key_id}", "submit_rate": 1.0, "submit_burst": 3, "max_waiting": 100, '
        '"max_streams": 20, "max_waits": 20, "own": []}'
    )
    assert _post(api, key).headers["ratelimit-policy"] == POLICY
    refused = _limits(api, tiny_cache, key_id, "--burst", "0")
    # stderr: the database the command used (every command names it), then the one sentence.
    assert (refused.returncode, refused.stderr.splitlines()[1:]) == (
        1,
        ["cogview-api: The burst must be from 1 to 1000000 submits."],
    )
    assert refused.stderr.startswith("cogview-api: database ")


def test_a_new_rate_or_a_reset_starts_the_key_with_a_full_burst(api: InProcessApi) -> None:
    key = api.make_key(credits=100)
    key_id = _key_id(api, key)
    settings = api.settings
    # One submit in 1,000 s: after it, the key's TAT lies 1,000 s ahead.
    limit_service.set_key_limits(api.db, settings, key_id, submit_rate=0.001, submit_burst=1)
    assert [_post(api, key).status_code for _ in range(2)] == [200, 429]
    # A new waiting limit alone keeps the rate's state.
    limit_service.set_key_limits(api.db, settings, key_id, max_waiting=50)
    assert _post(api, key).status_code == 429
    # Back to the defaults (1 a second, 3 at once): not held back by the old rate's 1,000 s.
    limit_service.set_key_limits(api.db, settings, key_id, reset=True)
    assert _tat(api, key_id) is None
    assert [_post(api, key).status_code for _ in range(4)] == [200, 200, 200, 429]
    limit_service.set_key_limits(api.db, settings, key_id, submit_burst=5)
    assert [_post(api, key).status_code for _ in range(6)] == [200] * 5 + [429]


@pytest.mark.parametrize(
    ("changes", "sentence"),
    [
        (
            {"submit_rate": -1.0},
            "The submit rate must be 0 (no limit) or from 1e-06 to 1e+06 a second.",
        ),
        ({"submit_rate": float("nan")}, "The submit rate must be 0"),
        ({"submit_rate": float("inf")}, "The submit rate must be 0"),
        # A subnormal rate: its interval is infinite, which made every submit of the key a 500.
        ({"submit_rate": 1e-320}, "The submit rate must be 0"),
        ({"submit_burst": 0}, "The burst must be from 1 to 1000000 submits."),
        ({"max_waiting": 2**31}, "The waiting tasks limit must be from 1 to 2147483647."),
        ({"reset": True, "submit_rate": 2.0}, "Give either new limits or reset, not both."),
    ],
)
def test_a_bad_limit_is_refused_and_changes_nothing(
    db: Database, settings: Settings, changes: dict[str, Any], sentence: str
) -> None:
    key, _ = key_service.create_key(db, name="k", credits=0)
    with pytest.raises(InvalidRequest) as refused:
        limit_service.set_key_limits(db, settings, key.id, **changes)
    assert refused.value.message.startswith(sentence)
    assert limit_service.key_limits(db, settings, key.id).own == frozenset()


def test_the_synchronous_surfaces_answer_with_the_headers(api: InProcessApi) -> None:
    key = api.make_key(credits=100)
    with background_worker(api):
        openai = _post(api, key, OPENAI)
        zhipu = _post(api, key, ZHIPU)
    for r, remaining in ((openai, 2), (zhipu, 1)):
        assert r.status_code == 200, r.text
        assert r.headers["ratelimit-policy"] == POLICY
        assert r.headers["ratelimit"].startswith(f'"submits";r={remaining};')


def test_rate_0_is_no_rate_limit(settings: Settings, moved_clock: MovedClock) -> None:
    unlimited = settings.model_copy(update={"submit_rate": 0.0, "submit_burst": 1})
    with in_process_api(unlimited) as running:
        key = running.make_key(credits=100)
        answers = [_post(running, key) for _ in range(5)]
    assert [r.status_code for r in answers] == [200] * 5
    assert answers[-1].headers["ratelimit-policy"] == '"waiting";q=100'


def test_a_subnormal_submit_rate_setting_is_refused_at_start(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="must be 0 \\(no limit\\) or at least 1e-06"):
        make_settings(tmp_path, tmp_path / "cache", submit_rate=1e-320)
    assert make_settings(tmp_path, tmp_path / "cache", submit_rate=0).submit_rate == 0
