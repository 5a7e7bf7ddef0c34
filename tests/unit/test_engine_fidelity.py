"""The fast engine gives the stock diffusers pipeline's images, alone or batched, with the tiny
random-weight CogView4 on the CPU in fp32.

Tolerances, from measurements with margin (docs/architecture.md "The fast path"): batching cond
with uncond, and jobs with each other, changes the shapes of the GEMMs and of the SDPA calls,
so fp32 sums are reassociated. Measured on this model at the seven preset sizes, one step:
latents differ by at most 3.3e-6 and decoded pixels in [0, 1] by at most 4.7e-6, so
LATENT_TOL = 1e-5 and PIXEL_TOL = 2e-5 (3-4x margin, still 200x under one 8-bit level, 3.9e-3).
A pixel value that lies on a rounding boundary can still flip by one level in the 8-bit PNG, so
the PIL images may differ by 1/255 and no more. Text embeddings are bit-identical: the dropped
GLM layer runs after the one the pipeline reads.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY

from cogview_api.config import Settings
from cogview_api.domain import PRESET_SIZES
from cogview_api.engine import EngineJob
from cogview_api.engine.cogview4 import CogView4Engine
from cogview_api.engine.cogview4_fast import FastCogView4, FastJob, stream_from_cpu
from cogview_api.errors import EngineLoadError
from tests.conftest import make_settings

LATENT_TOL = 1e-5
PIXEL_TOL = 2e-5
LONG = "a red bicycle leaning against a blue wall in a narrow street of an old town at sunset"
PROMPTS = [  # four token lengths: 16, 32 and 48-token buckets, and one shorter than 16
    "a cat",
    "a photo of a cat sitting on a windowsill at sunset, warm light, 35mm film",
    LONG + ", watercolor illustration of a lighthouse on a cliff during a storm at night",
    "portrait of an astronaut, studio lighting",
]
SMALL = 512
STEPS = 3


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path) -> Settings:
    return make_settings(tmp_path_factory.mktemp("fidelity"), tiny_cache)


@pytest.fixture(scope="module")
def engine(settings: Settings) -> CogView4Engine:
    return CogView4Engine.load(settings)


@pytest.fixture(scope="module")
def fast(engine: CogView4Engine) -> FastCogView4:
    assert engine.fast is not None, "COGVIEW_ENGINE defaults to fast"
    return engine.fast


def stock_latents(
    engine: CogView4Engine,
    prompt: str,
    width: int,
    height: int,
    seed: int,
    steps: int,
    guidance_scale: float = 3.5,
) -> torch.Tensor:
    with torch.inference_mode():
        out = engine.pipe(
            prompt=prompt,
            negative_prompt="",
            width=width,
            height=height,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=[torch.Generator("cpu").manual_seed(seed)],
            output_type="latent",
        )
    return out.images  # type: ignore[no-any-return]


def fast_latents(
    fast: FastCogView4,
    jobs: list[FastJob],
    width: int = SMALL,
    height: int = SMALL,
    steps: int = STEPS,
    on_step: Callable[[int, int], bool] = lambda g, s: True,
    guidance_scale: float = 3.5,
) -> list[torch.Tensor | None]:
    with torch.inference_mode():
        return fast.denoise(
            jobs,
            width=width,
            height=height,
            steps=steps,
            guidance_scale=guidance_scale,
            on_step=on_step,
        )


def pixels(engine: CogView4Engine, latents: torch.Tensor) -> np.ndarray:
    """The decoded image in [0, 1], as the pipeline's postprocess makes it before 8-bit PIL."""
    with torch.inference_mode():
        decoded = engine.pipe.vae.decode(latents, return_dict=False)[0]
        return engine.pipe.image_processor.postprocess(decoded, output_type="np")  # type: ignore[no-any-return]


