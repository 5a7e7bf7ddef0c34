"""First-block step caching for the fast CogView 4 path: a speed mode that CHANGES the image.

Off by default (`COGVIEW_UNSAFE_STEP_CACHE=off`). The idea of diffusers' FirstBlockCache
(PR #11180) and cache-dit, done per transformer row inside our own block loop so that it
composes with batching and with rows leaving the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Block = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass
class StepCache:
    """First-block cache of one denoising loop, per transformer row.

    A row skips blocks 1..N at a step when block 0's image residual changed less than
    `threshold` (mean |change| / mean |residual|, as diffusers' FirstBlockCache) since the last
    step at which the row ran them; it then reuses what blocks 1..N added at that step. The
    decision is per row, so whether a row skips does not depend on its batch neighbours.
    """

    threshold: float
    first_residual: torch.Tensor | None = None  # block 0's image residual, last computed step
    rest_image: torch.Tensor | None = None  # what blocks 1..N added, last computed step
    rest_text: torch.Tensor | None = None
    skipped: int = 0  # row-steps that reused the cache
    computed: int = 0  # row-steps that ran every block

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Rows left the batch: keep the state of these (transformer row indexes)."""
        if self.first_residual is not None:
            self.first_residual = self.first_residual[rows]
        if self.rest_image is not None and self.rest_text is not None:
            self.rest_image, self.rest_text = self.rest_image[rows], self.rest_text[rows]

    def run(
        self,
        blocks: Sequence[Block],
        image: torch.Tensor,
        text: torch.Tensor,
        temb: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The transformer blocks on (image, text) streams, skipping 1..N where allowed."""
        first_in = image
        image, text = blocks[0](image, text, temb, rope, mask)
        residual = image - first_in
        rows = image.shape[0]
        compute = self._rows_to_compute(residual)
        index = compute.nonzero().flatten()
        self.computed += len(index)
        self.skipped += rows - len(index)
        if len(index) == rows:
            out_image, out_text = image, text
            for block in blocks[1:]:
                out_image, out_text = block(out_image, out_text, temb, rope, mask)
            self.first_residual = residual
            self.rest_image, self.rest_text = out_image - image, out_text - text
            return out_image, out_text
        assert self.first_residual is not None
        assert self.rest_image is not None and self.rest_text is not None
        out_image, out_text = image + self.rest_image, text + self.rest_text
        if len(index):
            sub_image, sub_text = image[index], text[index]
            sub_mask = None if mask is None else mask[index]
            for block in blocks[1:]:
                sub_image, sub_text = block(sub_image, sub_text, temb[index], rope, sub_mask)
            self.first_residual[index] = residual[index]
            self.rest_image[index] = sub_image - image[index]
            self.rest_text[index] = sub_text - text[index]
            out_image[index], out_text[index] = sub_image, sub_text
        return out_image, out_text

    def _rows_to_compute(self, residual: torch.Tensor) -> torch.Tensor:
        if self.first_residual is None or self.rest_image is None:
            return torch.ones(residual.shape[0], dtype=torch.bool, device=residual.device)
        prev = self.first_residual
        change = (residual - prev).abs().flatten(1).mean(1) / prev.abs().flatten(1).mean(1)
        return change > self.threshold
