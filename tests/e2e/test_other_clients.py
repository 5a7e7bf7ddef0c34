"""Clients nobody here wrote, against one `cogview-api serve` subprocess (the test-echo engine,
whose partial images are stand-ins: the protocol is under test, not the model): the
official OpenAI **Node** SDK (npm `openai`, installed by the test into a cache folder) with its
streaming iterator and the current fields, and **LiteLLM**'s `openai/` and `zai/` providers
pointed at the OpenAI and Zhipu surfaces. Each call is one small task of a few steps."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.support import ServerProcess, auth, install_node_openai, server_env

# LiteLLM fetches its model price map from GitHub at import unless told to use its own copy.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

PROMPT = "A lighthouse on a cliff at dawn, watercolor"

# Partial images and the completed image through the SDK's own `for await` iterator, then a
# JSON answer with the current fields, then a refused field; the results as one JSON line.
NODE_SCRIPT = """
import OpenAI from 'openai';
const [baseURL, apiKey, prompt] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0 });
const out = { events: [] };
const stream = await client.images.generate({
  model: 'cogview-4', prompt, size: '512x512', stream: true, partial_images: 2,
});
for await (const event of stream) out.events.push(event);
out.result = await client.images.generate({
  model: 'cogview-4', prompt, size: '512x512', n: 2, quality: 'low', output_format: 'jpeg',
  output_compression: 90, background: 'opaque', moderation: 'low',
  safety_identifier: 'node-user', response_format: 'b64_json',
});
try {
  await client.images.generate({ model: 'cogview-4', prompt, stream: true, partial_images: 4 });
} catch (err) {
  out.refused = { status: err.status, param: err.param, type: err.type };
}
console.log(JSON.stringify(out));
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path) -> Iterator[ServerProcess]:
    """hd in 4 steps (partial images after steps 1 and 3), low and standard in 1."""
    workdir = tmp_path_factory.mktemp("serve-clients")
    env = server_env(tiny_cache, {"COGVIEW_MODEL": "test-echo", "COGVIEW_STEPS_HD": "4"})
    with ServerProcess(workdir=workdir, env=env).start() as proc:
        yield proc


@pytest.fixture(scope="module")
def node_openai() -> Path:
    return install_node_openai()


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def new_key(server: ServerProcess) -> str:
    return str(server.make_key(credits=100)["key"])


def native_tasks(server: ServerProcess, key: str) -> list[dict[str, Any]]:
    with httpx.Client(base_url=server.base_url) as native:
        tasks: list[dict[str, Any]] = native.get("/api/v1/tasks", headers=auth(key)).json()["data"][
            "tasks"
        ]
    return tasks


def test_openai_node_sdk_streams_partial_images_and_sends_the_current_fields(
    server: ServerProcess, node_openai: Path
) -> None:
    key = new_key(server)
    script = node_openai / "images.mjs"  # beside node_modules, where `import 'openai'` looks
    script.write_text(NODE_SCRIPT)
    run = subprocess.run(
        ["node", str(script), server.base_url + "/v1", key, PROMPT],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)

    events = out["events"]
    assert [e["type"] for e in events] == ["image_generation.partial_image"] * 2 + [
        "image_generation.completed"
    ]
    assert [e["partial_image_index"] for e in events[:2]] == [0, 1]
    for event in events:
        image = decode(event["b64_json"])
        assert image.size == (512, 512) and event["size"] == "512x512"
        assert image.format == event["output_format"].upper()
    assert events[-1]["usage"]["images"] == 1

    result = out["result"]
    assert (result["output_format"], result["quality"], result["background"]) == (
        "jpeg",
        "low",
        "opaque",
    )
    assert result["usage"] == {"images": 2, "credits": 4}  # low: 2 credits an image
    for item in result["data"]:
        image = decode(item["b64_json"])
        assert (image.format, image.size) == ("JPEG", (512, 512))
    assert out["refused"] == {
        "status": 400,
        "param": "partial_images",
        "type": "invalid_request_error",
    }

    streamed, answered = sorted(native_tasks(server, key), key=lambda t: t["created_at"])
    assert [p["step"] for p in streamed["previews"]] == [1, 3]
    assert answered["request"]["user_id"] == "node-user" and "previews" not in answered


def test_litellm_openai_provider_gets_images_with_the_fields_it_forwards(
    server: ServerProcess,
) -> None:
    """LiteLLM's `image_generation` forwards n, quality, size, user (and response_format,
    style); it drops output_format, output_compression, background and moderation, and has no
    image streaming (docs/api.md, "Clients")."""
    import litellm

    key = new_key(server)
    response = litellm.image_generation(
        model="openai/cogview-4",
        prompt=PROMPT,
        api_base=server.base_url + "/v1",
        api_key=key,
        size="512x512",
        n=2,
        quality="low",
        user="litellm-user",
    )
    assert len(response.data) == 2
    for item in response.data:
        image = Image.open(io.BytesIO(httpx.get(str(item.url)).content))
        assert (image.format, image.size) == ("PNG", (512, 512))
    (task,) = native_tasks(server, key)
    assert (task["request"]["quality"], task["request"]["user_id"]) == ("low", "litellm-user")
    assert task["credits"]["charged"] == 4


def test_litellm_zai_provider_reaches_the_zhipu_surface(server: ServerProcess) -> None:
    import litellm

    key = new_key(server)
    response = litellm.image_generation(
        model="zai/cogview-4",
        prompt=PROMPT,
        api_base=server.base_url + "/api/paas/v4",
        api_key=key,
        size="512x512",
        quality="standard",
    )
    (item,) = response.data
    image = Image.open(io.BytesIO(httpx.get(str(item.url)).content))
    assert (image.format, image.size) == ("PNG", (512, 512))
    (task,) = native_tasks(server, key)
    assert task["request"]["quality"] == "standard" and task["status"] == "COMPLETED"
