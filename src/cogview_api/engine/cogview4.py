"""CogView 4 on Hugging Face diffusers: with `cogview4_fast.py` and the model builders, the
only modules that import torch.

Loads `CogView4Pipeline` in bf16 on a CUDA device for the real weights, or the tiny
random-weight pipeline in fp32 on the CPU (or GPU) for trying the API without one, and runs it
either through our fast path (`COGVIEW_ENGINE=fast`, `cogview4_fast.py`) or as the stock
pipeline (`stock`). Torch and diffusers errors are translated into `EngineError`s here and go
no further.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import CogView4Pipeline

from cogview_api.config import DEFAULT_MODEL, FULL_RANDOM_MODEL, Settings
from cogview_api.domain import BatchKey
from cogview_api.engine import EngineJob, PreviewFn, ProgressFn
from cogview_api.engine.cogview4_fast import FastCogView4, FastJob
from cogview_api.engine.device import REAL_MODEL_GPU_GB, model_device, resolve_device
from cogview_api.errors import EngineError, EngineLoadError, EngineOutOfMemory
from cogview_api.metrics import instruments

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)


class CogView4Engine:
    """A loaded pipeline behind the `Engine` interface: our fast path, or the stock pipeline.

    `fast` is None for the stock engine. Both can share one pipeline's weights:
    `CogView4Engine.from_pipe(engine.pipe, settings)` with another `engine` setting.
    """

    def __init__(
        self, pipe: CogView4Pipeline, *, name: str, device: str, fast: FastCogView4 | None
    ) -> None:
        self.pipe = pipe
        self.name = name
        self.device = device
        self.fast = fast
        # One pipeline runs one call at a time: its scheduler and interrupt flag are shared.
        self._lock = threading.Lock()

    @classmethod
    def load(cls, settings: Settings, device: str | None = None) -> CogView4Engine:
        """`device`: `model_device(settings)` when the caller has it (`load_engine` checks it
        before importing this module); otherwise found here, refusing the same way."""
        device = device or model_device(settings)
        if settings.is_tiny:
            from cogview_api.engine.tiny import tiny_model_dir

            source: str | Path = tiny_model_dir(settings.cache_dir)
            dtype = torch.float32
        else:
            if settings.model == FULL_RANDOM_MODEL:  # the real architecture, random weights
                from cogview_api.engine.full_random import build_full_random_pipeline

                return cls.from_pipe(build_full_random_pipeline(device), settings, device=device)
            source, dtype = settings.model, torch.bfloat16
        try:
            pipe = CogView4Pipeline.from_pretrained(source, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise EngineLoadError(
                f"Could not load CogView 4 weights from {settings.model!r}: give --model a local "
                f"folder holding the diffusers checkpoint, or a hub id such as {DEFAULT_MODEL!r} "
                "on a machine that can download it (or has it in the Hugging Face cache), or "
                "use --model tiny."
            ) from exc
        pipe.set_progress_bar_config(disable=True)
        return cls.from_pipe(pipe, settings, device=device)

    @classmethod
    def from_pipe(
        cls, pipe: CogView4Pipeline, settings: Settings, *, device: str | None = None
    ) -> CogView4Engine:
        """An engine on an already loaded pipeline: moves it to the device, and for the fast
        engine registers our attention processor (identical to stock without a mask), compiles
        and warms up. A stock and a fast engine built on one pipeline share its weights."""
        device = device or resolve_device(settings.device)
        fast = None
        if settings.engine == "fast":
            compile_blocks = settings.torch_compile == "on" or (
                settings.torch_compile == "auto" and device.startswith("cuda")
            )
            fast = FastCogView4(
                pipe,
                device=device,
                text_encoder_mode=settings.text_encoder,
                compile_blocks=compile_blocks,
                step_cache_threshold=(
                    settings.step_cache_threshold
                    if settings.unsafe_step_cache == "first-block"
                    else None
                ),
                fp8=settings.unsafe_fp8,
            )
        with _out_of_memory_at_load(device):
            if fast is not None:
                fast.place()
            else:
                pipe.to(device)
        engine = cls(pipe, name=settings.model, device=device, fast=fast)
        if fast is not None and fast.compiled:
            started = time.perf_counter()
            with torch.inference_mode(), _out_of_memory_at_load(device):
                fast.warm_up_compiled(
                    settings.compile_size_list, fall_back=settings.torch_compile == "auto"
                )
            if fast.compiled:
                log.info(
                    "transformer blocks compiled and warmed up for %s in %.1f s",
                    settings.compile_sizes,
                    time.perf_counter() - started,
                )
        return engine

    def generate(
        self,
        jobs: Sequence[EngineJob],
        progress: ProgressFn,
        preview: PreviewFn | None = None,
    ) -> list[list[Image]]:
        """See `Engine`. Previews come from the fast engine only: the stock pipeline's step
        callback is not handed the velocity a prediction needs (COGVIEW_ENGINE=stock, a
        reference path, decodes none)."""
        with self._lock:
            if self.fast is None:
                try:
                    return [self._generate_one(job, progress) for job in jobs]
                finally:
                    self._record_memory()
            results: dict[int, list[Image]] = {}
            try:
                for batch in _batches(jobs):
                    results.update(self._generate_batch(jobs, batch, progress, preview))
            finally:
                self._record_memory()
            return [results[i] for i in range(len(jobs))]

    def _record_memory(self) -> None:
        """GPU memory now and at its peak since the start, for the metrics (CUDA only)."""
        if not self.device.startswith("cuda"):
            return
        m = instruments()
        m.gpu_memory.labels(self.device).set(torch.cuda.memory_allocated(self.device))
        m.gpu_memory_peak.labels(self.device).set(torch.cuda.max_memory_allocated(self.device))

    def _generate_batch(
        self,
        jobs: Sequence[EngineJob],
        batch: list[int],
        progress: ProgressFn,
        preview: PreviewFn | None = None,
    ) -> dict[int, list[Image]]:
        """Jobs `batch` (indexes into `jobs`, one batch key) in one denoising loop."""
        assert self.fast is not None
        first = jobs[batch[0]]

        def on_step(group: int, step: int) -> bool:
            job = jobs[batch[group]]
            return progress(job.task_id, "denoising" if step < job.steps else "decoding", step)

        def on_preview(group: int, step: int, latent: torch.Tensor) -> None:
            assert preview is not None
            job = jobs[batch[group]]
            image = self._decode_one(latent)
            preview(job.task_id, job.preview_steps.index(step), step, image)

        wants_previews = preview is not None and any(jobs[i].preview_steps for i in batch)

        try:
            with torch.inference_mode():
                latents = self.fast.denoise(
                    [
                        FastJob(
                            jobs[i].prompt,
                            jobs[i].negative_prompt,
                            jobs[i].seeds,
                            jobs[i].preview_steps,
                        )
                        for i in batch
                    ],
                    width=first.width,
                    height=first.height,
                    steps=first.steps,
                    guidance_scale=first.guidance_scale,
                    on_step=on_step,
                    on_preview=on_preview if wants_previews else None,
                )
                return {
                    i: [] if rows is None else self._decode(rows)
                    for i, rows in zip(batch, latents, strict=True)
                }
        except torch.OutOfMemoryError as exc:
            _free_device_memory()
            raise EngineOutOfMemory(
                "The GPU ran out of memory for this batch; try a smaller size, fewer images "
                "or a smaller COGVIEW_MAX_BATCH_SIZE."
            ) from exc
        except (RuntimeError, ValueError) as exc:
            log.exception("engine failed on batch %s", [jobs[i].task_id for i in batch])
            raise EngineError(f"The engine failed on this task: {type(exc).__name__}.") from exc

    def _generate_one(self, job: EngineJob, progress: ProgressFn) -> list[Image]:
        stopped = False

        def on_step(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            nonlocal stopped
            step = i + 1
            if not progress(job.task_id, "denoising" if step < job.steps else "decoding", step):
                # Cancelled, or no longer ours: the pipeline skips its remaining steps.
                pipe._interrupt = True
                stopped = True
            return kwargs

        # CPU generators: the same seed gives the same image on any device and in any batch.
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in job.seeds]
        try:
            with torch.inference_mode():
                # Latents out, decoded below: an interrupted pipeline would still run the VAE
                # on latents nobody wants.
                latents = self.pipe(
                    prompt=job.prompt,
                    negative_prompt=job.negative_prompt,
                    width=job.width,
                    height=job.height,
                    num_inference_steps=job.steps,
                    guidance_scale=job.guidance_scale,
                    num_images_per_prompt=len(job.seeds),
                    generator=generators,
                    callback_on_step_end=on_step,
                    output_type="latent",
                ).images
                return [] if stopped else self._decode(latents)
        except torch.OutOfMemoryError as exc:
            _free_device_memory()
            raise EngineOutOfMemory(
                "The GPU ran out of memory for this task; try a smaller size or fewer images."
            ) from exc
        except (RuntimeError, ValueError) as exc:
            log.exception("engine failed on task %s", job.task_id)
            raise EngineError(f"The engine failed on this task: {type(exc).__name__}.") from exc

    def _decode(self, latents: torch.Tensor) -> list[Image]:
        """What the pipeline does after its loop for `output_type="pil"`, same operations, one
        image at a time: the VAE's activations at full resolution are the largest tensors of a
        task (about 3.2 GB per 1024*1024 image in bf16, bench/memory_estimate.py), so decoding
        a job's four images together would need four times that at once."""
        started = time.perf_counter()
        images = [self._decode_one(row) for row in latents.split(1)]
        # PIL images are on the host: the GPU is done with them.
        instruments().stage.labels("decode").observe(time.perf_counter() - started)
        return images

    def _decode_one(self, latent: torch.Tensor) -> Image:
        """One latent (1, C, h, w) through the VAE, to a PIL image."""
        vae = self.pipe.vae
        decoded = vae.decode(latent.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)
        image: Image = self.pipe.image_processor.postprocess(decoded[0], output_type="pil")[0]
        return image


def _batches(jobs: Sequence[EngineJob]) -> list[list[int]]:
    """Indexes of jobs grouped by what one denoising loop shares, in first-seen order. The
    worker only batches jobs of one key; this keeps any other caller correct."""
    groups: dict[BatchKey, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(BatchKey.of(job), []).append(i)
    return list(groups.values())


@contextmanager
def _out_of_memory_at_load(device: str) -> Iterator[None]:
    try:
        yield
    except torch.OutOfMemoryError as exc:
        raise EngineLoadError(
            f"The model does not fit on {device}: CogView4-6B needs about "
            f"{REAL_MODEL_GPU_GB} GB of GPU memory with everything resident, less with "
            "COGVIEW_TEXT_ENCODER=cpu or offload."
        ) from exc


def _free_device_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
