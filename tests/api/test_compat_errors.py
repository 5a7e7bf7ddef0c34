"""The OpenAI (`/v1`) and Zhipu (`/api/paas/v4`) surfaces answer every error in their own
envelope, charge nothing for a rejected request, and report a failed or late task with its id;
the native API keeps its envelope. No worker runs here: tasks stay queued unless a test settles
them through the store, as a worker would."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from cogview_api.config import Settings
from cogview_api.domain import TaskState
from cogview_api.services import keys as key_service
from cogview_api.store import queue
from cogview_api.store import tasks as task_store
from tests.support import EXAMPLE_BODY, InProcessApi, auth, in_process_api

OPENAI = "/v1/images/generations"
ZHIPU = "/api/paas/v4/images/generations"
OPENAI_BODY = {"model": "cogview-4", "prompt": EXAMPLE_BODY["prompt"], "size": "1024x1024"}
ZHIPU_BODY = {"model": "cogview-4", "prompt": EXAMPLE_BODY["prompt"]}


def openai_body(**changes: Any) -> dict[str, Any]:
    return {**OPENAI_BODY, **changes}


def zhipu_body(**changes: Any) -> dict[str, Any]:
    return {**ZHIPU_BODY, **changes}


def assert_openai_error(
    r: httpx.Response, status: int, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err: dict[str, Any] = r.json()["error"]
    assert set(r.json()) == {"error"}
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["type"], err["param"], err["code"]) == (type_, param, code)
    assert isinstance(err["message"], str) and err["message"]
    return err


def assert_zhipu_error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err: dict[str, Any] = r.json()["error"]
    assert set(r.json()) == {"error"}
    assert set(err) == {"code", "message"}
    assert err["code"] == code
    assert isinstance(err["message"], str) and err["message"]
    return err


def assert_nothing_written(api: InProcessApi, key: str, balance: int) -> None:
    acct = api.client.get("/api/v1/account", headers=auth(key)).json()["data"]
    assert acct["balance"] == balance
    assert api.client.get("/api/v1/tasks", headers=auth(key)).json()["data"]["tasks"] == []


OPENAI_FIELD_CASES = [
    ("model-dall-e-3", openai_body(model="dall-e-3"), "model"),
    ("prompt-missing", {"model": "cogview-4"}, "prompt"),
    ("prompt-blank", openai_body(prompt="  "), "prompt"),
    ("prompt-1001-chars", openai_body(prompt="x" * 1001), "prompt"),
    ("size-1000x1000", openai_body(size="1000x1000"), "size"),
    ("size-256x256", openai_body(size="256x256"), "size"),
    ("n-0", openai_body(n=0), "n"),
    ("n-5", openai_body(n=5), "n"),
    ("n-string", openai_body(n="2"), "n"),
    ("quality-ultra", openai_body(quality="ultra"), "quality"),
    ("response-format-xml", openai_body(response_format="xml"), "response_format"),
    ("output-format-gif", openai_body(output_format="gif"), "output_format"),
    ("user-129-chars", openai_body(user="u" * 129), "user"),
    ("unknown-style", openai_body(style="vivid"), "style"),
    ("native-only-seed", openai_body(seed=1), "seed"),
    (
        "output-compression-101",
        openai_body(output_format="jpeg", output_compression=101),
        "output_compression",
    ),
    (
        "output-compression-negative",
        openai_body(output_format="webp", output_compression=-1),
        "output_compression",
    ),
    (
        "output-compression-float",
        openai_body(output_format="jpeg", output_compression=80.5),
        "output_compression",
    ),
    ("output-compression-png", openai_body(output_compression=80), "output_compression"),
    ("background-transparent", openai_body(background="transparent"), "background"),
    ("background-white", openai_body(background="white"), "background"),
    ("moderation-high", openai_body(moderation="high"), "moderation"),
    ("safety-identifier-129-chars", openai_body(safety_identifier="u" * 129), "safety_identifier"),
    ("two-different-end-users", openai_body(user="a", safety_identifier="b"), "safety_identifier"),
    ("stream-string", openai_body(stream="yes"), "stream"),
    ("partial-images-without-stream", openai_body(partial_images=2), "partial_images"),
    ("partial-images-4", openai_body(stream=True, partial_images=4), "partial_images"),
    ("partial-images-negative", openai_body(stream=True, partial_images=-1), "partial_images"),
    ("partial-images-string", openai_body(stream=True, partial_images="2"), "partial_images"),
    ("stream-transparent", openai_body(stream=True, background="transparent"), "background"),
]


@pytest.mark.parametrize(
    ("payload", "param"),
    [c[1:] for c in OPENAI_FIELD_CASES],
    ids=[c[0] for c in OPENAI_FIELD_CASES],
)
def test_openai_bad_field_is_400_invalid_request_error(
    api: InProcessApi, payload: dict[str, Any], param: str
) -> None:
    key = api.make_key(credits=40)
    r = api.client.post(OPENAI, json=payload, headers=auth(key))
    assert_openai_error(r, 400, "invalid_request_error", param)
    assert_nothing_written(api, key, 40)


ZHIPU_FIELD_CASES = [
    ("model-cogview-3", zhipu_body(model="cogview-3-flash"), "1211"),
    ("model-missing", {"prompt": "a cat"}, "1211"),
    ("prompt-missing", {"model": "cogview-4"}, "1214"),
    ("size-1000x1000", zhipu_body(size="1000x1000"), "1214"),
    ("size-auto", zhipu_body(size="auto"), "1214"),
    ("quality-high", zhipu_body(quality="high"), "1214"),
    ("user-id-129-chars", zhipu_body(user_id="u" * 129), "1214"),
    ("n-0", zhipu_body(n=0), "1214"),
    ("n-5", zhipu_body(n=5), "1214"),
    ("request-id-empty", zhipu_body(request_id=""), "1214"),
    ("request-id-65-chars", zhipu_body(request_id="r" * 65), "1214"),
    ("request-id-space", zhipu_body(request_id="my id"), "1214"),
    ("request-id-number", zhipu_body(request_id=12345678), "1214"),
    ("watermark-string", zhipu_body(watermark_enabled="false"), "1214"),
    ("sensitive-word-check-string", zhipu_body(sensitive_word_check="DISABLE"), "1214"),
    ("sensitive-word-check-status", zhipu_body(sensitive_word_check={"status": "OFF"}), "1214"),
    ("sensitive-word-check-unknown", zhipu_body(sensitive_word_check={"level": 1}), "1214"),
    ("two-different-end-users", zhipu_body(user_id="a", user="b"), "1214"),
    ("unknown-style", zhipu_body(style="vivid"), "1214"),
]


def test_openai_transparent_background_is_refused_with_what_to_send(api: InProcessApi) -> None:
    key = api.make_key(credits=40)
    r = api.client.post(OPENAI, json=openai_body(background="transparent"), headers=auth(key))
    assert "opaque" in assert_openai_error(r, 400, "invalid_request_error", "background")["message"]


def test_openai_models_list_and_one_model(api: InProcessApi) -> None:
    key = api.make_key(credits=0)
    r = api.client.get("/v1/models", headers=auth(key))
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "list"
    assert [m["id"] for m in r.json()["data"]] == ["cogview-4", "cogview-4-250304"]
    for model in r.json()["data"]:
        assert set(model) == {"id", "object", "created", "owned_by"}
        assert model["object"] == "model"
        one = api.client.get(f"/v1/models/{model['id']}", headers=auth(key))
        assert one.status_code == 200 and one.json() == model
    r = api.client.get("/v1/models/dall-e-3", headers=auth(key))
    assert (
        "dall-e-3"
        in assert_openai_error(r, 404, "invalid_request_error", code="not_found")["message"]
    )
    assert_openai_error(
        api.client.get("/v1/models"), 401, "invalid_request_error", code="invalid_api_key"
    )
    assert_openai_error(
        api.client.get("/v1/models/cogview-4", headers=auth("cv4_nope")),
        401,
        "invalid_request_error",
        code="invalid_api_key",
    )


@pytest.mark.parametrize(
    ("payload", "code"),
    [c[1:] for c in ZHIPU_FIELD_CASES],
    ids=[c[0] for c in ZHIPU_FIELD_CASES],
)
def test_zhipu_bad_field_is_400_with_zhipu_code(
    api: InProcessApi, payload: dict[str, Any], code: str
) -> None:
    key = api.make_key(credits=40)
    r = api.client.post(ZHIPU, json=payload, headers=auth(key))
    assert_zhipu_error(r, 400, code)
    assert_nothing_written(api, key, 40)


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b'{"model": "cogview-4", "prompt": ', "application/json"),
        (b"[1, 2]", "application/json"),
        (json.dumps(OPENAI_BODY).encode(), "text/plain"),
    ],
    ids=["malformed", "array", "text-plain"],
)
def test_body_that_is_not_a_json_object_is_400_in_each_envelope(
    api: InProcessApi, content: bytes, content_type: str
) -> None:
    key = api.make_key(credits=40)
    headers = {**auth(key), "Content-Type": content_type}
    r = api.client.post(OPENAI, content=content, headers=headers)
    assert_openai_error(r, 400, "invalid_request_error")
    assert_zhipu_error(api.client.post(ZHIPU, content=content, headers=headers), 400, "1210")
    assert_nothing_written(api, key, 40)


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer cv4_nope"}, {"Authorization": "Basic dXNlcjpwYXNz"}],
    ids=["missing", "unknown-key", "basic-auth"],
)
def test_bad_key_is_401_in_each_envelope(api: InProcessApi, headers: dict[str, str]) -> None:
    r = api.client.post(OPENAI, json=OPENAI_BODY, headers=headers)
    assert_openai_error(r, 401, "invalid_request_error", code="invalid_api_key")
    assert_zhipu_error(api.client.post(ZHIPU, json=ZHIPU_BODY, headers=headers), 401, "1000")


def test_revoked_key_is_403_in_each_envelope(api: InProcessApi) -> None:
    key = api.make_key(credits=40)
    (record,) = key_service.list_keys(api.db)
    key_service.revoke_key(api.db, record.id)
    r = api.client.post(OPENAI, json=OPENAI_BODY, headers=auth(key))
    assert_openai_error(r, 403, "invalid_request_error", code="permission_denied")
    assert_zhipu_error(api.client.post(ZHIPU, json=ZHIPU_BODY, headers=auth(key)), 403, "1220")


def test_insufficient_credits_is_402_in_each_envelope(api: InProcessApi) -> None:
    key = api.make_key(credits=7)  # 4 credits an image
    r = api.client.post(OPENAI, json=openai_body(n=2), headers=auth(key))
    err = assert_openai_error(r, 402, "insufficient_quota", code="insufficient_quota")
    assert "costs 8 credits and the key's balance is 7" in err["message"]
    poor = api.make_key(credits=3, name="poor")
    r = api.client.post(ZHIPU, json=ZHIPU_BODY, headers=auth(poor))
    assert_zhipu_error(r, 402, "1113")
    assert "costs 4 credits and the key's balance is 3" in r.json()["error"]["message"]
    assert_nothing_written(api, key, 7)
    assert_nothing_written(api, poor, 3)


def test_unknown_route_wrong_method_and_big_body_use_the_surface_envelope(
    api: InProcessApi,
) -> None:
    assert_openai_error(
        api.client.post("/v1/images/edits", json={}), 404, "invalid_request_error", code="not_found"
    )
    assert_openai_error(
        api.client.post("/v1/images/variations", json={}),
        404,
        "invalid_request_error",
        code="not_found",
    )
    assert_zhipu_error(api.client.post("/api/paas/v4/chat/completions", json={}), 404, "1222")
    r = api.client.get(OPENAI)
    assert_openai_error(r, 405, "invalid_request_error")
    assert "POST" in r.headers["allow"]
    assert_zhipu_error(api.client.get(ZHIPU), 405, "1210")
    big = json.dumps(openai_body(user="x" * (65 * 1024)))
    assert_openai_error(
        api.client.post(OPENAI, content=big, headers={"Content-Type": "application/json"}),
        413,
        "invalid_request_error",
        code="request_too_large",
    )
    assert_zhipu_error(
        api.client.post(ZHIPU, content=big, headers={"Content-Type": "application/json"}),
        413,
        "1210",
    )


@pytest.mark.parametrize(
    "path", ["/api/v1/nope", "/v10/images/generations", "/api/paasx", "/nope", "/v1x"]
)
def test_native_and_unrelated_paths_keep_the_native_envelope(api: InProcessApi, path: str) -> None:
    r = api.client.get(path)
    assert r.status_code == 404
    assert r.json()["error"] == {
        "code": 404,
        "message": f"No route for GET {path}.",
        "type": "not_found",
        "param": None,
    }


def test_native_submit_errors_keep_the_native_envelope(api: InProcessApi) -> None:
    key = api.make_key(credits=40)
    r = api.client.post(
        "/api/v1/images/generations", json={**EXAMPLE_BODY, "size": "1000x1000"}, headers=auth(key)
    )
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"code", "message", "type", "param"}
    assert (r.json()["error"]["type"], r.json()["error"]["param"]) == ("invalid_request", "size")
    r = api.client.post("/api/v1/images/generations", json=EXAMPLE_BODY, headers=auth("cv4_no"))
    assert r.json()["error"]["type"] == "authentication_error"


# -- tasks that fail or run late -------------------------------------------------------------


@pytest.fixture
def impatient(settings: Settings) -> Iterator[InProcessApi]:
    """The API with a half-second synchronous wait, and no worker: every task is late."""
    with in_process_api(settings.model_copy(update={"sync_wait_seconds": 0.5})) as running:
        yield running


@pytest.mark.parametrize(
    ("path", "payload"), [(OPENAI, OPENAI_BODY), (ZHIPU, ZHIPU_BODY)], ids=["openai", "zhipu"]
)
def test_late_task_is_504_naming_the_task_which_goes_on(
    impatient: InProcessApi, path: str, payload: dict[str, Any]
) -> None:
    key = impatient.make_key(credits=40)
    started = time.monotonic()
    r = impatient.client.post(path, json=payload, headers=auth(key))
    assert 0.5 <= time.monotonic() - started < 5
    assert r.status_code == 504, r.text
    assert r.headers["x-should-retry"] == "false"
    (task,) = impatient.client.get("/api/v1/tasks", headers=auth(key)).json()["data"]["tasks"]
    assert task["task_id"] in r.json()["error"]["message"]
    assert task["status"] == "IN_PROGRESS"
    assert task["credits"] == {"charged": 4, "refunded": 0}


@pytest.mark.parametrize(
    ("path", "payload", "user_id"),
    [
        (
            OPENAI,
            openai_body(
                safety_identifier="end-7",
                user="end-7",
                output_format="webp",
                output_compression=0,
                background="auto",
                moderation="low",
                stream=False,
            ),
            "end-7",
        ),
        (OPENAI, openai_body(user="end-8", output_format="jpeg", output_compression=100), "end-8"),
        (
            ZHIPU,
            zhipu_body(
                user="end-9",
                n=2,
                request_id="r-1",
                watermark_enabled=True,
                sensitive_word_check={"type": "ALL", "status": "DISABLE"},
            ),
            "end-9",
        ),
    ],
    ids=["openai-current", "openai-user", "zhipu-own-fields"],
)
def test_current_fields_are_accepted_and_stored(
    impatient: InProcessApi, path: str, payload: dict[str, Any], user_id: str
) -> None:
    key = impatient.make_key(credits=40)
    r = impatient.client.post(path, json=payload, headers=auth(key))
    assert r.status_code == 504, r.text  # accepted; no worker here, so it runs late
    (task,) = impatient.client.get("/api/v1/tasks", headers=auth(key)).json()["data"]["tasks"]
    assert task["request"]["user_id"] == user_id
    assert task["request"]["n"] == payload.get("n", 1)
    with impatient.db.read() as conn:
        stored = task_store.get_task(conn, task["task_id"])
    assert stored is not None
    assert stored.output_compression == payload.get("output_compression")
    assert stored.output_format == payload.get("output_format", "png")


def settle_first_task(api: InProcessApi, *, state: TaskState, message: str) -> None:
    """Act as a worker: claim the first queued task, then fail or cancel it (with its refund)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with api.db.write() as conn:
            claimed = queue.claim_batch(conn, worker_id="test", limit=1, lease_seconds=30)
        if claimed:
            with api.db.write() as conn:
                assert task_store.fail_task(
                    conn,
                    task_id=claimed[0],
                    error_code=500,
                    error_type="server_error",
                    message=message,
                    worker_id="test",
                    state=state,
                )
            return
        time.sleep(0.05)
    raise TimeoutError("no task was submitted")


