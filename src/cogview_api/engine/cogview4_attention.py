"""Attention for the fast CogView 4 path: the stock processor's computation for rows whose texts
were left-padded to a common length, with the padding really left out (diffusers' own mask
turns into an additive 0/1 bias that does not mask, diffusers #13621).

The padding is not masked but sliced off: rows with the same padding form a run, and each run
attends with the padded keys cut away, through the same unmasked SDPA call the stock pipeline
makes for that prompt alone. A boolean mask would give the same numbers, but it sends SDPA on
CUDA from the flash kernel (no masks) to the memory-efficient one, and batching cond with
uncond pads nearly every batch; with runs, a batch of one image makes the two attention calls
stock makes, and the projections around them run once for both rows.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_cogview4 import CogView4AttnProcessor

# (first row, end row, first real text position) of consecutive rows with the same padding.
Run = tuple[int, int, int]


def left_padding_mask(pads: torch.Tensor, length: int) -> torch.Tensor:
    """(rows, length) bool, True on each row's real tokens: those after its `pads[row]`
    padded ones."""
    positions = torch.arange(length, device=pads.device)
    return positions[None, :] >= pads[:, None]


def text_key_runs(text_mask: torch.Tensor) -> list[Run]:
    """The runs of a (rows, text_len) bool mask that is True on a suffix of each row (the
    real tokens after left padding)."""
    pads = (~text_mask).sum(dim=1)
    if not torch.equal(text_mask, left_padding_mask(pads, text_mask.shape[1])):
        raise ValueError("the text mask must mark left padding: False before True in each row")
    runs: list[Run] = []
    for row, pad in enumerate(pads.tolist()):
        if runs and runs[-1][2] == pad:
            runs[-1] = (runs[-1][0], row + 1, pad)
        else:
            runs.append((row, row + 1, pad))
    return runs


def attend_runs(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, runs: list[Run]
) -> torch.Tensor:
    """SDPA of (rows, heads, text_len + image_len, head_dim) tensors, each run of rows without
    its padded text keys, as (rows, text_len + image_len, heads * head_dim). The padded
    positions' own outputs are computed and left to the caller to drop."""
    outs = [
        F.scaled_dot_product_attention(query[a:b], key[a:b, :, pad:], value[a:b, :, pad:])
        for a, b, pad in runs
    ]
    # SDPA lays its output out as (rows, seq, heads, dim): transposed back, the cat is the copy
    # the stock processor's own transpose-and-flatten would make.
    return torch.cat([out.transpose(1, 2) for out in outs]).flatten(2, 3)


# The runs of the last mask seen on each device. The mask is held, so no other tensor can take
# its memory while it is cached: same address, shape and strides is the same mask (our masks are
# never written after they are made).
_last_runs: dict[torch.device, tuple[torch.Tensor, list[Run]]] = {}


def _runs_of(text_mask: torch.Tensor) -> list[Run]:
    cached = _last_runs.get(text_mask.device)
    if cached is not None:
        mask, runs = cached
        if (
            mask.data_ptr() == text_mask.data_ptr()
            and mask.shape == text_mask.shape
            and mask.stride() == text_mask.stride()
        ):
            return runs
    runs = text_key_runs(text_mask)
    _last_runs[text_mask.device] = (text_mask, runs)
    return runs


# One opaque op to torch.compile: the runs are Python ints that differ between batches, so
# traced they would be guards and recompiles; as a custom op, the compiled block calls it like
# SDPA, with no graph break, and its shape is known without running it.
@torch.library.custom_op("cogview_api::attend_left_padded", mutates_args=())
def attend_left_padded(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, text_mask: torch.Tensor
) -> torch.Tensor:
    """`attend_runs` with the runs read off `text_mask` (rows, text_len), True on real tokens
    after left padding; worked out once per mask (one device sync), so callers pass one mask
    object for a batch's every step and block."""
    return attend_runs(query, key, value, _runs_of(text_mask))


@attend_left_padded.register_fake
def _(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, text_mask: torch.Tensor
) -> torch.Tensor:
    rows, heads, seq, _ = query.shape
    return query.new_empty((rows, seq, heads * value.shape[-1]))


class MaskedAttnProcessor:
    """`CogView4AttnProcessor` for left-padded texts.

    `attention_mask` is a bool (rows, text_len) tensor, True where a text token is real, or
    None. With None it is exactly the stock processor (the stock path shares these modules).
    With a mask, the padded text tokens are no key of any query (text or image); their own
    outputs are computed and thrown away by the caller.
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
        out = attend_left_padded(query, key, value, attention_mask).type_as(query)
        out = attn.to_out[1](attn.to_out[0](out))
        text_out, image_out = out.split([text_len, image_len], dim=1)
        return image_out, text_out