def max_diff(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    a, b = (x.double() if isinstance(x, torch.Tensor) else x for x in (a, b))  # numpy has no bf16
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def test_prompt_embeddings_without_the_last_glm_layer_are_the_stock_hidden_states(
    engine: CogView4Engine, fast: FastCogView4
) -> None:
    """`hidden_states[-2]` of the whole GLM == the output of GLM cut after layer N-1."""
    assert len(fast.text_encoder.layers) == len(engine.pipe.text_encoder.layers) - 1
    for prompt in ["", *PROMPTS]:
        with torch.inference_mode():
            ours = fast.encode([prompt])[prompt]
            stock = engine.pipe._get_glm_embeds(prompt)
        assert ours.shape == stock.shape and ours.shape[1] % 16 == 0
        assert torch.equal(ours, stock), prompt


def test_the_empty_negative_prompt_is_encoded_once(fast: FastCogView4) -> None:
    with torch.inference_mode():
        first = fast.encode([""])[""]
        again = fast.encode(["", "a cat"])[""]
    assert again is first  # the cached tensor, not a new encoding


@pytest.mark.parametrize(
    ("width", "height"), PRESET_SIZES, ids=[f"{w}x{h}" for w, h in PRESET_SIZES]
)
def test_fast_path_gives_the_stock_image_at_every_preset_size(
    engine: CogView4Engine, fast: FastCogView4, width: int, height: int
) -> None:
    """One step, a 32-token prompt against the 16-token empty negative prompt: cond and uncond
    go through one forward with the uncond text padded and masked. The latents are compared at
    every size; the pixels at the first one only: both paths decode with the same stock VAE, so
    only the latents can differ, and the VAE at these sizes was 4 of each case's 5.5 s."""
    seed = width * 7 + height
    stock = stock_latents(engine, LONG, width, height, seed, steps=1)
    [ours] = fast_latents(fast, [FastJob(LONG, "", (seed,))], width, height, steps=1)
    assert ours is not None and ours.shape == stock.shape
    latent_diff = max_diff(ours, stock)
    print(f"{width}x{height}: latents {latent_diff:.2e}")
    assert latent_diff <= LATENT_TOL
    if (width, height) == PRESET_SIZES[0]:
        ours_px, stock_px = pixels(engine, torch.cat([ours, stock]))  # one VAE call for both
        pixel_diff = max_diff(ours_px, stock_px)
        print(f"{width}x{height}: pixels {pixel_diff:.2e}")
        assert pixel_diff <= PIXEL_TOL


def test_a_job_gives_the_same_image_alone_and_in_a_batch_of_four(fast: FastCogView4) -> None:
    """Prompts of four token lengths, one job with two images: every image as when alone."""
    jobs = [FastJob(p, "", (11 + i,)) for i, p in enumerate(PROMPTS)]
    jobs[1] = FastJob(PROMPTS[1], "blurry", (12, 99))
    batched = fast_latents(fast, jobs)
    for job, together in zip(jobs, batched, strict=True):
        [alone] = fast_latents(fast, [job])
        assert together is not None and alone is not None
        assert together.shape[0] == len(job.seeds)
        assert max_diff(together, alone) <= LATENT_TOL, job.prompt


@pytest.mark.parametrize("guidance", [3.5, 1.0], ids=["guided", "unguided"])
def test_fast_path_gives_the_stock_latents_over_several_steps(
    engine: CogView4Engine, fast: FastCogView4, guidance: float
) -> None:
    """Guidance 1 runs no uncond rows, as the stock pipeline."""
    stock = stock_latents(engine, PROMPTS[0], SMALL, SMALL, 5, STEPS, guidance)
    [ours] = fast_latents(fast, [FastJob(PROMPTS[0], "", (5,))], guidance_scale=guidance)
    assert ours is not None and max_diff(ours, stock) <= LATENT_TOL


def test_cancelling_one_job_of_four_leaves_the_others_images_unchanged(
    engine: CogView4Engine,
) -> None:
    """Job 2 says stop at step 2 of 3: it returns [] and is asked nothing more; the others'
    8-bit images equal their solo images (up to one level, see the module docstring)."""
    jobs = [
        EngineJob(f"t{i}", p, "", SMALL, SMALL, STEPS, 3.5, (21 + i,))
        for i, p in enumerate(PROMPTS)
    ]
    asked: list[tuple[str, str, int]] = []

    def progress(task_id: str, stage: str, step: int) -> bool:
        asked.append((task_id, stage, step))
        return not (task_id == "t2" and step == 2)

    batched = engine.generate(jobs, progress)
    assert batched[2] == []
    assert [s for t, _, s in asked if t == "t2"] == [1, 2]
    assert [(st, s) for t, st, s in asked if t == "t0"] == [
        ("denoising", 1),
        ("denoising", 2),
        ("decoding", 3),
    ]
    for i in (0, 1, 3):
        [alone] = engine.generate([jobs[i]], lambda *a: True)[0]
        [together] = batched[i]
        assert together.size == (SMALL, SMALL)
        assert max_diff(np.asarray(together), np.asarray(alone)) <= 1


def test_text_encoder_modes_give_the_same_image(engine: CogView4Engine, settings: Settings) -> None:
    """cpu and offload move the text encoder only on CUDA; elsewhere they must still work."""
    job = FastJob(PROMPTS[3], "", (3,))
    [reference] = fast_latents(engine.fast, [job])  # type: ignore[arg-type]
    for mode in ("cpu", "offload"):
        other = CogView4Engine.from_pipe(
            engine.pipe, settings.model_copy(update={"text_encoder": mode})
        )
        assert other.fast is not None
        [latents] = fast_latents(other.fast, [job])
        assert latents is not None and reference is not None
        assert max_diff(latents, reference) <= LATENT_TOL


def test_offload_streams_glm_weights_per_layer_and_gives_the_same_embeddings(
    engine: CogView4Engine, settings: Settings
) -> None:
    """COGVIEW_TEXT_ENCODER=offload on CUDA: GLM's weights stay in CPU memory and each leaf
    module's visit the device only for its own forward (here the "device" is the CPU too, so
    this checks the hooks and that nothing stays resident, not the copies)."""
    streamed = CogView4Engine.load(settings)  # its own pipeline: the hooks change its modules
    assert streamed.fast is not None and engine.fast is not None
    stream_from_cpu(streamed.fast.text_encoder, torch.device("cpu"))
    for prompt in ["", PROMPTS[1], LONG]:
        with torch.inference_mode():
            ours = streamed.fast._encode_one(prompt)
            resident = engine.fast._encode_one(prompt)
        assert torch.equal(ours, resident), prompt
    view = streamed.fast.text_encoder
    held = {p.device.type for p in view.parameters()}
    assert held == {"meta"}, "between forwards no GLM weight is held where it runs"


def test_stock_engine_is_still_available(engine: CogView4Engine, settings: Settings) -> None:
    stock = CogView4Engine.from_pipe(engine.pipe, settings.model_copy(update={"engine": "stock"}))
    assert stock.fast is None
    [[image]] = stock.generate(
        [EngineJob("s", PROMPTS[0], "", SMALL, SMALL, 2, 3.5, (1,))], lambda *a: True
    )
    assert image.size == (SMALL, SMALL)


def test_first_block_step_cache_runs_and_changes_the_image_a_little(
    engine: CogView4Engine, settings: Settings
) -> None:
    """Image-changing mode: measured, not held to the exact tolerance. Threshold 0.2 over 8
    steps; the difference is printed (docs/architecture.md quotes it)."""
    cached = CogView4Engine.from_pipe(
        engine.pipe,
        settings.model_copy(
            update={"unsafe_step_cache": "first-block", "step_cache_threshold": 0.2}
        ),
    )
    assert cached.fast is not None and engine.fast is not None
    jobs = [FastJob(PROMPTS[1], "", (8,)), FastJob(PROMPTS[2], "", (9,))]
    exact = fast_latents(engine.fast, jobs, steps=8)
    approx = fast_latents(cached.fast, jobs, steps=8)
    cache = cached.fast.last_step_cache
    assert cache is not None and cache.computed + cache.skipped == 8 * 4
    diffs = []
    for e, a in zip(exact, approx, strict=True):
        assert e is not None and a is not None and a.shape == e.shape
        assert torch.isfinite(a).all()
        diffs.append(max_diff(pixels(engine, a), pixels(engine, e)))
    print(
        f"step cache: skipped {cache.skipped}/{8 * 4} rows-steps, max pixel diff {max(diffs):.3f}"
    )
    assert 0 < cache.skipped < 8 * 4  # it did skip, and it did not skip everything


def test_int8_text_encoder_runs_and_moves_the_embeddings_a_little(
    engine: CogView4Engine, settings: Settings
) -> None:
    """Image-changing memory mode: GLM's linear weights in int8 (torchao, weight-only). It
    works on the CPU too, so it is tested here on its own pipeline (it quantizes in place).
    Measured: embeddings move by about 0.1% of their range; the bound below is 2%."""
    int8 = CogView4Engine.load(settings.model_copy(update={"text_encoder": "int8"}))
    assert int8.fast is not None and engine.fast is not None
    weight = int8.pipe.text_encoder.layers[0].mlp.down_proj.weight
    assert "Int8" in type(weight).__name__
    prompt = PROMPTS[1]
    with torch.inference_mode():
        ours, exact = int8.fast.encode([prompt])[prompt], engine.fast.encode([prompt])[prompt]
    change = max_diff(ours, exact) / float(exact.abs().max())
    [latents] = fast_latents(int8.fast, [FastJob(prompt, "", (4,))])
    [reference] = fast_latents(engine.fast, [FastJob(prompt, "", (4,))])
    assert latents is not None and reference is not None
    moved = max_diff(latents, reference)
    print(f"int8 text encoder: embeddings {change:.2e} of range, latents {moved:.2e}")
    assert 0 < change < 0.02


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine may have an FP8 GPU")
def test_fp8_is_refused_at_load_without_an_fp8_gpu(
    engine: CogView4Engine, settings: Settings
) -> None:
    """COGVIEW_UNSAFE_FP8 needs CUDA capability 8.9+: elsewhere the start stops with a sentence
    (before anything is changed on the shared pipeline)."""
    with pytest.raises(EngineLoadError, match="COGVIEW_UNSAFE_FP8"):
        CogView4Engine.from_pipe(engine.pipe, settings.model_copy(update={"unsafe_fp8": True}))


def test_rotary_embeddings_are_built_once_per_shape_on_the_device(
    fast: FastCogView4, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, ...]] = []
    build = fast.pipe.transformer.rope.forward

    def counting(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(tuple(latents.shape))
        return build(latents)  # type: ignore[no-any-return]

    monkeypatch.setattr(fast.pipe.transformer.rope, "forward", counting)
    fast._rope.clear()
    for _ in range(2):
        fast_latents(fast, [FastJob(PROMPTS[0], "", (1,))], 528, 512, steps=2)
    assert len(calls) == 1  # not once per step, forward or block
    cos, sin = fast._rope[(512 // 8, 528 // 8)]
    assert cos.device == sin.device == fast.device


@pytest.fixture(scope="module")
def bf16_engine(settings: Settings) -> CogView4Engine:
    """The tiny pipeline in bf16, the dtype the real model runs in, on its own weights."""
    from diffusers import CogView4Pipeline

    from cogview_api.engine.tiny import tiny_model_dir

    pipe = CogView4Pipeline.from_pretrained(
        tiny_model_dir(settings.cache_dir), dtype=torch.bfloat16
    )
    pipe.set_progress_bar_config(disable=True)
    return CogView4Engine.from_pipe(pipe, settings)


def test_in_bf16_the_fast_path_gives_the_stock_image_alone_and_batched(
    bf16_engine: CogView4Engine,
) -> None:
    """bf16, as on a GPU (here CPU kernels): the fp32 tests' reassociation differences are far
    under one bf16 step, and measured they vanish: latents and pixels equal stock's exactly at
    1024x1024 and 1440x720, 3 steps, padded uncond, and a job equals itself alone in a batch
    of four. The bound admits one bf16 rounding flip (an ulp at the latents' magnitude, ~8:
    2**-4) and one 8-bit level, so a kernel change cannot make this flaky, but a dtype or
    batching bug (differences of the latents' own size) fails it."""
    fast = bf16_engine.fast
    assert fast is not None and fast.dtype == torch.bfloat16
    for width, height in [(1024, 1024), (1440, 720)]:
        stock = stock_latents(bf16_engine, LONG, width, height, 5, STEPS)
        [ours] = fast_latents(fast, [FastJob(LONG, "", (5,))], width, height)
        assert ours is not None and ours.dtype == stock.dtype == torch.bfloat16
        latent_diff = max_diff(ours, stock)
        if latent_diff == 0:
            # The same latents decode to the same pixels. A bf16 VAE decode costs about two
            # minutes per image on a CPU without bf16 convolutions (AVX2 only), so it runs only
            # when there is a difference for it to measure.
            pixel_levels = 0.0
        else:
            ours_px, stock_px = pixels(bf16_engine, torch.cat([ours, stock]))
            pixel_levels = max_diff(np.round(ours_px * 255), np.round(stock_px * 255))
        print(f"bf16 {width}x{height}: latents {latent_diff:.2e}, 8-bit levels {pixel_levels}")
        assert latent_diff <= 2**-4
        assert pixel_levels <= 1
    jobs = [FastJob(p, "", (11 + i,)) for i, p in enumerate(PROMPTS)]
    for job, together in zip(jobs, fast_latents(fast, jobs), strict=True):
        [alone] = fast_latents(fast, [job])
        assert together is not None and alone is not None
        assert max_diff(together, alone) <= 2**-4, job.prompt


def test_the_fast_engine_records_its_stage_times(engine: CogView4Engine) -> None:
    """One batch of two jobs: one encode and one denoise for the batch, a decode per job
    (cogview_api.metrics; GPU memory is recorded on CUDA only)."""
    stages = ("encode", "denoise", "decode")

    def counts() -> list[float]:
        name = "cogview_stage_duration_seconds_count"
        return [REGISTRY.get_sample_value(name, {"stage": s}) or 0.0 for s in stages]

    before = counts()
    jobs = [EngineJob(f"m{i}", PROMPTS[i], "", SMALL, SMALL, 2, 3.5, (i,)) for i in range(2)]
    engine.generate(jobs, lambda *a: True)
    assert [b - a for a, b in zip(before, counts(), strict=True)] == [1, 1, 2]