SURFACES = [(OPENAI, OPENAI_BODY), (ZHIPU, ZHIPU_BODY)]
ENDINGS = [
    # (state, HTTP status, OpenAI type, Zhipu code)
    (TaskState.FAILED, 500, "server_error", "500"),
    (TaskState.CANCELLED, 409, "invalid_request_error", "1210"),
]


@pytest.mark.parametrize(("path", "payload"), SURFACES, ids=["openai", "zhipu"])
@pytest.mark.parametrize(
    ("state", "status", "openai_type", "zhipu_code"), ENDINGS, ids=["failed", "cancelled"]
)
def test_task_ending_without_images_is_an_error_with_its_message_and_refunded(
    api: InProcessApi,
    path: str,
    payload: dict[str, Any],
    state: TaskState,
    status: int,
    openai_type: str,
    zhipu_code: str,
) -> None:
    key = api.make_key(credits=40)
    reason = "The GPU ran out of memory for this task."
    worker = threading.Thread(
        target=settle_first_task, args=(api,), kwargs={"state": state, "message": reason}
    )
    worker.start()
    r = api.client.post(path, json=payload, headers=auth(key))
    worker.join()
    assert r.status_code == status, r.text
    assert r.headers["x-should-retry"] == "false"
    (task,) = api.client.get("/api/v1/tasks", headers=auth(key)).json()["data"]["tasks"]
    assert task["status"] == state.wire_status
    message = r.json()["error"]["message"]
    assert reason in message and task["task_id"] in message
    if path == OPENAI:
        assert r.json()["error"]["type"] == openai_type
    else:
        assert r.json()["error"]["code"] == zhipu_code
    assert api.client.get("/api/v1/account", headers=auth(key)).json()["data"]["balance"] == 40


