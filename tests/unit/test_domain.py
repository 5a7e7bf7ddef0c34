from __future__ import annotations

from typing import Any

import pytest

from cogview_api.config import Settings
from cogview_api.domain import (
    MAX_SEED,
    PRESET_SIZES,
    BatchKey,
    DeliveryState,
    GenerationRequest,
    ImageRecord,
    OutputFormat,
    Quality,
    Size,
    Stage,
    TaskState,
    WebhookEvent,
    image_seeds,
    new_task_id,
    parse_size,
)
from cogview_api.engine import EngineJob
from cogview_api.media import CONTENT_TYPES


@pytest.mark.parametrize(("w", "h"), PRESET_SIZES)
def test_every_preset_parses_in_both_spellings(w: int, h: int) -> None:
    assert parse_size(f"{w}*{h}") == Size(w, h)
    assert parse_size(f"{w}x{h}") == Size(w, h)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512*512", Size(512, 512)),
        ("2048x1024", Size(2048, 1024)),
        ("1280*720", Size(1280, 720)),
        (" 1024 X 768 ", Size(1024, 768)),
    ],
)
def test_custom_sizes_within_the_rules(text: str, size: Size) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("1000*1000", "divisible by 16"),
        ("0*0", "between 512 and 2048"),
        ("abc", "must look like"),
        ("2048*2048", "at most 2097152"),
        ("4096*512", "between 512 and 2048"),
        ("1024", "must look like"),
        ("1024*-1024", "must look like"),
    ],
)
def test_sizes_outside_the_rules_say_why(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_size(text)


def test_size_prints_as_w_star_h() -> None:
    assert str(Size(768, 1344)) == "768*1344"


def test_task_ids_are_unguessable_and_end_in_cv4() -> None:
    ids = {new_task_id() for _ in range(1000)}
    assert len(ids) == 1000
    for task_id in ids:
        assert task_id.endswith("_cv4") and len(task_id) == 26  # 22 chars = 128 bits


def test_seeds_are_consecutive_from_the_given_one_and_wrap() -> None:
    assert image_seeds(7, 3) == [7, 8, 9]
    assert image_seeds(MAX_SEED, 2) == [MAX_SEED, 0]
    random_seeds = image_seeds(None, 4)
    assert len(random_seeds) == 4 and all(0 <= s <= MAX_SEED for s in random_seeds)


def test_wire_status_folds_waiting_and_running() -> None:
    assert TaskState.QUEUED.wire_status == "IN_PROGRESS"
    assert TaskState.RUNNING.wire_status == "IN_PROGRESS"
    assert TaskState.COMPLETED.wire_status == "COMPLETED"
    assert TaskState.CANCELLED.wire_status == "CANCELLED"
    assert [s.terminal for s in TaskState] == [False, False, True, True, True]
    assert Stage("denoising") is Stage.DENOISING


def test_the_enums_are_the_stored_and_wire_strings() -> None:
    assert [q.value for q in Quality] == ["low", "standard", "hd"]
    assert [f.value for f in OutputFormat] == ["png", "jpeg", "webp"]
    assert [e.value for e in WebhookEvent] == ["task.completed", "task.failed", "task.cancelled"]
    assert [s.value for s in DeliveryState] == ["pending", "delivered", "failed"]
    assert Quality.HD == "hd" and f"{OutputFormat.WEBP}" == "webp"


def test_a_settled_state_names_its_webhook_event_and_one_in_progress_none() -> None:
    assert WebhookEvent.of(TaskState.COMPLETED) is WebhookEvent.COMPLETED
    assert WebhookEvent.of(TaskState.FAILED) is WebhookEvent.FAILED
    assert WebhookEvent.of(TaskState.CANCELLED) is WebhookEvent.CANCELLED
    with pytest.raises(ValueError):
        WebhookEvent.of(TaskState.RUNNING)


def test_the_strings_of_a_row_become_members() -> None:
    row: dict[str, Any] = {"token": "t", "index": 0, "width": 8, "height": 8, "seed": 1}
    image = ImageRecord(**row, format="png", storage_key="k")
    assert image.format is OutputFormat.PNG
    with pytest.raises(ValueError):
        ImageRecord(**row, format="gif", storage_key="k")
    words: dict[str, Any] = {"quality": "hd"}
    request = GenerationRequest(model="cogview-4", prompt="p", size=Size(1024, 1024), n=1, **words)
    assert request.quality is Quality.HD and request.output_format is OutputFormat.PNG


def test_every_output_format_has_its_content_type() -> None:
    assert list(CONTENT_TYPES) == list(OutputFormat)
    assert CONTENT_TYPES[OutputFormat.JPEG] == "image/jpeg"


def test_price_and_steps_are_per_quality() -> None:
    settings = Settings(
        price_hd=7, price_standard=2, price_low=1, steps_hd=40, steps_standard=12, steps_low=6
    )
    assert [settings.price_for(q) for q in Quality] == [1, 2, 7]
    assert [settings.steps_for(q) for q in Quality] == [6, 12, 40]


def test_by_default_low_is_cheaper_and_faster_than_standard() -> None:
    """OpenAI's ladder (low < medium < high) onto ours: low 10 steps for 2 credits, medium =
    standard 20 steps for 4, high = hd 50 steps for 4 (docs/api.md, "Quality")."""
    settings = Settings()
    steps = [settings.steps_for(q) for q in Quality]
    prices = [settings.price_for(q) for q in Quality]
    assert (steps, prices) == ([10, 20, 50], [2, 4, 4])


def test_a_task_and_its_engine_job_have_one_batch_key() -> None:
    job = EngineJob(
        task_id="t", prompt="p", negative_prompt="", width=768, height=1344, steps=20,
        guidance_scale=3.5, seeds=(1,),
    )  # fmt: skip
    assert BatchKey.of(job) == BatchKey(768, 1344, 20, 3.5)
