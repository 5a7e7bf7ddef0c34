"""Peak GPU memory of each memory mode (COGVIEW_TEXT_ENCODER), estimated without a GPU.

The full CogView4-6B architecture (`engine/full_random.py`) is built on `meta`: no memory, real
shapes. The weights a mode keeps on the GPU are counted exactly from the parameters. The
activations are traced: the text encoder, one transformer forward of a batch and the VAE
decode run on `meta` under a dispatch mode that adds up the bytes of every tensor storage while
it is alive; the peak of that sum is what a caching allocator's `max_memory_allocated` would
show above the weights, before fragmentation. SDPA runs as the flash kernel (its meta function:
output and log-sum-exp, no score matrix), as on CUDA. Not counted: the CUDA context
(~0.5 GB), cuBLAS workspaces, allocator fragmentation, torch.compile's buffers. The real
figures come from `bench/engine.py --set text_encoder=...` on a GPU (bench/gpu_run.sh).

    .venv/bin/python bench/memory_estimate.py --json bench/results/memory-estimate-meta.json
"""

from __future__ import annotations

import argparse
import json
import sys
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cogview_api.engine.cogview4_fast import FastCogView4  # noqa: E402
from cogview_api.engine.full_random import build_full_random_pipeline  # noqa: E402

GB = 1e9


class LiveBytes(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """The bytes of tensor storages made inside it and still alive, and their peak. Storages
    that exist when it starts (the weights) are known and never counted."""

    def __init__(self, known: list[torch.Tensor]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.seen: WeakIdKeyDictionary = WeakIdKeyDictionary()
        for tensor in known:
            self.seen[tensor.untyped_storage()] = 0
        self.live = 0
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if storage not in self.seen:
                    size = storage.nbytes()
                    self.seen[storage] = size
                    self.live += size
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, size)
        return out

    def _free(self, size: int) -> None:
        self.live -= size


@contextmanager
def flash_sdpa() -> Iterator[None]:
    """SDPA as CUDA's flash kernel allocates (meta would otherwise take the math path, which
    materializes the score matrix in fp32)."""
    original = F.scaled_dot_product_attention

    def flash(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kw: Any) -> Any:
        if kw.get("attn_mask") is not None:
            return original(query, key, value, **kw)
        return torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, is_causal=bool(kw.get("is_causal", False)), scale=kw.get("scale")
        )[0]

    F.scaled_dot_product_attention = flash  # type: ignore[assignment]
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def tensor_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def int8_bytes(module: nn.Module) -> int:
    """Weight-only int8 per output channel (torchao's Int8WeightOnlyConfig): each Linear weight
    one byte per element plus one bf16 scale per row; everything else as it is."""
    total = tensor_bytes(module)
    for linear in module.modules():
        if isinstance(linear, nn.Linear):
            weight = linear.weight
            total -= weight.numel() * weight.element_size()
            total += weight.numel() + weight.shape[0] * 2
    return total


def traced_peak(known: list[torch.Tensor], run: Any) -> int:
    with torch.inference_mode(), flash_sdpa(), LiveBytes(known) as tracker:
        run()
    return int(tracker.peak)


def estimate(width: int, height: int, batches: list[int], text_tokens: int) -> dict[str, Any]:
    pipe = build_full_random_pipeline("meta")
    fast = FastCogView4(pipe, device="meta")
    known = [*pipe.transformer.parameters(), *pipe.transformer.buffers()]
    known += [*pipe.text_encoder.parameters(), *pipe.text_encoder.buffers()]
    known += [*pipe.vae.parameters(), *pipe.vae.buffers()]
    view = fast.text_encoder
    weights = {
        "transformer": tensor_bytes(pipe.transformer),
        "vae": tensor_bytes(pipe.vae),
        "text_encoder": tensor_bytes(pipe.text_encoder),
        "text_encoder_used": tensor_bytes(view),
        "text_encoder_int8": int8_bytes(pipe.text_encoder),
        "text_encoder_largest_leaf": max(
            tensor_bytes(m) for m in view.modules() if not list(m.children())
        ),
    }

    def encode() -> None:
        ids = torch.zeros((1, text_tokens), dtype=torch.long, device="meta")
        view(ids).last_hidden_state.sum()

    text_peak = traced_peak(known, encode)
    scale = pipe.vae_scale_factor
    channels = pipe.transformer.config.in_channels
    rope = fast.rope(height // scale, width // scale)
    forward_peak: dict[int, int] = {}
    for batch in batches:
        rows = 2 * batch  # cond and uncond of every image in one forward

        def forward(rows: int = rows) -> None:
            latents = torch.zeros(
                (rows, channels, height // scale, width // scale),
                dtype=torch.bfloat16,
                device="meta",
            )
            text = torch.zeros((rows, text_tokens, 4096), dtype=torch.bfloat16, device="meta")
            conditions = [
                torch.zeros((rows, 2), dtype=torch.bfloat16, device="meta") for _ in range(3)
            ]
            timestep = torch.zeros((rows,), device="meta")
            fast._forward(latents, text, timestep, conditions, rope, None, None)

        forward_peak[batch] = traced_peak(known, forward)

    def decode() -> None:  # the engine decodes one image at a time (engine/cogview4.py)
        latents = torch.zeros(
            (1, channels, height // scale, width // scale), dtype=torch.bfloat16, device="meta"
        )
        pipe.vae.decode(latents, return_dict=False)

    decode_peak = traced_peak(known, decode)
    resident = weights["transformer"] + weights["vae"]
    modes: dict[str, dict[int, float]] = {}
    for batch, forward_bytes in forward_peak.items():
        denoise = max(forward_bytes, decode_peak)
        peaks = {
            "gpu": resident + weights["text_encoder"] + max(denoise, text_peak),
            "cpu": resident + denoise,
            "offload": resident + max(denoise, weights["text_encoder_largest_leaf"] + text_peak),
            "int8": resident + weights["text_encoder_int8"] + max(denoise, text_peak),
        }
        for mode, peak in peaks.items():
            modes.setdefault(mode, {})[batch] = round(peak / GB, 2)
    return {
        "what": "estimated peak GPU memory (GB) per memory mode, traced on meta; not measured",
        "size": f"{width}x{height}",
        "text_tokens": text_tokens,
        "weights_gb": {k: round(v / GB, 3) for k, v in weights.items()},
        "activations_gb": {
            "text_encoder": round(text_peak / GB, 3),
            "vae_decode_one_image": round(decode_peak / GB, 3),
            "transformer_forward_by_batch": {
                str(b): round(v / GB, 3) for b, v in forward_peak.items()
            },
        },
        "peak_gb_by_mode_and_batch": modes,
        "not_counted": "CUDA context (~0.5 GB), cuBLAS workspace, fragmentation, compile buffers",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1024x1024")
    parser.add_argument(
        "--batch", default="1,4,8", help="images in one denoising loop, comma-separated"
    )
    parser.add_argument("--text-tokens", type=int, default=256)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    result = estimate(width, height, [int(b) for b in args.batch.split(",")], args.text_tokens)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
