"""Our fast path for CogView 4: the stock pipeline's computation, batched and with its waste cut.

Each change keeps the image of the stock `CogView4Pipeline` for the same seed (within fp
reassociation, see docs/architecture.md), proven in tests/unit/test_engine_fidelity.py:

- cond and uncond rows of every image go through ONE transformer forward. Texts of different
  lengths are left-padded to a common length with zeros and `MaskedAttnProcessor` leaves those
  extra tokens out of every row's keys, by slicing rather than masking, so SDPA keeps its fused
  kernel (the stock processor turns its mask into an additive 0/1 bias that does not mask,
  diffusers #13621). The stock pipeline's own left-padding to a multiple of 16 is part of its
  computation and stays attended.
- several jobs of one (size, steps, guidance) run in one denoising loop; each image draws its
  latents from its own CPU generator exactly as the stock pipeline draws them for that seed alone;
  a job whose progress callback returns False leaves the batch at that step.
- GLM runs without its last layer and final norm (the pipeline reads `hidden_states[-2]`); the
  empty negative prompt is encoded once per process and kept on the device.
- rotary embeddings are built once per latent shape, on the device.
- on CUDA, the transformer blocks are compiled and warmed up per configured size at load.

Optional and image-changing: first-block step caching (`COGVIEW_UNSAFE_STEP_CACHE`).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import CogView4Pipeline, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.cogview4.pipeline_cogview4 import calculate_shift, retrieve_timesteps
from torch import nn

from cogview_api.engine.cogview4_attention import MaskedAttnProcessor, left_padding_mask
from cogview_api.engine.cogview4_quant import check_fp8_device, quantize_fp8, quantize_int8
from cogview_api.engine.cogview4_stepcache import StepCache
from cogview_api.errors import EngineLoadError
from cogview_api.metrics import instruments

log = logging.getLogger(__name__)

MAX_SEQUENCE_LENGTH = 1024  # the stock pipeline's default, as the pipeline is called today
TEXT_BUCKET = 16  # the stock pipeline left-pads token ids to a multiple of this

# Called with a row-group index and the step just finished; False drops that group.
StepFn = Callable[[int, int], bool]
# Called with a row-group index, the step being finished and the latent (1, C, h, w, float32)
# of its first image's current prediction of the final latents.
PreviewLatentFn = Callable[[int, int, torch.Tensor], None]


def truncated_text_encoder(text_encoder: nn.Module) -> nn.Module:
    """A view of GLM that stops after layer N-1, sharing its weights.

    Its `last_hidden_state` is the stock pipeline's `hidden_states[-2]`: the raw output of
    the second-to-last layer; the last layer and the final norm are never run.
    """
    view = copy.copy(text_encoder)
    view._modules = dict(text_encoder._modules)
    view._modules["layers"] = nn.ModuleList(list(text_encoder.layers)[:-1])  # type: ignore[arg-type]
    view._modules["norm"] = nn.Identity()
    return view


@dataclass
class _Rows:
    """The images of one denoising loop; `group[i]` is the job of image i. With guidance the
    transformer sees 2 * images rows: cond for every image, then uncond for every image; without
    (guidance <= 1, as in the stock pipeline) only the cond rows."""

    latents: torch.Tensor  # (images, C, h, w): float32 as drawn, then the transformer's dtype
    cond: torch.Tensor  # (images, L, D), zero-padded in front to a common L
    uncond: torch.Tensor
    cond_pad: list[int]  # how many of each row's L text positions are our padding
    uncond_pad: list[int]
    group: list[int]
    cfg: bool
    _text: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def text_inputs(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Texts of the transformer rows and their key mask (True on real tokens; None when no
        row is padded). Built once per set of rows: the attention works out its runs once per
        mask object."""
        if self._text is None:
            text = torch.cat([self.cond, self.uncond]) if self.cfg else self.cond
            pads = self.cond_pad + self.uncond_pad if self.cfg else self.cond_pad
            mask = None
            if any(pads):
                mask = left_padding_mask(torch.tensor(pads, device=text.device), text.shape[1])
            self._text = (text, mask)
        return self._text

    def transformer_latents(self) -> torch.Tensor:
        """Latents of the transformer rows (float32 at the first step, then the transformer's
        dtype: the scheduler returns its model output's, as in the stock loop)."""
        return torch.cat([self.latents, self.latents]) if self.cfg else self.latents

    def keep(self, images: list[int]) -> torch.Tensor:
        """Keep only these images; returns the transformer rows they had."""
        count = len(self.group)
        index = torch.tensor(images, dtype=torch.long, device=self.latents.device)
        self.latents, self.cond, self.uncond = (
            self.latents[index],
            self.cond[index],
            self.uncond[index],
        )
        self.cond_pad = [self.cond_pad[i] for i in images]
        self.uncond_pad = [self.uncond_pad[i] for i in images]
        self.group = [self.group[i] for i in images]
        self._text = None
        return torch.cat([index, index + count]) if self.cfg else index


