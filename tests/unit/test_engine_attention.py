"""The fast path's attention for left-padded texts: rows with the same padding attend together
with the padded keys sliced off, which must equal SDPA with a boolean key mask."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cogview_api.engine import cogview4_attention
from cogview_api.engine.cogview4 import CogView4Engine
from cogview_api.engine.cogview4_attention import attend_runs, left_padding_mask, text_key_runs
from cogview_api.engine.cogview4_fast import FastJob
from tests.conftest import make_settings
from tests.unit.test_engine_fidelity import LONG

HEADS, TEXT, IMAGE, DIM = 4, 48, 64, 16


def mask_of(pads: list[int]) -> torch.Tensor:
    return left_padding_mask(torch.tensor(pads), TEXT)


@pytest.mark.parametrize(
    "pads",
    [[0, 32], [16, 0, 0, 32], [32, 32, 0, 16, 16, 16], [16, 0, 16, 0]],
    ids=["cond-uncond", "mixed", "runs", "alternating"],
)
def test_sliced_runs_equal_sdpa_with_a_boolean_key_mask(pads: list[int]) -> None:
    gen = torch.Generator().manual_seed(len(pads))
    q, k, v = (
        torch.randn(len(pads), HEADS, TEXT + IMAGE, DIM, generator=gen, dtype=torch.float64)
        for _ in range(3)
    )
    mask = mask_of(pads)
    keys = torch.cat([mask, torch.ones(len(pads), IMAGE, dtype=torch.bool)], dim=1)
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=keys[:, None, None, :])
    flat = attend_runs(q, k, v, text_key_runs(mask))  # (rows, seq, heads * dim)
    ours = flat.reshape(len(pads), TEXT + IMAGE, HEADS, DIM).transpose(1, 2)
    assert ours.shape == reference.shape
    assert torch.allclose(ours, reference, rtol=0, atol=1e-12)
    # And the padding does matter: attending to it gives another answer.
    if any(pads):
        unmasked = F.scaled_dot_product_attention(q, k, v)
        assert not torch.allclose(ours, unmasked, atol=1e-3)


def test_runs_group_consecutive_rows_with_the_same_padding() -> None:
    assert text_key_runs(mask_of([0, 0, 32, 16, 16, 0])) == [
        (0, 2, 0),
        (2, 3, 32),
        (3, 5, 16),
        (5, 6, 0),
    ]


def test_a_mask_that_is_not_left_padding_is_refused() -> None:
    mask = mask_of([0, 16]).flip(1)  # right padding
    with pytest.raises(ValueError, match="left padding"):
        text_key_runs(mask)


def test_runs_are_worked_out_once_per_batch_not_per_step_or_block(
    tmp_path: Path, tiny_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runs are read off the mask once per batch (a device sync), not per block or step:
    the rows keep one mask for all steps, and make a new one only when a job leaves."""
    engine = CogView4Engine.load(make_settings(tmp_path, tiny_cache))
    assert engine.fast is not None
    calls: list[int] = []
    real = cogview4_attention.text_key_runs

    def counting(mask: torch.Tensor) -> list[tuple[int, int, int]]:
        calls.append(mask.shape[0])
        return real(mask)

    monkeypatch.setattr(cogview4_attention, "text_key_runs", counting)
    jobs = [
        FastJob("a cat", "", (1,)),
        FastJob(LONG, "", (2,)),  # 32 tokens against the 16 of the others and of ""
        FastJob("a lighthouse", "", (3,)),
    ]
    with torch.inference_mode():
        engine.fast.denoise(
            jobs, width=256, height=256, steps=4, guidance_scale=3.5, on_step=lambda g, s: True
        )
    assert calls == [6]  # 3 cond + 3 uncond rows, once for every block of 4 steps
    calls.clear()
    with torch.inference_mode():
        engine.fast.denoise(  # job 1 leaves after step 2: 4 rows from step 3 on
            jobs,
            width=256,
            height=256,
            steps=4,
            guidance_scale=3.5,
            on_step=lambda g, s: not (g == 1 and s == 2),
        )
    assert calls == [6, 4]
