"""torch.compile of the transformer blocks, the way a CUDA start runs it, forced on for the CPU
(inductor generates C++ here instead of Triton): the compiled path gives the eager fast path's
latents, the warm-up at load leaves nothing to compile for other sizes and batch shapes, and a
compiler failure either stops the start with a sentence or, under `auto`, falls back to eager.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from cogview_api.config import Settings
from cogview_api.engine import cogview4_attention
from cogview_api.engine.cogview4 import CogView4Engine
from cogview_api.engine.cogview4_fast import FastCogView4, FastJob
from cogview_api.errors import EngineLoadError
from tests.conftest import make_settings
from tests.unit.test_engine_fidelity import LATENT_TOL, LONG, PROMPTS, fast_latents, max_diff

WARM = (512, 512)


@pytest.fixture(scope="module", autouse=True)
def fresh_dynamo() -> Iterator[None]:
    """Compiled graphs are cached on the blocks' shared code object: start and end clean."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path) -> Settings:
    return make_settings(tmp_path_factory.mktemp("compile"), tiny_cache)


@pytest.fixture(scope="module")
def engines(settings: Settings) -> tuple[FastCogView4, FastCogView4]:
    """(eager, compiled) fast paths on one pipeline; the compiled one warmed up at WARM."""
    eager = CogView4Engine.load(settings)
    compiled = CogView4Engine.from_pipe(
        eager.pipe,
        settings.model_copy(update={"torch_compile": "on", "compile_sizes": "512*512"}),
    )
    assert eager.fast is not None and compiled.fast is not None
    assert compiled.fast.compiled and not eager.fast.compiled
    return eager.fast, compiled.fast


def graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


@pytest.mark.parametrize(
    ("jobs", "size", "padded", "guidance"),
    [
        ([FastJob(PROMPTS[0], "", (1,))], WARM, False, 3.5),
        ([FastJob(LONG, "", (2,))], (576, 512), True, 3.5),
        ([FastJob(p, "", (10 + i,)) for i, p in enumerate(PROMPTS)], (512, 576), True, 3.5),
        ([FastJob(PROMPTS[1], "blurry", (3, 4)), FastJob(LONG, "", (5,))], (640, 512), True, 3.5),
        ([FastJob(PROMPTS[2], "", (6,))], (576, 512), False, 1.0),
    ],
    ids=["warm-size", "other-size-padded", "batch-of-4", "two-images-and-a-negative", "one-row"],
)
def test_compiled_blocks_give_the_eager_latents_without_compiling_again(
    engines: tuple[FastCogView4, FastCogView4],
    jobs: list[FastJob],
    size: tuple[int, int],
    padded: bool,
    guidance: float,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Padded batches go through the attention op inside the compiled graph, which reads its
    runs off the mask once per batch there too."""
    eager, compiled = engines
    before = graphs()
    assert before > 0  # the warm-up at load compiled
    runs: list[torch.Tensor] = []
    real = cogview4_attention.text_key_runs

    def counting(mask: torch.Tensor) -> list[tuple[int, int, int]]:
        runs.append(mask)
        return real(mask)

    monkeypatch.setattr(cogview4_attention, "text_key_runs", counting)
    ours = fast_latents(compiled, jobs, *size, steps=2, guidance_scale=guidance)
    assert len(runs) == int(padded)
    reference = fast_latents(eager, jobs, *size, steps=2, guidance_scale=guidance)
    assert graphs() == before, "a size or batch shape after the warm-up compiled again"
    for a, b in zip(ours, reference, strict=True):
        assert a is not None and b is not None
        assert max_diff(a, b) <= LATENT_TOL


def failing_backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
    raise RuntimeError("no C compiler on this machine")


@pytest.mark.parametrize("fall_back", [True, False], ids=["auto-falls-back", "on-refuses"])
def test_a_compiler_failure_falls_back_to_eager_or_stops_the_start(
    engines: tuple[FastCogView4, FastCogView4], fall_back: bool, caplog: pytest.LogCaptureFixture
) -> None:
    eager, _ = engines
    broken = FastCogView4(
        eager.pipe, device="cpu", compile_blocks=True, compile_backend=failing_backend
    )
    if not fall_back:
        with pytest.raises(EngineLoadError, match="COGVIEW_TORCH_COMPILE=off"):
            broken.warm_up_compiled([WARM], fall_back=False)
        return
    with torch.inference_mode():
        broken.warm_up_compiled([WARM], fall_back=True)
    assert not broken.compiled
    assert broken.blocks == list(eager.pipe.transformer.transformer_blocks)
    assert "torch.compile failed" in caplog.text and "no C compiler" in caplog.text
    job = [FastJob(PROMPTS[0], "", (7,))]
    [ours], [reference] = fast_latents(broken, job, *WARM, 2), fast_latents(eager, job, *WARM, 2)
    assert ours is not None and reference is not None and torch.equal(ours, reference)


def test_a_size_whose_token_count_equals_the_model_width_does_not_pin_the_graphs(
    engines: tuple[FastCogView4, FastCogView4],
) -> None:
    """At 1024x1024 the real model has 4096 image tokens and width 4096. torch's duck sizing
    would give both one symbol, the weights fix the width, and every other size would
    recompile. Here the tiny model's width is 32, which 128x64 (8x4 patches) matches: warmed up
    there, another size must not compile again. Last in this file: it starts dynamo afresh."""
    eager, _ = engines
    torch._dynamo.reset()
    fast = FastCogView4(eager.pipe, device="cpu", compile_blocks=True, compile_backend="aot_eager")
    with torch.inference_mode():
        fast.warmup([(128, 64)])
    warmed = graphs()
    jobs = [FastJob(PROMPTS[0], "", (1,)), FastJob(LONG, "", (2,))]
    for size in [(128, 128), (192, 64)]:
        ours = fast_latents(fast, jobs, *size, steps=2)
        reference = fast_latents(eager, jobs, *size, steps=2)
        assert graphs() == warmed, f"{size} compiled again"
        for a, b in zip(ours, reference, strict=True):
            assert a is not None and b is not None and max_diff(a, b) <= LATENT_TOL
