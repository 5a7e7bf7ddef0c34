"""The full-size random model has CogView4-6B's real shapes: checked on `meta` (no memory) by
parameter counts against the research notes, so a config typo shows up without a GPU."""

from __future__ import annotations

import pytest
import torch

from cogview_api.engine import full_random
from cogview_api.engine.full_random import build_full_random_pipeline, parameter_counts

# shared/research/cogview4-inference.md 2.1-2.3, measured there with FlopCounterMode's configs
# and confirmed by the hub's shard sizes (17.56 GB GLM, 812 MB VAE in bf16).
EXPECTED = {"transformer": 6.369e9, "text_encoder": 8.779e9, "vae": 406.1e6}


def test_meta_build_has_the_real_parameter_counts_in_bf16() -> None:
    pipe = build_full_random_pipeline("meta")

    counts = parameter_counts(pipe)
    for name, expected in EXPECTED.items():
        assert counts[name] == pytest.approx(expected, rel=5e-4), name
    assert sum(counts.values()) * 2 == pytest.approx(31.1e9, rel=0.01)  # bytes in bf16
    for module in (pipe.transformer, pipe.text_encoder, pipe.vae):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
        assert {p.device.type for p in module.parameters()} == {"meta"}
        assert not module.training
    # The pipeline's default image is 1024*1024 and its latents have 16 channels.
    assert pipe.transformer.config.sample_size * pipe.vae_scale_factor == 1024
    assert pipe.vae.config.latent_channels == pipe.transformer.config.in_channels == 16
    assert pipe.text_encoder.config.hidden_size == pipe.transformer.config.text_embed_dim
    assert torch.get_default_dtype() == torch.float32  # the build put the default back


def test_build_makes_a_working_pipeline_with_seeded_random_weights(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same builder at toy widths on the CPU: real random bf16 weights that generate."""
    shrink = [
        (
            full_random.TRANSFORMER_CONFIG,
            {
                "num_layers": 1,
                "attention_head_dim": 8,
                "num_attention_heads": 2,
                "text_embed_dim": 32,
                "time_embed_dim": 16,
                "condition_dim": 8,
            },
        ),
        (
            full_random.GLM_CONFIG,
            {
                "vocab_size": 1024,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "head_dim": 8,
                "pad_token_id": 0,
                "max_position_embeddings": 2048,
            },
        ),
        (
            full_random.VAE_CONFIG,
            {
                "block_out_channels": (8, 16, 32, 32),
                "layers_per_block": 1,
                "norm_num_groups": 8,
            },
        ),
    ]
    for config, values in shrink:
        for key, value in values.items():
            monkeypatch.setitem(config, key, value)

    pipe = build_full_random_pipeline("cpu", torch.bfloat16, seed=3)
    again = build_full_random_pipeline("cpu", torch.bfloat16, seed=3)

    weight = pipe.transformer.proj_out.weight
    assert weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
    assert weight.float().std() > 0
    for name in ("transformer", "text_encoder", "vae"):
        ours, theirs = getattr(pipe, name).parameters(), getattr(again, name).parameters()
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True)), name
    with torch.inference_mode():
        image = pipe(
            prompt="a red bicycle",
            width=64,
            height=64,
            num_inference_steps=1,
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="pt",
        ).images
    assert image.shape == (1, 3, 64, 64)
    assert torch.isfinite(image).all()
