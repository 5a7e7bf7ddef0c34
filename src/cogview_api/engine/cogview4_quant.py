"""Quantization for the fast CogView 4 path (torchao), both changing the image: an int8 text
encoder (a memory mode) and FP8 transformer matmuls (a speed mode, CUDA 8.9+ only)."""

from __future__ import annotations

import torch
from torch import nn

from cogview_api.errors import EngineLoadError


def quantize_int8(text_encoder: nn.Module) -> None:
    """GLM's linear weights to int8 (weight-only, per channel) with torchao, in place: about half
    the memory of bf16; the embeddings, and so the images, change slightly."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as exc:
        raise EngineLoadError(
            "COGVIEW_TEXT_ENCODER=int8 needs torchao: pip install 'cogview-api[int8]' "
            "(or torchao), or choose gpu, cpu or offload."
        ) from exc
    quantize_(text_encoder, Int8WeightOnlyConfig())


FP8_CAPABILITY = (8, 9)  # Ada and Hopper: L4, L40S, H100, H200


def check_fp8_device(device: torch.device) -> None:
    """FP8 matmuls need CUDA with compute capability 8.9 or newer; anything else is refused
    at load with a sentence, not at the first task."""
    if device.type != "cuda" or not torch.cuda.is_available():
        raise EngineLoadError(
            "COGVIEW_UNSAFE_FP8=true needs a CUDA GPU with FP8 support (L4, L40S, H100, H200); "
            "this engine runs on the CPU. Set COGVIEW_UNSAFE_FP8=false."
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_CAPABILITY:
        raise EngineLoadError(
            f"COGVIEW_UNSAFE_FP8=true needs compute capability 8.9 or newer (L4, L40S, H100, "
            f"H200); this GPU has {capability[0]}.{capability[1]}. Set COGVIEW_UNSAFE_FP8=false."
        )


def quantize_fp8(transformer: nn.Module) -> None:
    """The attention and feed-forward linears of every block to FP8 (e4m3, dynamic per-row
    activation scales, torchao), in place. Image-changing. The adaLN linears (a few rows of
    `temb`), the embeddings and the output projection stay in bf16."""
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            PerRow,
            quantize_,
        )
    except ImportError as exc:
        raise EngineLoadError(
            "COGVIEW_UNSAFE_FP8=true needs torchao: pip install torchao (or 'cogview-api[int8]')."
        ) from exc

    def large_linear(module: nn.Module, name: str) -> bool:
        return isinstance(module, nn.Linear) and (".attn1." in f".{name}" or ".ff." in f".{name}")

    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    for block in transformer.transformer_blocks:  # type: ignore[union-attr]
        quantize_(block, config, filter_fn=large_linear)
