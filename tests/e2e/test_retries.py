"""The official `openai` (Python and Node) and `zhipuai` SDKs, and LiteLLM, with a 1 s
timeout, against a `serve` whose generation takes longer: each SDK's own retries land on the
first task, which is charged once, and the last attempt gets its images (docs/api.md,
"Retries"). Two deliberate identical calls are still two tasks. The echo engine stands in for
the model (not under test), slowed per step."""

from __future__ import annotations

import io
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import zhipuai
from PIL import Image

from tests.support import ServerProcess, auth, install_node_openai, server_env

PROMPT = "A lighthouse on a cliff at dawn, watercolor"
PRICE = 4
# 8 steps of 0.3 s at either quality: a generation takes 2.4 s or more, past the clients'
# 1 s timeout.
SLOW_ENV = {
    "COGVIEW_MODEL": "test-echo",
    "COGVIEW_TEST_ECHO_STEP_SECONDS": "0.3",
    "COGVIEW_STEPS_HD": "8",
    "COGVIEW_STEPS_STANDARD": "8",
}
TIMEOUT = 1.0
# Enough attempts to outlast the generation whatever the SDKs' backoff jitter draws.
RETRIES = 6


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path) -> Iterator[ServerProcess]:
    workdir = tmp_path_factory.mktemp("serve-slow")
    with ServerProcess(workdir=workdir, env=server_env(tiny_cache, SLOW_ENV)).start() as proc:
        yield proc


@pytest.fixture(scope="module")
def native(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        yield client


def new_key(server: ServerProcess) -> str:
    return str(server.make_key(credits=100)["key"])


def tasks_of(native: httpx.Client, key: str) -> list[dict[str, Any]]:
    tasks: list[dict[str, Any]] = native.get("/api/v1/tasks", headers=auth(key)).json()["data"][
        "tasks"
    ]
    return tasks


def balance(native: httpx.Client, key: str) -> int:
    return int(native.get("/api/v1/account", headers=auth(key)).json()["data"]["balance"])


def assert_image(url: str) -> None:
    r = httpx.get(url, timeout=30)
    assert r.status_code == 200
    assert Image.open(io.BytesIO(r.content)).size == (1024, 1024)


def test_openai_sdk_retries_after_its_timeout_join_one_task_charged_once(
    server: ServerProcess, native: httpx.Client
) -> None:
    key = new_key(server)
    client = openai.OpenAI(
        base_url=server.base_url + "/v1", api_key=key, timeout=TIMEOUT, max_retries=RETRIES
    )
    raw = client.images.with_raw_response.generate(
        model="cogview-4", prompt=PROMPT, size="1024x1024"
    )
    assert raw.retries_taken >= 1  # the generation outlasted the first attempt
    assert raw.headers["idempotent-replayed"] == "true"
    (image,) = raw.parse().data
    assert image.url
    assert_image(image.url)
    (task,) = tasks_of(native, key)
    assert task["status"] == "COMPLETED" and task["images"][0]["url"] == image.url
    assert balance(native, key) == 100 - PRICE


def test_zhipu_sdk_retries_after_its_timeout_join_one_task_charged_once(
    server: ServerProcess, native: httpx.Client
) -> None:
    """The Zhipu SDK marks nothing: its retries join because the first client hung up."""
    key = new_key(server)
    client = zhipuai.ZhipuAI(
        api_key=key,
        base_url=server.base_url + "/api/paas/v4",
        timeout=TIMEOUT,
        max_retries=RETRIES,
    )
    started = time.monotonic()
    result = client.images.generations(model="cogview-4", prompt=PROMPT)
    assert time.monotonic() - started > TIMEOUT  # so an attempt timed out and was retried
    (image,) = result.data
    assert image.url
    assert_image(image.url)
    (task,) = tasks_of(native, key)
    assert task["status"] == "COMPLETED" and task["images"][0]["url"] == image.url
    assert balance(native, key) == 100 - PRICE


# The Node SDK's own retries (it marks them with X-Stainless-Retry-Count, as the Python SDK does).
NODE_RETRY_SCRIPT = """
import OpenAI from 'openai';
const [baseURL, apiKey, prompt, timeout, maxRetries] = process.argv.slice(2);
const client = new OpenAI({
  baseURL, apiKey, timeout: Number(timeout), maxRetries: Number(maxRetries),
});
const { data, response } = await client.images
  .generate({ model: 'cogview-4', prompt, size: '1024x1024' })
  .withResponse();
const replayed = response.headers.get('idempotent-replayed');
console.log(JSON.stringify({ url: data.data[0].url, replayed }));
"""


def test_openai_node_sdk_retries_after_its_timeout_join_one_task_charged_once(
    server: ServerProcess, native: httpx.Client
) -> None:
    key = new_key(server)
    script = install_node_openai() / "retry.mjs"  # beside node_modules, where 'openai' is found
    script.write_text(NODE_RETRY_SCRIPT)
    run = subprocess.run(
        ["node", str(script), server.base_url + "/v1", key, PROMPT]
        + [str(int(TIMEOUT * 1000)), str(RETRIES)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["replayed"] == "true"  # the answer went to a retry, which joined the first task
    assert_image(out["url"])
    (task,) = tasks_of(native, key)
    assert task["status"] == "COMPLETED" and task["images"][0]["url"] == out["url"]
    assert balance(native, key) == 100 - PRICE


def test_litellm_retries_after_its_timeout_join_one_task_charged_once(
    server: ServerProcess, native: httpx.Client
) -> None:
    """LiteLLM's `openai/` provider: its retries (the OpenAI SDK's, under it) join the first
    task as the SDK's own do."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch from GitHub
    import litellm

    key = new_key(server)
    started = time.monotonic()
    response = litellm.image_generation(
        model="openai/cogview-4",
        prompt=PROMPT,
        api_base=server.base_url + "/v1",
        api_key=key,
        size="1024x1024",
        timeout=TIMEOUT,
        max_retries=RETRIES,
    )
    assert time.monotonic() - started > TIMEOUT  # so an attempt timed out and was retried
    (item,) = response.data
    assert item.url
    assert_image(str(item.url))
    (task,) = tasks_of(native, key)
    assert task["status"] == "COMPLETED" and task["images"][0]["url"] == item.url
    assert balance(native, key) == 100 - PRICE


def test_two_deliberate_identical_calls_are_two_tasks(
    server: ServerProcess, native: httpx.Client
) -> None:
    key = new_key(server)
    openai_client = openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, timeout=60)
    zhipu_client = zhipuai.ZhipuAI(
        api_key=key, base_url=server.base_url + "/api/paas/v4", timeout=60
    )
    urls = [
        openai_client.images.generate(model="cogview-4", prompt=PROMPT, size="1024x1024")
        .data[0]
        .url
        for _ in range(2)
    ]
    urls += [
        zhipu_client.images.generations(model="cogview-4", prompt=PROMPT).data[0].url
        for _ in range(2)
    ]
    assert len(set(urls)) == 4
    assert len(tasks_of(native, key)) == 4
    assert balance(native, key) == 100 - 4 * PRICE