def test_synchronous_requests_over_the_wait_cap_are_429_in_each_envelope(
    settings: Settings,
) -> None:
    """A synchronous compat request holds one of the key's `Prefer: wait` slots while it waits:
    one more is refused in its surface's envelope, with nothing written or charged."""
    caps = {"max_waits_per_key": 1, "sync_wait_seconds": 20}
    with in_process_api(settings.model_copy(update=caps)) as api:
        key = api.make_key(credits=40)
        held: list[httpx.Response] = []

        def hold() -> None:
            with httpx.Client(base_url=api.base_url, timeout=30) as c:
                held.append(c.post(OPENAI, json=OPENAI_BODY, headers=auth(key)))

        def tasks() -> list[dict[str, Any]]:
            got: list[dict[str, Any]] = api.client.get("/api/v1/tasks", headers=auth(key)).json()[
                "data"
            ]["tasks"]
            return got

        holder = threading.Thread(target=hold)
        holder.start()
        deadline = time.monotonic() + 10
        while not tasks():
            assert time.monotonic() < deadline, "the synchronous request did not start"
            time.sleep(0.05)
        r = api.client.post(OPENAI, json=OPENAI_BODY, headers=auth(key))
        assert_openai_error(r, 429, "requests", code="rate_limit_exceeded")
        assert r.headers["retry-after"] == "5"
        assert "COGVIEW_MAX_WAITS_PER_KEY" in r.json()["error"]["message"]
        r = api.client.post(ZHIPU, json=ZHIPU_BODY, headers=auth(key))
        assert_zhipu_error(r, 429, "1302")
        (task,) = tasks()
        acct = api.client.get("/api/v1/account", headers=auth(key)).json()["data"]
        assert acct["balance"] == 40 - 4
        # The held request ends (its task cancelled) and gives its slot back.
        api.client.post(f"/api/v1/tasks/{task['task_id']}/cancel", headers=auth(key))
        holder.join(timeout=20)
        assert held and held[0].status_code != 429
