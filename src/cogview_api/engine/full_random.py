# diffusers and transformers ship partial annotations: calls into them are untyped.
# mypy: disable-error-code="no-untyped-call,attr-defined,union-attr"
"""The real CogView4-6B architecture with random weights, for measuring speed without the weights.

Every part has the exact shape of `THUDM/CogView4-6B` (configs written out below from the
model's published component configs; nothing is downloaded): the 28-block
CogView4 transformer (6.37B params), the GLM-4-9B text encoder as `GlmModel` (8.78B), the
16-channel AutoencoderKL (0.41B) and the real flow-matching scheduler; about 31 GB in bf16.
Its images are noise, but every matrix product, attention and convolution has the real size,
so its timings and memory are those of the real model.

The weights are created directly on the target device in the target dtype (default dtype
switched for the build), so a GPU box never holds 60 GB of fp32 weights in CPU RAM and the
random init runs on the GPU in seconds. On `torch.device("meta")` the same build costs no
memory at all, which is how the tests check the configs by their parameter counts.

The tokenizer is the tiny model's locally trained BPE tokenizer (GLM-style `[gMASK]<sop>`
prefix, left padding). Its ids (< 600) are valid rows of GLM's 151,552-row embedding, so the
embedding keeps GLM's real size; a prompt may split into a different number of tokens than with
GLM's own tokenizer, but the pipeline pads text to a multiple of 16 anyway.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    CogView4Pipeline,
    CogView4Transformer2DModel,
    FlowMatchEulerDiscreteScheduler,
)
from transformers import GlmConfig, GlmModel

from cogview_api.engine.tiny import SCHEDULER_CONFIG, _tokenizer

# The `--model` value that selects this pipeline in the benchmark (and, once the engine's
# loader accepts it, in `cogview-api serve`).
FULL_RANDOM_MODEL = "full-random"

# transformer/config.json of THUDM/CogView4-6B (research notes 2.1); the class defaults are
# CogView3-Plus values, so every field is given.
TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 28,
    "attention_head_dim": 128,
    "num_attention_heads": 32,
    "text_embed_dim": 4096,
    "time_embed_dim": 512,
    "condition_dim": 256,
    "pos_embed_max_size": 128,
    "sample_size": 128,
    "rope_axes_dim": (256, 256),
}

# GLM-4-9B (THUDM/glm-4-9b-chat HF conversion; research notes 2.2).
GLM_CONFIG: dict[str, Any] = {
    "vocab_size": 151552,
    "hidden_size": 4096,
    "intermediate_size": 13696,
    "num_hidden_layers": 40,
    "num_attention_heads": 32,
    "num_key_value_heads": 2,
    "head_dim": 128,
    "partial_rotary_factor": 0.5,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1.5625e-07,
    "attention_bias": True,
    "max_position_embeddings": 131072,
    "pad_token_id": 151329,
    "eos_token_id": [151329, 151336, 151338],
}

# vae config from diffusers' scripts/convert_cogview4_to_diffusers.py (research notes 2.3).
VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 512, 1024, 1024),
    "layers_per_block": 3,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 1.0,
    "shift_factor": 0.0,
    "force_upcast": True,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": False,
}


@contextmanager
def _building_on(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """New parameters land on `device` in `dtype`; the process defaults come back afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(previous)


def build_full_random_pipeline(
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> CogView4Pipeline:
    """A `CogView4Pipeline` of the real CogView4-6B shapes with random weights on `device`.

    Needs about 31 GB of free device memory in bf16 (none on `meta`). The same seed on the same
    device gives the same weights. The modules are in eval mode, as `from_pretrained` leaves them.
    """
    target = torch.device(device)
    tokenizer = _tokenizer()
    with _building_on(target, dtype):
        # One seed per part, so a change to one config leaves the other parts' weights alone.
        torch.manual_seed(seed)
        text_encoder = GlmModel(GlmConfig(**GLM_CONFIG))
        torch.manual_seed(seed + 1)
        transformer = CogView4Transformer2DModel(**TRANSFORMER_CONFIG)
        torch.manual_seed(seed + 2)
        vae = AutoencoderKL(**VAE_CONFIG)
    for module in (text_encoder, transformer, vae):
        module.eval().requires_grad_(False)
    return CogView4Pipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
    )


def parameter_counts(pipe: CogView4Pipeline) -> dict[str, int]:
    """Parameters per module of a pipeline (works on `meta` tensors too)."""
    modules = {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder, "vae": pipe.vae}
    return {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}
