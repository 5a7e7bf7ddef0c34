"""CogView 4 on Hugging Face diffusers: the one module (with `tiny.py`) that imports torch.

Loads `CogView4Pipeline` in bf16 on a CUDA device for the real weights, or the tiny
random-weight pipeline in fp32 on the CPU (or GPU) for trying the API without one.
Torch and diffusers errors are translated into `EngineError`s here and go no further.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import CogView4Pipeline

from cogview_api.config import DEFAULT_MODEL, Settings
from cogview_api.engine import EngineJob, ProgressFn
from cogview_api.errors import EngineError, EngineLoadError, EngineOutOfMemory

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)

REAL_MODEL_GPU_GB = 40  # everything resident in bf16, with room for 2048-pixel activations


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise EngineLoadError(
            f"COGVIEW_DEVICE is {requested!r} but no CUDA GPU is visible to this process."
        )
    return requested


class CogView4Engine:
    """The stock diffusers pipeline behind the `Engine` interface."""

    def __init__(self, pipe: CogView4Pipeline, *, name: str, device: str) -> None:
        self.pipe = pipe
        self.name = name
        self.device = device
        # One pipeline runs one call at a time: its scheduler and interrupt flag are shared.
        self._lock = threading.Lock()

    @classmethod
    def load(cls, settings: Settings) -> CogView4Engine:
        device = resolve_device(settings.device)
        if settings.is_tiny:
            from cogview_api.engine.tiny import tiny_model_dir

            source: str | Path = tiny_model_dir(settings.cache_dir)
            dtype = torch.float32
        else:
            if not device.startswith("cuda"):
                raise EngineLoadError(
                    "The real CogView4-6B model needs a CUDA GPU with about "
                    f"{REAL_MODEL_GPU_GB} GB of memory and none was found; run with --model tiny "
                    "to try the API without a GPU, or start on a machine with one."
                )
            source, dtype = settings.model, torch.bfloat16
        try:
            pipe = CogView4Pipeline.from_pretrained(source, torch_dtype=dtype)
        except (OSError, ValueError) as exc:
            raise EngineLoadError(
                f"Could not load CogView 4 weights from {settings.model!r}: give --model a local "
                f"folder holding the diffusers checkpoint, or a hub id such as {DEFAULT_MODEL!r} "
                "on a machine that can download it (or has it in the Hugging Face cache), or "
                "use --model tiny."
            ) from exc
        pipe.set_progress_bar_config(disable=True)
        try:
            pipe.to(device)
        except torch.OutOfMemoryError as exc:
            raise EngineLoadError(
                f"The model does not fit on {device}: CogView4-6B needs about "
                f"{REAL_MODEL_GPU_GB} GB of GPU memory."
            ) from exc
        return cls(pipe, name=settings.model, device=device)

    def generate(self, jobs: Sequence[EngineJob], progress: ProgressFn) -> list[list[Image]]:
        with self._lock:
            return [self._generate_one(job, progress) for job in jobs]

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
        """What the pipeline does after its loop for `output_type="pil"`, same operations."""
        vae = self.pipe.vae
        decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)
        return list(self.pipe.image_processor.postprocess(decoded[0], output_type="pil"))


def _free_device_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
