from __future__ import annotations

import pytest

from cogview_api.domain import (
    MAX_SEED,
    PRESET_SIZES,
    Size,
    Stage,
    TaskState,
    image_seeds,
    new_task_id,
    parse_size,
)


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
