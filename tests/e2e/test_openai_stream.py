"""OpenAI's image event stream (`stream: true`, `partial_images`) read by the official `openai`
SDK's own streaming iterator from `cogview-api serve --model tiny` in a subprocess: real partial
previews of the image as it forms, then the images, decodable and of the asked size."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai.types import ImageGenCompletedEvent, ImageGenPartialImageEvent
from PIL import Image

from tests.support import ServerProcess, auth, server_env

PROMPT = "A lighthouse on a cliff at dawn, watercolor"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path) -> Iterator[ServerProcess]:
    """hd in 4 steps, so 3 partial images fit (after steps 1, 2 and 3)."""
    workdir = tmp_path_factory.mktemp("serve-stream")
    env = server_env(tiny_cache, {"COGVIEW_STEPS_HD": "4"})
    with ServerProcess(workdir=workdir, env=env).start() as proc:
        yield proc


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_partial_images_stream_before_the_image_through_the_sdks_iterator(
    server: ServerProcess,
) -> None:
    key = str(server.make_key(credits=100)["key"])
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key=key)
    stream = client.images.generate(
        model="cogview-4",
        prompt=PROMPT,
        size="512x512",
        stream=True,
        partial_images=3,
        safety_identifier="end-user-9",
    )
    events = list(stream)
    assert [type(e) for e in events] == [ImageGenPartialImageEvent] * 3 + [ImageGenCompletedEvent]
    partials, done = events[:3], events[3]
    assert isinstance(done, ImageGenCompletedEvent)
    assert [e.partial_image_index for e in partials] == [0, 1, 2]  # type: ignore[union-attr]
    final = decode(done.b64_json)
    assert (final.format, final.size) == ("PNG", (512, 512))
    assert (done.size, done.quality, done.background, done.output_format) == (
        "512x512",
        "high",
        "opaque",
        "png",
    )
    assert done.usage.to_dict()["images"] == 1 and done.usage.to_dict()["credits"] == 4
    assert done.safety_identifier == "end-user-9"
    for partial in partials:
        assert isinstance(partial, ImageGenPartialImageEvent)
        image = decode(partial.b64_json)
        assert (image.format, image.size, partial.output_format) == ("WEBP", (512, 512), "webp")
        assert partial.size == "512x512" and partial.created_at > 0
        # A preview of this image, not the image itself (nor a blank).
        assert image.convert("RGB").tobytes() != final.convert("RGB").tobytes()
    with httpx.Client(base_url=server.base_url) as native:
        (task,) = native.get("/api/v1/tasks", headers=auth(key)).json()["data"]["tasks"]
        balance = native.get("/api/v1/account", headers=auth(key)).json()["data"]["balance"]
    assert task["status"] == "COMPLETED" and len(task["previews"]) == 3
    assert balance == 100 - 4  # one task, one charge; previews are free


def test_stream_without_partial_images_sends_one_completed_event_per_image(
    server: ServerProcess,
) -> None:
    key = str(server.make_key(credits=100)["key"])
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key=key)
    events = list(
        client.images.generate(
            model="cogview-4",
            prompt=PROMPT,
            size="512x512",
            n=2,
            quality="low",
            output_format="jpeg",
            stream=True,
        )
    )
    assert [e.type for e in events] == ["image_generation.completed"] * 2
    for event in events:
        assert isinstance(event, ImageGenCompletedEvent)
        image = decode(event.b64_json)
        assert (image.format, image.size) == ("JPEG", (512, 512))
        assert (event.quality, event.output_format) == ("low", "jpeg")
        assert event.usage.to_dict()["credits"] == 2  # low: 2 credits an image
    assert events[0].b64_json != events[1].b64_json  # two seeds, two images
