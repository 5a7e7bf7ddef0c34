"""The official `openai` and `zhipuai` clients, used unchanged but for their base URL, against
`cogview-api serve` in a subprocess: images come back, errors arrive as each SDK's own exception
types, and the tasks and credits are the native API's. The model is not under test here (its
images are test_generation.py's): the server runs the test-echo engine, whose images have the
asked size and count, one colour per seed, without the tiny model's start and CPU."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import zhipuai
from PIL import Image

from tests.support import ServerProcess, auth, server_env

PROMPT = "A lighthouse on a cliff at dawn, watercolor"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path) -> Iterator[ServerProcess]:
    workdir = tmp_path_factory.mktemp("serve-compat")
    env = server_env(tiny_cache, {"COGVIEW_MODEL": "test-echo"})
    with ServerProcess(workdir=workdir, env=env).start() as proc:
        yield proc


@pytest.fixture(scope="module")
def native(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        yield client


def new_key(server: ServerProcess, credits: int = 100) -> str:
    return str(server.make_key(credits=credits)["key"])


def balance(native: httpx.Client, key: str) -> int:
    return int(native.get("/api/v1/account", headers=auth(key)).json()["data"]["balance"])


def tasks_of(native: httpx.Client, key: str) -> list[dict[str, Any]]:
    tasks: list[dict[str, Any]] = native.get("/api/v1/tasks", headers=auth(key)).json()["data"][
        "tasks"
    ]
    return tasks


def fetch_image(url: str) -> Image.Image:
    r = httpx.get(url, timeout=30)
    assert r.status_code == 200
    return Image.open(io.BytesIO(r.content))


# The SDK clients a test made, closed after it: each holds an httpx connection pool, whose
# sockets, left to the garbage collector, surfaced as ResourceWarnings in later tests.
OPEN_CLIENTS: list[openai.OpenAI | zhipuai.ZhipuAI] = []


@pytest.fixture(autouse=True)
def close_clients() -> Iterator[None]:
    yield
    while OPEN_CLIENTS:
        OPEN_CLIENTS.pop().close()


def openai_client(server: ServerProcess, key: str) -> openai.OpenAI:
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key=key)
    OPEN_CLIENTS.append(client)
    return client


def zhipu_client(server: ServerProcess, key: str) -> zhipuai.ZhipuAI:
    client = zhipuai.ZhipuAI(api_key=key, base_url=server.base_url + "/api/paas/v4")
    OPEN_CLIENTS.append(client)
    return client


# -- OpenAI ----------------------------------------------------------------------------------


def test_openai_client_generates_an_image_by_url(
    server: ServerProcess, native: httpx.Client
) -> None:
    key = new_key(server)
    before = int(time.time())
    result = openai_client(server, key).images.generate(
        model="cogview-4", prompt=PROMPT, size="1024x1024", n=1
    )
    assert before - 1 <= result.created <= time.time() + 1
    (image,) = result.data
    assert image.b64_json is None and image.url
    img = fetch_image(image.url)
    assert (img.format, img.size) == ("PNG", (1024, 1024))
    (task,) = tasks_of(native, key)
    assert task["status"] == "COMPLETED" and task["images"][0]["url"] == image.url
    assert task["request"]["quality"] == "hd"
    assert balance(native, key) == 100 - 4


def test_openai_client_gets_b64_json_with_the_asked_size_count_quality_and_user(
    server: ServerProcess, native: httpx.Client
) -> None:
    key = new_key(server)
    result = openai_client(server, key).images.generate(
        model="cogview-4-250304",
        prompt=PROMPT,
        size="768x1344",
        n=2,
        quality="low",
        response_format="b64_json",
        user="end-user-42",
    )
    assert len(result.data) == 2
    for image in result.data:
        assert image.url is None and image.b64_json
        img = Image.open(io.BytesIO(base64.b64decode(image.b64_json)))
        assert (img.format, img.size) == ("PNG", (768, 1344))
    (task,) = tasks_of(native, key)
    assert task["request"]["quality"] == "low"  # COGVIEW_STEPS_LOW, COGVIEW_PRICE_LOW (2)
    assert task["request"]["user_id"] == "end-user-42"
    assert task["request"]["n"] == 2
    assert balance(native, key) == 100 - 4


def test_openai_client_sends_the_current_fields_and_reads_the_new_answer_fields(
    server: ServerProcess, native: httpx.Client
) -> None:
    key = new_key(server)
    with openai_client(server, key) as client:
        check_current_fields(client, native, key)


def check_current_fields(client: openai.OpenAI, native: httpx.Client, key: str) -> None:
    result = client.images.generate(
        model="cogview-4",
        prompt=PROMPT,
        size="1024x1024",
        quality="medium",
        output_format="jpeg",
        output_compression=100,
        background="opaque",
        moderation="low",
        safety_identifier="end-user-7",
        response_format="b64_json",
    )
    assert (result.background, result.output_format) == ("opaque", "jpeg")
    assert (result.quality, result.size) == ("medium", "1024x1024")
    assert result.to_dict()["usage"] == {"images": 1, "credits": 4}
    (image,) = result.data
    img = Image.open(io.BytesIO(base64.b64decode(str(image.b64_json))))
    assert (img.format, img.size) == ("JPEG", (1024, 1024))
    # The encoder's quality shows in the file's quantization tables: 100 makes them all ones.
    assert max(max(t) for t in img.quantization.values()) == 1  # type: ignore[attr-defined]
    (task,) = tasks_of(native, key)
    assert task["request"]["quality"] == "standard"
    assert task["request"]["user_id"] == "end-user-7"
    assert task["request"]["output_format"] == "jpeg"

    low = client.images.generate(
        model="cogview-4", prompt=PROMPT, output_format="webp", output_compression=5, n=1
    )
    assert (low.output_format, low.quality) == ("webp", "high")  # auto answers high
    assert fetch_image(str(low.data[0].url)).format == "WEBP"
    small = client.images.generate(
        model="cogview-4",
        prompt=PROMPT,
        output_format="jpeg",
        output_compression=10,
        response_format="b64_json",
    )
    img = Image.open(io.BytesIO(base64.b64decode(str(small.data[0].b64_json))))
    assert max(max(t) for t in img.quantization.values()) > 1  # type: ignore[attr-defined]


def test_openai_client_lists_and_retrieves_the_models_served(server: ServerProcess) -> None:
    with openai_client(server, new_key(server, credits=0)) as client:
        models = client.models.list()
        assert [m.id for m in models] == ["cogview-4", "cogview-4-250304"]
        assert {(m.object, m.owned_by) for m in models} == {("model", "zhipuai")}
        assert client.models.retrieve("cogview-4-250304").id == "cogview-4-250304"
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("dall-e-3")


@pytest.mark.parametrize(
    ("changes", "param"),
    [
        ({"background": "transparent"}, "background"),
        ({"stream": True, "partial_images": 4}, "partial_images"),
        ({"partial_images": 2}, "partial_images"),  # without stream
        ({"output_format": "jpeg", "output_compression": 101}, "output_compression"),
        ({"output_compression": 50}, "output_compression"),  # png
        ({"moderation": "strict"}, "moderation"),
        ({"user": "a", "safety_identifier": "b"}, "safety_identifier"),
    ],
    ids=[
        "transparent",
        "partial-images-4",
        "partial-images-unstreamed",
        "compression-101",
        "compression-png",
        "moderation",
        "two-users",
    ],
)
def test_openai_client_bad_current_fields_are_bad_request_and_charge_nothing(
    server: ServerProcess, native: httpx.Client, changes: dict[str, Any], param: str
) -> None:
    key = new_key(server)
    with openai_client(server, key) as client, pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(model="cogview-4", prompt=PROMPT, **changes)
    assert caught.value.param == param
    assert caught.value.type == "invalid_request_error"
    assert balance(native, key) == 100 and tasks_of(native, key) == []


def test_openai_client_raises_authentication_error_for_a_bad_key(server: ServerProcess) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        openai_client(server, "cv4_not-a-key").images.generate(
            model="cogview-4", prompt=PROMPT, size="1024x1024", n=1
        )
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"


@pytest.mark.parametrize(
    "changes",
    [{"size": "1000x1000"}, {"model": "dall-e-3"}, {"n": 5}],
    ids=["size", "model", "n"],
)
def test_openai_client_raises_bad_request_error_and_charges_nothing(
    server: ServerProcess, native: httpx.Client, changes: dict[str, Any]
) -> None:
    key = new_key(server)
    args: dict[str, Any] = {"model": "cogview-4", "prompt": PROMPT, "size": "1024x1024", "n": 1}
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client(server, key).images.generate(**{**args, **changes})
    assert caught.value.param == next(iter(changes))
    assert caught.value.type == "invalid_request_error"
    assert balance(native, key) == 100 and tasks_of(native, key) == []


def test_openai_client_raises_status_error_402_without_enough_credits(
    server: ServerProcess, native: httpx.Client
) -> None:
    key = new_key(server, credits=7)
    with pytest.raises(openai.APIStatusError) as caught:
        openai_client(server, key).images.generate(
            model="cogview-4", prompt=PROMPT, size="1024x1024", n=2
        )
    assert caught.value.status_code == 402
    assert caught.value.code == "insufficient_quota"
    assert balance(native, key) == 7 and tasks_of(native, key) == []


# -- Zhipu -----------------------------------------------------------------------------------


def test_zhipu_client_generates_an_image(server: ServerProcess, native: httpx.Client) -> None:
    key = new_key(server)
    before = int(time.time())
    result = zhipu_client(server, key).images.generations(model="cogview-4", prompt=PROMPT)
    assert before - 1 <= result.created <= time.time() + 1
    (image,) = result.data
    assert image.url
    img = fetch_image(image.url)
    assert (img.format, img.size) == ("PNG", (1024, 1024))
    (task,) = tasks_of(native, key)
    assert task["status"] == "COMPLETED" and task["images"][0]["url"] == image.url
    assert task["request"]["quality"] == "standard"  # Zhipu's default
    assert balance(native, key) == 100 - 4


def test_zhipu_client_passes_size_quality_and_user_id(
    server: ServerProcess, native: httpx.Client
) -> None:
    key = new_key(server)
    result = zhipu_client(server, key).images.generations(
        model="cogview-4-250304",
        prompt=PROMPT,
        size="1344x768",
        quality="hd",
        user_id="end-user-42",
    )
    (image,) = result.data
    assert fetch_image(str(image.url)).size == (1344, 768)
    (task,) = tasks_of(native, key)
    assert task["request"]["quality"] == "hd"
    assert task["request"]["user_id"] == "end-user-42"


def test_zhipu_client_sends_its_own_fields(server: ServerProcess, native: httpx.Client) -> None:
    key = new_key(server)
    result = zhipu_client(server, key).images.generations(
        model="cogview-4",
        prompt=PROMPT,
        n=2,
        request_id="order-77.img:1",
        user="end-user-9",
        sensitive_word_check={"type": "ALL", "status": "DISABLE"},  # type: ignore[arg-type]
        extra_body={"watermark_enabled": False},
    )
    assert result.model_dump()["id"] == "order-77.img:1"
    assert len(result.data) == 2
    (task,) = tasks_of(native, key)
    assert task["request"]["n"] == 2 and task["request"]["user_id"] == "end-user-9"
    assert balance(native, key) == 100 - 8
    plain = zhipu_client(server, key).images.generations(model="cogview-4", prompt=PROMPT, n=1)
    assert "id" not in plain.model_dump()


def test_zhipu_client_raises_authentication_error_for_a_bad_key(server: ServerProcess) -> None:
    with pytest.raises(zhipuai.APIAuthenticationError) as caught:
        zhipu_client(server, "cv4_not-a-key").images.generations(model="cogview-4", prompt=PROMPT)
    assert caught.value.status_code == 401
    assert caught.value.response.json()["error"]["code"] == "1000"


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"size": "1000x1000"}, "1214"),
        ({"model": "cogview-3-flash"}, "1211"),
        ({"n": 5}, "1214"),
        ({"request_id": "has spaces"}, "1214"),
        ({"sensitive_word_check": {"type": "ALL", "status": "OFF"}}, "1214"),
        ({"extra_body": {"watermark_enabled": "no"}}, "1214"),
    ],
    ids=["size", "model", "n", "request-id", "sensitive-word-check", "watermark"],
)
def test_zhipu_client_raises_request_failed_error_and_charges_nothing(
    server: ServerProcess, native: httpx.Client, changes: dict[str, Any], code: str
) -> None:
    key = new_key(server)
    args: dict[str, Any] = {"model": "cogview-4", "prompt": PROMPT}
    with pytest.raises(zhipuai.APIRequestFailedError) as caught:
        zhipu_client(server, key).images.generations(**{**args, **changes})
    assert caught.value.status_code == 400
    assert caught.value.response.json()["error"]["code"] == code
    assert balance(native, key) == 100 and tasks_of(native, key) == []


def test_zhipu_client_raises_status_error_402_without_enough_credits(
    server: ServerProcess, native: httpx.Client
) -> None:
    key = new_key(server, credits=3)
    with pytest.raises(zhipuai.APIStatusError) as caught:
        zhipu_client(server, key).images.generations(model="cogview-4", prompt=PROMPT)
    assert type(caught.value) is zhipuai.APIStatusError
    assert caught.value.status_code == 402
    assert caught.value.response.json()["error"]["code"] == "1113"
    assert balance(native, key) == 3 and tasks_of(native, key) == []
