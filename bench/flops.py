"""FLOPs of one CogView4-6B image and the device peaks they are measured against.

The research notes (shared/research/cogview4-inference.md 4.3) count 5.55 PFLOP per 1024*1024 hd
(50-step) image with CFG: cond text 144 tokens, uncond 16, plus VAE decode and GLM, counted by
FlopCounterMode on the real configs. Other runs scale it:

    flops_per_image = 5.55e15 * steps/50 * ((H/16)*(W/16))/4096 * (1 with CFG, else 1/2)

`analytic` is the exact count for given text lengths: per transformer forward over
L = image + text tokens, 2*28*(4*4096^2 + 2*4096*16384)*L for the matmuls plus 4*28*4096*L^2 for
attention (this reproduces the notes' per-forward counts), plus the VAE decode and GLM. It
differs from the scaled figure by the text length, and by attention growing with L squared.
"""

from __future__ import annotations

FORMULA = "5.55e15 * steps/50 * ((H/16)*(W/16))/4096 * (1 if guidance > 1 else 0.5)"
FLOPS_PER_HD_1024_IMAGE = 5.55e15
# Dense bf16 tensor-core peaks (vendor datasheets), matched in order against the device name.
DEVICE_PEAK_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM: "NVIDIA H100 80GB HBM3"
    ("H200", 989.0),
    ("A100", 312.0),
]
# The real transformer (research notes 2.1, 4.1): 28 blocks, width 4096, feed-forward 16384.
LAYERS, WIDTH, FF = 28, 4096, 16384
GLM_PARAMS_BUT_EMBEDDING = 8.779e9 - 0.621e9
VAE_DECODE_FLOPS_1024 = 39.7e12


def image_tokens(width: int, height: int) -> int:
    return (width // 16) * (height // 16)


def scaled(width: int, height: int, steps: int, guidance: float) -> float:
    """FLOPs per image by the formula above."""
    cfg = 1.0 if guidance > 1 else 0.5
    return FLOPS_PER_HD_1024_IMAGE * steps / 50 * image_tokens(width, height) / 4096 * cfg


def analytic(
    width: int, height: int, steps: int, guidance: float, cond_tokens: int, uncond_tokens: int
) -> float:
    """Transformer matmuls + attention for each forward of each step, + VAE decode + GLM."""
    n = image_tokens(width, height)

    def forward(t: int) -> float:
        seq = n + t
        return 2 * LAYERS * (4 * WIDTH**2 + 2 * WIDTH * FF) * seq + 4 * LAYERS * WIDTH * seq**2

    texts = [cond_tokens, uncond_tokens] if guidance > 1 else [cond_tokens]
    glm = 2 * GLM_PARAMS_BUT_EMBEDDING * sum(texts)
    return steps * sum(forward(t) for t in texts) + VAE_DECODE_FLOPS_1024 * n / 4096 + glm


def device_peak(name: str | None) -> tuple[float | None, str | None]:
    """(dense bf16 FLOP/s, the table entry matched) for a CUDA device name, or (None, None)."""
    for key, tflops in DEVICE_PEAK_TFLOPS:
        if name and key in name:
            return tflops * 1e12, key
    return None, None


def measured_matmul_tflops() -> float:
    """bf16 8192^3 matmul rate on random data: the ceiling actually reachable on this GPU."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return round(10 * 2 * 8192**3 / (start.elapsed_time(end) / 1000) / 1e12, 1)
