"""bench/memory_estimate.py: the live-bytes tracker counts what it should, and the estimate of
the real architecture adds up (weights exact, modes in the order their placement implies)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def memory_estimate() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "memory_estimate", ROOT / "bench/memory_estimate.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["memory_estimate"] = module
    spec.loader.exec_module(module)
    return module


def test_live_bytes_counts_new_storages_once_and_frees_them(memory_estimate: ModuleType) -> None:
    weight = torch.empty(1000, dtype=torch.uint8, device="meta")

    def run() -> None:
        a = weight + 1  # 1000 bytes
        view = a[:10]  # a view: no new storage
        b = a * 2  # 2000 at once
        del a, view
        c = b + 1  # a and its view are gone: still 2000
        c.add_(1)  # in place: same storage
        weight.view(10, 100)  # a view of a known storage: never counted

    assert memory_estimate.traced_peak([weight], run) == 2000


def test_flash_sdpa_allocates_no_score_matrix(memory_estimate: ModuleType) -> None:
    q = torch.empty(1, 4, 4096, 64, dtype=torch.bfloat16, device="meta")
    out_bytes = q.numel() * 2
    lse_bytes = 4 * 4096 * 4  # fp32 log-sum-exp per row and head
    peak = memory_estimate.traced_peak(
        [q], lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q)
    )
    assert peak <= out_bytes + lse_bytes + 1024
    assert (
        torch.nn.functional.scaled_dot_product_attention.__name__ == "scaled_dot_product_attention"
    )


def test_estimate_of_the_real_architecture_adds_up(memory_estimate: ModuleType) -> None:
    result = memory_estimate.estimate(1024, 1024, [1, 4], text_tokens=64)
    weights = result["weights_gb"]
    assert weights["transformer"] == pytest.approx(6.369e9 * 2 / 1e9, rel=1e-3)
    assert weights["text_encoder"] == pytest.approx(8.779e9 * 2 / 1e9, rel=1e-3)
    assert weights["text_encoder_used"] < weights["text_encoder"]  # the last layer never runs
    assert 0.5 < weights["text_encoder_int8"] / weights["text_encoder"] < 0.6
    forward = result["activations_gb"]["transformer_forward_by_batch"]
    assert 3.5 < forward["4"] / forward["1"] < 4.5  # activations scale with the rows
    peaks = result["peak_gb_by_mode_and_batch"]
    for batch in ("1", "4"):
        assert peaks["cpu"][int(batch)] <= peaks["offload"][int(batch)]
        assert peaks["offload"][int(batch)] < peaks["int8"][int(batch)] < peaks["gpu"][int(batch)]
        assert peaks["gpu"][int(batch)] > sum(
            weights[k] for k in ("transformer", "vae", "text_encoder")
        )
