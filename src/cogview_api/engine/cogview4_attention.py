"""Attention for the fast CogView 4 path: the stock processor's computation with a text mask
that masks (diffusers' own turns the mask into an additive 0/1 bias, diffusers #13621)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_cogview4 import CogView4AttnProcessor


class MaskedAttnProcessor:
    """`CogView4AttnProcessor` with a text mask that masks.

    `attention_mask` is a bool (rows, text_len) tensor, True where a text token is real, or
    None. With None it is exactly the stock processor (the stock path shares these modules). With
    a mask, padded text tokens are removed as keys of every query (text and image) by a boolean
    SDPA mask; their own outputs are computed but thrown away by the caller.
    """

    def __init__(self) -> None:
        self._stock = CogView4AttnProcessor()  # type: ignore[no-untyped-call]

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is None:
            stock: tuple[torch.Tensor, torch.Tensor] = self._stock(
                attn, hidden_states, encoder_hidden_states, None, image_rotary_emb
            )
            return stock
        dtype = encoder_hidden_states.dtype
        text_len = encoder_hidden_states.shape[1]
        image_len = hidden_states.shape[1]
        joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        query = attn.to_q(joint).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        key = attn.to_k(joint).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        value = attn.to_v(joint).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query).to(dtype=dtype)
        if attn.norm_k is not None:
            key = attn.norm_k(key).to(dtype=dtype)
        if image_rotary_emb is not None:
            rope: Any = image_rotary_emb  # diffusers annotates the (cos, sin) pair as 1-tuple
            query[:, :, text_len:, :] = apply_rotary_emb(
                query[:, :, text_len:, :], rope, use_real_unbind_dim=-2
            )
            key[:, :, text_len:, :] = apply_rotary_emb(
                key[:, :, text_len:, :], rope, use_real_unbind_dim=-2
            )
        image_keys = attention_mask.new_ones((attention_mask.shape[0], image_len))
        keys = torch.cat([attention_mask, image_keys], dim=1)[:, None, None, :]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=keys)
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        out = attn.to_out[1](attn.to_out[0](out))
        text_out, image_out = out.split([text_len, image_len], dim=1)
        return image_out, text_out
