"""A real `CogView4Pipeline` with tiny random weights and a locally trained tokenizer.

Built deterministically (fixed seeds, fixed training text) on first use, saved under the
cache folder and loaded from there afterwards, with no download. It keeps the production
shapes that matter to the API: the VAE's x8 factor, 16 latent channels, patch size 2, the
GLM-style `[gMASK]<sop>` prefix and left padding, so every size rule behaves as with the
real model. Its images are noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    CogView4Pipeline,
    CogView4Transformer2DModel,
    FlowMatchEulerDiscreteScheduler,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GlmConfig, GlmModel, PreTrainedTokenizerFast

TINY_VERSION = "1"

_TRAINING_TEXT = [
    "A futuristic robot assistant helping in a modern kitchen, clean design",
    "a photo of a cat sitting on a windowsill at sunset, warm light, 35mm film",
    "An ink painting of mountains and rivers, mist, traditional Chinese style",
    "portrait of an astronaut, studio lighting, highly detailed, 8k",
    "a red bicycle leaning against a blue wall in a narrow street of an old town",
    "watercolor illustration of a lighthouse on a cliff during a storm at night",
    "0123456789 the quick brown fox jumps over the lazy dog THE QUICK BROWN FOX",
] * 4

SPECIAL_TOKENS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>"]

# The real scheduler config of THUDM/CogView4-6B.
SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.25,
    "max_image_seq_len": 4096,
    "max_shift": 0.75,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": None,
    "time_shift_type": "linear",
    "use_dynamic_shifting": True,
    "invert_sigmas": False,
}


def tiny_model_dir(cache_dir: Path) -> Path:
    """The cached tiny pipeline's folder, built on first call."""
    target = Path(cache_dir) / f"tiny-cogview4-v{TINY_VERSION}"
    if (target / "model_index.json").exists():
        return target
    tmp = target.with_name(target.name + ".building")
    build_tiny_pipeline().save_pretrained(tmp)
    (tmp / "cogview_api_tiny.json").write_text(json.dumps({"version": TINY_VERSION}))
    if target.exists():  # another process won the race; keep theirs
        return target
    tmp.rename(target)
    return target


def _tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TRAINING_TEXT, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[gMASK] <sop> $A",
        pair="[gMASK] <sop> $A $B",
        special_tokens=[
            ("[gMASK]", tok.token_to_id("[gMASK]")),
            ("<sop>", tok.token_to_id("<sop>")),
        ],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        padding_side="left",
    )


def build_tiny_pipeline() -> CogView4Pipeline:
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    text_encoder = GlmModel(
        GlmConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            attention_bias=True,
            pad_token_id=tokenizer.pad_token_id,
            partial_rotary_factor=0.5,
            max_position_embeddings=2048,
        )
    )
    torch.manual_seed(1)
    transformer = CogView4Transformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        text_embed_dim=32,
        time_embed_dim=16,
        condition_dim=8,
        sample_size=32,
        rope_axes_dim=(256, 256),
    )
    torch.manual_seed(2)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        sample_size=256,
        scaling_factor=1.0,
        shift_factor=0.0,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    return CogView4Pipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )
