"""bench/engine.py keeps working: a 1-step tiny run writes every field bench/README.md documents,
with values that make sense, so the GPU run is not the first to find the script broken."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
BATCHES = (1, 2)


def documented_fields() -> list[str]:
    """The dotted paths in the README's field table of engine.py (`<B>` = a batch)."""
    text = (ROOT / "bench" / "README.md").read_text()
    table = text.split("### Fields of the JSON", 1)[1].lstrip().split("\n\n", 1)[0]
    return re.findall(r"^\| `([^`]+)`", table, flags=re.MULTILINE)


def lookup(result: dict[str, Any], path: str) -> Any:
    value: Any = result
    for key in path.split("."):
        assert isinstance(value, dict) and key in value, f"{path}: no {key!r}"
        value = value[key]
    return value


def test_tiny_run_writes_every_documented_field(tiny_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "engine.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "engine.py"), "--model", "tiny",
         "--size", "512x512", "--steps", "1", "--batch", ",".join(map(str, BATCHES)),
         "--warmup", "0", "--repeats", "1", "--device", "cpu",
         "--cache-dir", str(tiny_cache), "--json", str(out), "--variants", "fp8,step-cache"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("COGVIEW_")}
        | {"HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(run.stdout) == result  # printed and written alike

    fields = documented_fields()
    assert len(fields) > 30, "the README's field table was not found"
    for path in fields:
        for batch in BATCHES if "<B>" in path else (None,):
            if batch == 1 and ("_over_b1" in path or "_vs_alone" in path):
                continue  # comparisons with batch 1 exist for the other batches
            lookup(result, path.replace("<B>", str(batch)))

    assert result["complete"] is True
    assert result["config"]["weights_shared"] is True  # stock copies no weights
    commit = result["code"]["commit"]  # None only outside a git checkout
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}", commit)
    for side in ("stock", "ours"):
        assert sorted(result[side]) == [str(b) for b in BATCHES]
        for b, s in result[side].items():
            assert s["batch"] == int(b) and len(s["runs_s"]) == 1
            assert 0 < s["median_s"] < 120
            # Both are rounded for the JSON (median_s to 0.1 ms): compare within that rounding.
            assert s["images_per_minute"] == pytest.approx(60 * int(b) / s["median_s"], rel=1e-3)
            assert s["fraction_of_peak_flops"] is None  # no FLOP figures on CPU or for tiny
    assert result["ratios"]["ours_over_stock_b1"] > 0
    # Same seed, same image (within rounding of the fast path's batched arithmetic).
    assert 0 <= result["fidelity"]["max_pixel_diff_ours_vs_stock_b1"] <= 2
    assert 0 <= result["fidelity"]["max_pixel_diff_ours_b2_vs_alone"] <= 2
    assert result["memory"]["peak_rss_bytes"] > 100e6
    assert result["flops"]["per_image"] is None and result["machine"]["device"] == "cpu"
    # Image-changing modes, after the exact rounds (fp8 sorted last whatever the order asked):
    # the step cache is timed against ours exact at every batch; FP8 is refused on a CPU.
    variants = result["variants"]
    assert list(variants) == ["step-cache", "fp8"]
    assert "COGVIEW_UNSAFE_FP8" in variants["fp8"]["skipped"]
    for b in map(str, BATCHES):
        cached = variants["step-cache"][b]
        assert cached["batch"] == int(b) and len(cached["runs_s"]) == 1
        assert cached["speed_over_exact"] > 0
        assert cached["max_pixel_diff_vs_exact"] <= 2  # one step: nothing to reuse yet
        assert cached["row_steps_skipped"] == f"0/{2 * int(b)}"


def test_flop_model_reproduces_the_research_notes() -> None:
    """The analytic count matches the notes' FlopCounterMode figures: 54.12 TFLOP for one
    1024*1024 forward with 16 text tokens, 5.55 PFLOP per hd image with CFG (144/16)."""
    spec = importlib.util.spec_from_file_location("bench_flops", ROOT / "bench" / "flops.py")
    assert spec and spec.loader
    flops = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flops)

    no_cfg_one_step = flops.analytic(1024, 1024, 1, 1.0, 16, 16)
    decode_and_glm = flops.VAE_DECODE_FLOPS_1024 + 2 * flops.GLM_PARAMS_BUT_EMBEDDING * 16
    assert no_cfg_one_step - decode_and_glm == pytest.approx(54.12e12, rel=1e-3)
    assert flops.analytic(1024, 1024, 50, 3.5, 144, 16) == pytest.approx(5.55e15, rel=2e-3)
    assert flops.scaled(1024, 1024, 50, 3.5) == 5.55e15
    assert flops.scaled(512, 512, 20, 3.5) == pytest.approx(5.55e15 * 20 / 50 / 4)
    assert flops.device_peak("NVIDIA H100 80GB HBM3") == (989e12, "H100")
    assert flops.device_peak("NVIDIA H100 PCIe") == (756e12, "H100 PCIe")
    assert flops.device_peak("NVIDIA H200") == (989e12, "H200")
    assert flops.device_peak(None) == (None, None)
