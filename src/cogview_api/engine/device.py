"""Which device a model runs on, and the refusal of the real model without a GPU: torch only,
no diffusers, so that a start that cannot run the model says so in about two seconds rather
than after importing diffusers and transformers (about six more on a small machine)."""

from __future__ import annotations

import torch

from cogview_api.config import Settings
from cogview_api.errors import EngineLoadError

REAL_MODEL_GPU_GB = 40  # everything resident in bf16 at ~1 MP (bench/memory_estimate.py: ~34-38 GB)
# GLM off the GPU (offload / cpu): ~17-21 GB at ~1 MP, so a 24 GB card (README's table).
SMALL_GPU_GB = 24


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise EngineLoadError(
            f"COGVIEW_DEVICE is {requested!r} but no CUDA GPU is visible to this process."
        )
    return requested


def model_device(settings: Settings) -> str:
    """The device for the configured model; EngineLoadError for the real model without a GPU."""
    device = resolve_device(settings.device)
    if not settings.is_tiny and not device.startswith("cuda"):
        raise EngineLoadError(
            f"The real CogView4-6B model needs a CUDA GPU (about {REAL_MODEL_GPU_GB} GB"
            f" with everything resident, or {SMALL_GPU_GB} GB with"
            " COGVIEW_TEXT_ENCODER=offload or cpu) and none was found; run with"
            " --model tiny to try the API without a GPU, or start on a machine with one."
        )
    return device
