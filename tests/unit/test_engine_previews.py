"""Partial previews from the real engine (the tiny random-weight CogView4 on the CPU): a preview
is the first image's prediction decoded mid-run, and asking for previews never changes the
images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cogview_api.config import Settings
from cogview_api.domain import preview_steps
from cogview_api.engine import EngineJob
from cogview_api.engine.cogview4 import CogView4Engine
from tests.conftest import make_settings

STEPS = 4
SIZE = 512


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path) -> CogView4Engine:
    settings: Settings = make_settings(tmp_path_factory.mktemp("previews"), tiny_cache)
    return CogView4Engine.load(settings)


def job(task_id: str, seeds: tuple[int, ...], previews: int) -> EngineJob:
    return EngineJob(
        task_id=task_id,
        prompt="a lighthouse on a cliff",
        negative_prompt="",
        width=SIZE,
        height=SIZE,
        steps=STEPS,
        guidance_scale=3.5,
        seeds=seeds,
        preview_steps=preview_steps(previews, STEPS),
    )


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_previews_are_decoded_predictions_and_leave_the_images_unchanged(
    engine: CogView4Engine,
) -> None:
    seen: list[tuple[str, int, int, Image.Image]] = []
    # A batch of two tasks of one shape: one with three previews, one without.
    with_previews = engine.generate(
        [job("a", (7, 8), previews=3), job("b", (9,), previews=0)],
        lambda task_id, stage, step: True,
        lambda task_id, index, step, image: seen.append((task_id, index, step, image)),
    )
    without = engine.generate(
        [job("a", (7, 8), previews=0), job("b", (9,), previews=0)],
        lambda task_id, stage, step: True,
    )
    for got, want in zip(sum(with_previews, []), sum(without, []), strict=True):
        assert np.array_equal(pixels(got), pixels(want)), "a preview changed the result"

    assert [(t, i, s) for t, i, s, _ in seen] == [("a", 0, 1), ("a", 1, 2), ("a", 2, 3)]
    final = pixels(with_previews[0][0])
    distances = []
    for _, _, _, image in seen:
        assert image.size == (SIZE, SIZE)
        distances.append(float(np.abs(pixels(image) - final).mean()))
    # Real predictions of this image, not copies of it: each differs from the final image, and
    # the later the step, the closer it comes.
    assert all(d > 0 for d in distances)
    assert distances == sorted(distances, reverse=True), distances


def test_preview_steps_are_evenly_spaced_and_never_the_last() -> None:
    assert preview_steps(0, 20) == ()
    assert preview_steps(1, 20) == (10,)
    assert preview_steps(3, 20) == (5, 10, 15)
    assert preview_steps(3, 50) == (12, 25, 38)
    assert preview_steps(3, 2) == (1,)  # fewer steps than previews: one per step at most
    assert preview_steps(2, 1) == ()