@dataclass(frozen=True)
class FastJob:
    """What the fast loop needs of one job."""

    prompt: str
    negative_prompt: str
    seeds: tuple[int, ...]
    preview_steps: tuple[int, ...] = ()  # after which steps `on_preview` gets this job's x0


class FastCogView4:
    """Runs batches of jobs of one (size, steps, guidance) on a loaded `CogView4Pipeline`,
    sharing its weights (the stock pipeline stays usable on the same modules, except after the
    `offload` text-encoder mode has put GLM's on `meta` between uses)."""

    def __init__(
        self,
        pipe: CogView4Pipeline,
        *,
        device: str,
        text_encoder_mode: str = "gpu",
        compile_blocks: bool = False,
        compile_backend: str | Callable[..., Any] = "inductor",
        step_cache_threshold: float | None = None,
        fp8: bool = False,
    ) -> None:
        self.pipe = pipe
        self.device = torch.device(device)
        self.on_cuda = self.device.type == "cuda"
        # Without a GPU there is nothing to move: the text encoder lives where everything does
        # (int8 still quantizes: it works on the CPU too).
        moves = text_encoder_mode in ("cpu", "offload")
        self.text_encoder_mode = "gpu" if moves and not self.on_cuda else text_encoder_mode
        self.step_cache_threshold = step_cache_threshold
        self.fp8 = fp8
        if fp8:
            check_fp8_device(self.device)
        self.dtype = pipe.transformer.dtype
        self.text_encoder = truncated_text_encoder(pipe.text_encoder)
        self._text_device = torch.device("cpu") if moves and self.on_cuda else self.device
        self._empty_negative: torch.Tensor | None = None
        self._rope: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        for block in pipe.transformer.transformer_blocks:
            block.attn1.set_processor(MaskedAttnProcessor())
        self.blocks: list[Callable[..., tuple[torch.Tensor, torch.Tensor]]] = list(
            pipe.transformer.transformer_blocks
        )
        self.compiled = compile_blocks
        if compile_blocks:
            # Compiled wrappers share the modules; the stock path keeps calling them eagerly.
            # Dynamic shapes: batch rows, text length and image size vary between batches;
            # static graphs would recompile for each and hit dynamo's recompile limit. All
            # blocks share one class, so they share the compiled graphs (dynamo inlines the
            # modules and treats their weights as inputs). The heavy ops (GEMMs, SDPA) are
            # library kernels either way.
            # Duck sizing would give dimensions of equal size one symbol: at 1024x1024 the image
            # has 4096 tokens, the model's width, which the weights pin, so every other size
            # would recompile. Without it each dimension gets its own symbol. (A process-wide
            # torch setting; compiling the blocks is the only compile in a worker.)
            torch.fx.experimental._config.use_duck_shape = False
            self.blocks = [
                torch.compile(block, dynamic=True, backend=compile_backend) for block in self.blocks
            ]
        self.last_step_cache: StepCache | None = None

    # -- text --------------------------------------------------------------------------------

    def encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Embeddings of each distinct prompt, as the stock pipeline computes them for that
        prompt alone: (1, L, D) with L its token count left-padded to a multiple of 16."""
        wanted = [p for p in dict.fromkeys(prompts) if p != "" or self._empty_negative is None]
        out: dict[str, torch.Tensor] = {}
        if wanted:
            out = {p: self._encode_one(p) for p in wanted}
        if "" in out:
            self._empty_negative = out[""]
        if "" in prompts and self._empty_negative is not None:
            out[""] = self._empty_negative
        return out

    def _encode_one(self, prompt: str) -> torch.Tensor:
        tok = self.pipe.tokenizer
        ids = tok(
            [prompt],
            padding="longest",
            max_length=MAX_SEQUENCE_LENGTH,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).input_ids
        pad = (TEXT_BUCKET - ids.shape[1] % TEXT_BUCKET) % TEXT_BUCKET
        if pad:
            ids = torch.cat([ids.new_full((1, pad), tok.pad_token_id), ids], dim=1)
        hidden = self.text_encoder(ids.to(self._encoder_device())).last_hidden_state
        return hidden.to(dtype=self.pipe.text_encoder.dtype, device=self.device)  # type: ignore[no-any-return]

    def _encoder_device(self) -> torch.device:
        return self.device if self.text_encoder_mode == "offload" else self._text_device

    # -- denoising ----------------------------------------------------------------------------

    def rope(self, latent_h: int, latent_w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The transformer's rotary embedding for this latent shape, built once, on the device."""
        key = (latent_h, latent_w)
        if key not in self._rope:
            probe = torch.empty(1, 1, latent_h, latent_w)
            cos, sin = self.pipe.transformer.rope(probe)
            self._rope[key] = (cos.to(self.device), sin.to(self.device))
        return self._rope[key]

    def denoise(
        self,
        jobs: Sequence[FastJob],
        *,
        width: int,
        height: int,
        steps: int,
        guidance_scale: float,
        on_step: StepFn,
        on_preview: PreviewLatentFn | None = None,
    ) -> list[torch.Tensor | None]:
        """Final latents of each job, or None for a job that `on_step` stopped. Records the
        encode and denoise stages' times (synchronised with the GPU once each per batch).

        At a job's `preview_steps`, `on_preview` gets its first image's prediction of the final
        latents: the flow-matching sample minus sigma times the guided velocity, what the Euler
        step would reach if it went to sigma 0 at once. Computed beside the loop, in float32,
        from tensors the loop only reads: the latents go on as without it."""
        started = time.perf_counter()
        rows = self._prepare(jobs, width, height, cfg=guidance_scale > 1)
        encoded = self._stage_done("encode", started)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        timesteps = self._timesteps(scheduler, width, height, steps)
        cache = (
            StepCache(self.step_cache_threshold) if self.step_cache_threshold is not None else None
        )
        self.last_step_cache = cache
        conditions = self._size_conditions(width, height)
        rope = self.rope(rows.latents.shape[2], rows.latents.shape[3])
        stopped: set[int] = set()
        for i, t in enumerate(timesteps):
            if not rows.group:
                break
            latent_in = rows.transformer_latents()
            text, mask = rows.text_inputs()
            count = latent_in.shape[0]
            pred = self._forward(
                latent_in.to(self.dtype),
                text,
                t.expand(count),
                [c.expand(count, 2) for c in conditions],
                rope,
                mask,
                cache,
            )
            if rows.cfg:
                pred_cond, pred_uncond = pred.chunk(2)
                noise = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
            else:
                noise = pred
            if on_preview is not None:
                self._previews(rows, jobs, i + 1, scheduler.sigmas[i], noise, on_preview)
            rows.latents = scheduler.step(noise, t, rows.latents, return_dict=False)[0]
            newly = {g for g in dict.fromkeys(rows.group) if not on_step(g, i + 1)}
            if newly:
                stopped |= newly
                kept = [k for k, g in enumerate(rows.group) if g not in newly]
                transformer_rows = rows.keep(kept)
                if cache is not None:
                    cache.keep_rows(transformer_rows)
        results: list[torch.Tensor | None] = []
        for g in range(len(jobs)):
            mine = [k for k, group in enumerate(rows.group) if group == g]
            results.append(None if g in stopped or not mine else rows.latents[mine])
        self._stage_done("denoise", encoded)
        return results

    @staticmethod
    def _previews(
        rows: _Rows,
        jobs: Sequence[FastJob],
        step: int,
        sigma: torch.Tensor,
        noise: torch.Tensor,
        on_preview: PreviewLatentFn,
    ) -> None:
        for g in dict.fromkeys(rows.group):
            if step in jobs[g].preview_steps:
                k = rows.group.index(g)  # the job's first image
                sample = rows.latents[k : k + 1].float()
                x0 = sample - sigma.to(sample.device, torch.float32) * noise[k : k + 1].float()
                on_preview(g, step, x0)

    def _stage_done(self, stage: str, since: float) -> float:
        """Record a stage that began at `since` once the GPU has finished it; returns now."""
        if self.on_cuda:
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        instruments().stage.labels(stage).observe(now - since)
        return now

    def _prepare(self, jobs: Sequence[FastJob], width: int, height: int, *, cfg: bool) -> _Rows:
        negatives = [j.negative_prompt if cfg else j.prompt for j in jobs]
        embeds = self.encode([j.prompt for j in jobs] + negatives)
        length = max(e.shape[1] for e in embeds.values())
        cond: list[torch.Tensor] = []
        uncond: list[torch.Tensor] = []
        cond_pad: list[int] = []
        uncond_pad: list[int] = []
        latents: list[torch.Tensor] = []
        group: list[int] = []
        channels = self.pipe.transformer.config.in_channels
        scale = self.pipe.vae_scale_factor
        for g, job in enumerate(jobs):
            for seed in job.seeds:
                for text, out, pads in (
                    (job.prompt, cond, cond_pad),
                    (negatives[g], uncond, uncond_pad),
                ):
                    padded, pad = _left_pad(embeds[text], length)
                    out.append(padded)
                    pads.append(pad)
                # As `randn_tensor` draws row i of a stock batch from generator i on the CPU.
                generator = torch.Generator("cpu").manual_seed(seed)
                shape = (1, channels, height // scale, width // scale)
                latents.append(torch.randn(shape, generator=generator, dtype=torch.float32))
                group.append(g)
        return _Rows(
            latents=torch.cat(latents).to(self.device),
            cond=torch.cat(cond),
            uncond=torch.cat(uncond),
            cond_pad=cond_pad,
            uncond_pad=uncond_pad,
            group=group,
            cfg=cfg,
        )

    def _timesteps(
        self, scheduler: FlowMatchEulerDiscreteScheduler, width: int, height: int, steps: int
    ) -> torch.Tensor:
        """The stock pipeline's schedule: linspace timesteps, CogView4's sqrt-law shift mu."""
        import numpy as np

        config = scheduler.config
        scale = self.pipe.vae_scale_factor
        seq_len = (height // scale) * (width // scale) // self.pipe.transformer.config.patch_size**2
        timesteps = np.linspace(config.num_train_timesteps, 1.0, steps)
        timesteps = timesteps.astype(np.int64).astype(np.float32)
        sigmas = timesteps / config.num_train_timesteps
        mu = calculate_shift(
            seq_len,
            config.get("base_image_seq_len", 256),
            config.get("base_shift", 0.25),
            config.get("max_shift", 0.75),
        )
        out, _ = retrieve_timesteps(
            scheduler,
            steps,
            self.device,
            timesteps,  # type: ignore[arg-type]
            sigmas,
            mu=mu,
        )
        return out  # type: ignore[no-any-return]

    def _size_conditions(self, width: int, height: int) -> list[torch.Tensor]:
        """original_size, target_size, crop_coords as the stock pipeline passes them."""
        dtype = self.pipe.text_encoder.dtype
        return [
            torch.tensor([value], dtype=dtype, device=self.device)
            for value in ((height, width), (height, width), (0, 0))
        ]

    def _forward(
        self,
        latents: torch.Tensor,
        text: torch.Tensor,
        timestep: torch.Tensor,
        size_cond: list[torch.Tensor],
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: StepCache | None,
    ) -> torch.Tensor:
        """`CogView4Transformer2DModel.forward` with our RoPE, mask, blocks and step cache."""
        tr = self.pipe.transformer
        batch, _, height, width = latents.shape
        p = tr.config.patch_size
        image, text = tr.patch_embed(latents, text)
        temb = F.silu(tr.time_condition_embed(timestep, *size_cond, image.dtype))
        if cache is None:
            for block in self.blocks:
                image, text = block(image, text, temb, rope, mask)
        else:
            image, text = cache.run(self.blocks, image, text, temb, rope, mask)
        image = tr.proj_out(tr.norm_out(image, temb))
        image = image.reshape(batch, height // p, width // p, -1, p, p)
        out: torch.Tensor = image.permute(0, 3, 1, 4, 2, 5).flatten(4, 5).flatten(2, 3)
        return out

    # -- start-up -----------------------------------------------------------------------------

    def warm_up_compiled(self, sizes: Sequence[tuple[int, int]], *, fall_back: bool) -> None:
        """Compile now, by warming up each size. A compiler failure (inductor or Triton missing
        a tool, an unsupported op) either stops the start with `EngineLoadError`, or with
        `fall_back` is logged and the blocks run eagerly: slower, same images."""
        try:
            self.warmup(sizes)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # the compiler stack raises many types; all mean "not compiled"
            if not fall_back:
                raise EngineLoadError(
                    f"torch.compile failed ({type(exc).__name__}: {exc}); set "
                    "COGVIEW_TORCH_COMPILE=off to run the transformer blocks eagerly."
                ) from exc
            log.warning(
                "torch.compile failed (%s: %s); running the transformer blocks eagerly "
                "(same images, slower). COGVIEW_TORCH_COMPILE=off skips the attempt.",
                type(exc).__name__,
                exc,
            )
            self.blocks = list(self.pipe.transformer.transformer_blocks)
            self.compiled = False

    def warmup(self, sizes: Sequence[tuple[int, int]], steps: int = 2) -> None:
        """Run each (width, height) once alone, once as a padded batch of two texts and once
        without guidance (a single transformer row, which torch specializes), so the compiled
        blocks have their graphs and every kernel its shapes' autotuning before the first task."""
        long_prompt = "warm up " * 12
        for width, height in sizes:
            for jobs, guidance in (
                ([FastJob("warm up", "", (0,))], 2.0),
                ([FastJob("warm up", "", (0,)), FastJob(long_prompt, "", (1,))], 2.0),
                ([FastJob("warm up", "", (0,))], 1.0),
            ):
                self.denoise(
                    jobs,
                    width=width,
                    height=height,
                    steps=steps,
                    guidance_scale=guidance,
                    on_step=lambda g, s: True,
                )

    def place(self) -> None:
        """Move the components where the text-encoder mode wants them. Module by module, so a
        24 GB card never holds GLM on the way."""
        self.pipe.transformer.to(self.device)
        if self.fp8:
            quantize_fp8(self.pipe.transformer)
        self.pipe.vae.to(self.device)
        if self.text_encoder_mode == "int8":
            quantize_int8(self.pipe.text_encoder)  # where it is (CPU), before it reaches the GPU
        self.pipe.text_encoder.to(self._text_device)
        if self.text_encoder_mode == "offload":
            stream_from_cpu(self.text_encoder, self.device)


def stream_from_cpu(module: nn.Module, device: torch.device) -> None:
    """Keep `module`'s weights in CPU memory and bring each leaf module's to `device` only for
    its own forward (accelerate's `cpu_offload`, the hooks behind diffusers'
    `enable_sequential_cpu_offload`). In between its parameters are on `meta`, so the device
    never holds more than one leaf's weights (GLM's embedding, 1.2 GB in bf16, is the largest)
    beside the transformer. Every encode copies the weights over again (17 GB for GLM)."""
    from accelerate import cpu_offload

    cpu_offload(module, execution_device=device)


def _left_pad(embeds: torch.Tensor, length: int) -> tuple[torch.Tensor, int]:
    """(1, L, D) -> (1, length, D) with zeros in front, and how many positions were added."""
    missing = length - embeds.shape[1]
    if not missing:
        return embeds, 0
    pad = embeds.new_zeros((1, missing, embeds.shape[2]))
    return torch.cat([pad, embeds], dim=1), missing
