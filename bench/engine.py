"""Our engine against stock diffusers `CogView4Pipeline`: same process, device and weights.

Both sides make the same images: one prompt, empty negative prompt, the same size, steps,
guidance and seeds (image i of a batch of B uses seed + i, from a CPU generator, as the engine
does). Each call ends with PIL images, so both include the VAE decode and post-processing.

  stock: `pipe(prompt, num_images_per_prompt=B, generator=[B CPU generators], output_type="pil")`
         on a structural copy of the pipeline that shares every weight tensor with ours (no
         second copy in memory) but keeps diffusers' own modules, processors and scheduler, so
         nothing ours changes (attention processors, compiled blocks, a truncated GLM view)
         reaches the stock side.
  ours:  `CogView4Engine.generate([B EngineJobs of one seed each], progress)`: B tasks in one
         call, i.e. dynamic batching, on the engine wrapping the loaded pipeline.

Runs take turns (stock B, ours B, for each B, the order flipped every round), so drift in the
machine's speed hits both alike. The first --warmup rounds are not counted (compile, caches).
With --json the file is rewritten after every round (`"complete": false` until the end), so a
run cut short still leaves its figures. `--variants step-cache,fp8` then times the image-changing
speed modes on our engine against ours exact: speed and largest pixel difference, same seeds.

    .venv/bin/python bench/engine.py --model tiny --size 512x512 --steps 4 --json out.json
    python bench/engine.py --model full-random --size 1024x1024 --quality hd --batch 1,2,4 \\
        --json bench/results/engine-full-random-h100.json

Fraction of peak FLOP/s: FLOPs per image from the research notes' 5.55 PFLOP per 1024*1024 hd
image with CFG, scaled by steps and image tokens (bench/flops.py states the formula), times
images per second, over the device's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import resource
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import flops
from api_overhead import code_version, cpu_audit, emit, machine_info

PROMPT = "A futuristic robot assistant helping in a modern kitchen, clean design"
STEPS = {"hd": 50, "standard": 20}  # Settings.steps_hd / steps_standard defaults
TARGETS = {"ours_over_stock_b1": 1.4, "ours_b4_over_b1_throughput": 1.15, "fraction_of_peak": 0.6}
VARIANTS = ("step-cache", "fp8")  # in the order they run
# Settings of our engine recorded with the figures (those this version of Settings has).
ENGINE_FIELDS = (
    "engine",
    "torch_compile",
    "compile_sizes",
    "text_encoder",
    "max_batch_size",
    "unsafe_step_cache",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="tiny | full-random | PATH (a diffusers folder)")
    p.add_argument("--size", default="1024x1024", help="WIDTHxHEIGHT (or W*H)")
    p.add_argument(
        "--quality", choices=sorted(STEPS), default="hd", help="hd: 50 steps, standard: 20"
    )
    p.add_argument("--steps", type=int, help="denoising steps (overrides --quality)")
    p.add_argument("--guidance", type=float, default=3.5, help="the server's default, 3.5")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--batch", default="1,2,4", help="ours: images per call (B tasks of 1 image)")
    p.add_argument(
        "--stock-batch",
        help="stock: num_images_per_prompt values (default: same as --batch); 'none': ours "
        "alone, e.g. to measure a memory mode (--set text_encoder=offload)",
    )
    p.add_argument("--warmup", type=int, default=1, help="rounds not counted (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="counted rounds (default 3)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a Settings field for our engine, e.g. --set torch_compile=off (repeatable)",
    )
    p.add_argument(
        "--variants",
        default="",
        help="image-changing speed modes to time after the exact rounds, on the same engine "
        "and seeds, against ours exact: step-cache (COGVIEW_UNSAFE_STEP_CACHE=first-block at "
        "the settings' threshold), fp8 (COGVIEW_UNSAFE_FP8; CUDA 8.9+; quantizes the shared "
        "transformer in place, so it runs last); comma-separated",
    )
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "cogview-api")
    p.add_argument("--json", type=Path, help="also write the JSON result here")
    args = p.parse_args(argv)
    args.width, args.height = (int(v) for v in args.size.replace("*", "x").split("x"))
    args.steps = args.steps or STEPS[args.quality]
    args.batches = sorted({int(b) for b in args.batch.split(",")})
    stock = args.stock_batch or args.batch
    args.stock_batches = [] if stock == "none" else sorted({int(b) for b in stock.split(",")})
    args.variant_list = [v for v in args.variants.split(",") if v]
    unknown = set(args.variant_list) - set(VARIANTS)
    if unknown:
        p.error(f"unknown --variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    # FP8 changes the shared weights for good: whatever else is asked runs before it.
    args.variant_list.sort(key=VARIANTS.index)
    return args


# -- loading: one set of weights, two pipelines ---------------------------------------------


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def load_pipeline(args: argparse.Namespace, device: str) -> Any:
    """The model's `CogView4Pipeline` on `device`: fp32 for tiny (as the engine loads it),
    bf16 for the real architecture."""
    import diffusers
    import torch
    import transformers
    from diffusers import CogView4Pipeline

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    if args.model == "tiny":
        from cogview_api.engine.tiny import tiny_model_dir

        pipe = CogView4Pipeline.from_pretrained(tiny_model_dir(args.cache_dir), dtype=torch.float32)
    elif args.model == "full-random":
        from cogview_api.engine.full_random import build_full_random_pipeline

        pipe = build_full_random_pipeline(device, torch.bfloat16)
    else:
        pipe = CogView4Pipeline.from_pretrained(args.model, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def stock_copy(pipe: Any) -> tuple[Any, bool]:
    """A pipeline of new module objects over the same parameter and buffer tensors, with its
    own scheduler; and whether every tensor is indeed shared (no weights copied)."""
    from diffusers import CogView4Pipeline

    modules = {}
    for name in ("text_encoder", "transformer", "vae"):
        module = getattr(pipe, name)
        memo: dict[int, Any] = {id(t): t for t in (*module.parameters(), *module.buffers())}
        modules[name] = copy.deepcopy(module, memo)
    stock = CogView4Pipeline(
        tokenizer=pipe.tokenizer,
        scheduler=type(pipe.scheduler).from_config(pipe.scheduler.config),
        **modules,
    )
    stock.set_progress_bar_config(disable=True)
    shared = all(
        a is b
        for name in modules
        for a, b in zip(
            getattr(stock, name).parameters(), getattr(pipe, name).parameters(), strict=True
        )
    )
    return stock, shared


def engine_settings(args: argparse.Namespace, device: str) -> Any:
    """Settings for our engine: the run's model, device and steps, batches up to the largest
    --batch, compile warm-up for this size; only fields this version of Settings has."""
    from cogview_api.config import Settings

    wanted: dict[str, Any] = {
        "model": args.model,
        "device": device,
        "cache_dir": args.cache_dir,
        "steps_hd": args.steps,
        "steps_standard": args.steps,
        "guidance_scale": args.guidance,
        "max_batch_size": max(args.batches),
        "engine": "fast",
        "text_encoder": "gpu",  # offload modes move the shared GLM weights under stock's feet
        "compile_sizes": f"{args.width}*{args.height}",
    }
    for item in args.set:
        key, _, value = item.partition("=")
        wanted[key] = value
    if wanted["text_encoder"] != "gpu" and args.stock_batches:
        raise SystemExit(
            "text_encoder other than gpu moves GLM's weights, which stock shares: "
            "add --stock-batch none"
        )
    known = Settings.model_fields
    return Settings(**{k: v for k, v in wanted.items() if k in known})


def compiled_graphs() -> int:
    """Graphs torch.compile has made in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def make_ours(pipe: Any, settings: Any, device: str) -> tuple[Any, bool]:
    """Our engine on `pipe`'s weights, and whether it wraps them (True) or loaded its own.

    Uses the engine's constructor from a pipeline when it has one (`from_pipe`, taking any of
    `name`, `device`, `settings` after the pipeline); otherwise `CogView4Engine.load(settings)`,
    which loads a second copy and cannot load `full-random`.
    """
    from cogview_api.engine.cogview4 import CogView4Engine

    available = {"name": settings.model, "device": device, "settings": settings}
    factories = [getattr(CogView4Engine, n, None) for n in ("from_pipe", "from_pipeline")]
    for factory in [*factories, CogView4Engine]:
        if factory is None:
            continue
        params = inspect.signature(factory).parameters
        names = [n for n in params if n not in ("self", "cls")]
        if not names or names[0] != "pipe":
            continue
        required = {
            n for n, p in params.items()
            if p.default is inspect.Parameter.empty and n not in ("self", "cls", "pipe")
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        }  # fmt: skip
        if required <= available.keys():
            kwargs = {k: v for k, v in available.items() if k in params}
            return factory(pipe, **kwargs), True
    if settings.model == "full-random":
        raise SystemExit("CogView4Engine takes no pipeline object; see bench/README.md")
    return CogView4Engine.load(settings), False


# -- one timed call -----------------------------------------------------------------------


def timed(fn: Callable[[], list[Any]], cuda: bool) -> tuple[list[Any], dict[str, Any]]:
    """Wall seconds of `fn()` (device synchronised on both ends), device seconds by CUDA
    events, and the device's peak allocated memory during the call (CUDA only)."""
    import torch

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    out = fn()
    if cuda:
        end.record()
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return out, {
        "wall_s": wall,
        "events_s": start.elapsed_time(end) / 1000 if cuda else None,
        "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
    }


def stock_call(pipe: Any, args: argparse.Namespace, batch: int) -> list[Any]:
    import torch

    generators = [torch.Generator("cpu").manual_seed(args.seed + i) for i in range(batch)]
    with torch.inference_mode():
        return list(
            pipe(
                prompt=PROMPT,
                negative_prompt="",
                width=args.width,
                height=args.height,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                num_images_per_prompt=batch,
                generator=generators,
                output_type="pil",
            ).images
        )


def ours_call(engine: Any, args: argparse.Namespace, batch: int) -> list[Any]:
    from cogview_api.engine import EngineJob

    jobs = [
        EngineJob(
            task_id=f"bench-{i}",
            prompt=PROMPT,
            negative_prompt="",
            width=args.width,
            height=args.height,
            steps=args.steps,
            guidance_scale=args.guidance,
            seeds=(args.seed + i,),
        )
        for i in range(batch)
    ]
    results = engine.generate(jobs, lambda task_id, stage, step: True)
    return [images[0] for images in results]


def max_pixel_diff(a: Any, b: Any) -> int:
    import numpy as np

    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def padded_tokens(tokenizer: Any, text: str) -> int:
    """Text tokens the transformer sees: the pipeline left-pads ids to a multiple of 16."""
    length = len(tokenizer(text, add_special_tokens=True).input_ids)
    return -(-length // 16) * 16


# -- the run --------------------------------------------------------------------------------


def summarise(
    runs: list[dict[str, Any]], batch: int, flops_per_image: float | None, peak: float | None
) -> dict[str, Any]:
    walls = [r["wall_s"] for r in runs]
    median = statistics.median(walls)
    events = [r["events_s"] for r in runs if r["events_s"] is not None]
    peaks = [r["peak_bytes"] for r in runs if r["peak_bytes"] is not None]
    achieved = flops_per_image * batch / median if flops_per_image else None  # FLOP/s
    return {
        "batch": batch,
        "median_s": round(median, 4),
        "seconds_per_image": round(median / batch, 4),
        "images_per_minute": round(60 * batch / median, 3),
        "runs_s": [round(w, 4) for w in walls],
        "events_median_s": round(statistics.median(events), 4) if events else None,
        "peak_memory_bytes": max(peaks) if peaks else None,
        "achieved_tflops": round(achieved / 1e12, 1) if achieved else None,
        "fraction_of_peak_flops": round(achieved / peak, 4) if achieved and peak else None,
    }


def ratios(result: dict[str, Any]) -> dict[str, Any]:
    stock, ours = result["stock"], result["ours"]
    out: dict[str, Any] = {
        f"ours_over_stock_b{b}": round(
            stock[b]["seconds_per_image"] / ours[b]["seconds_per_image"], 4
        )
        for b in ours
        if b in stock
    }
    if "1" in ours:
        base = ours["1"]["images_per_minute"]
        for b in [b for b in ours if b != "1"]:
            out[f"ours_b{b}_over_b1_throughput"] = round(ours[b]["images_per_minute"] / base, 4)
    return out


def targets_met(result: dict[str, Any]) -> dict[str, bool | None]:
    """Which of the issue's targets hold; all null unless the real architecture ran on a GPU
    (the targets are about the 6B model on an H100, not the tiny one or a CPU)."""
    if result["config"]["model"] == "tiny" or not result["machine"]["device"].startswith("cuda"):
        return dict.fromkeys(TARGETS)
    r, ours = result["ratios"], result["ours"]
    best = max((s["fraction_of_peak_flops"] or 0 for s in ours.values()), default=0)
    met: dict[str, bool | None] = {
        key: (r[key] >= TARGETS[key]) if key in r else None
        for key in ("ours_over_stock_b1", "ours_b4_over_b1_throughput")
    }
    has_fraction = any(s["fraction_of_peak_flops"] is not None for s in ours.values())
    met["fraction_of_peak"] = best >= TARGETS["fraction_of_peak"] if has_fraction else None
    return met


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    device = resolve_device(args.device)
    cuda = device.startswith("cuda")
    t0 = time.perf_counter()
    pipe = load_pipeline(args, device)
    weights_bytes = torch.cuda.memory_allocated() if cuda else None
    # Without stock runs no copy: it would keep references to weights a memory mode replaces.
    stock_pipe, weights_shared = stock_copy(pipe) if args.stock_batches else (None, True)
    load_s = time.perf_counter() - t0
    # Device memory the stock copy took: ~0 when it shares the weights as it should.
    clone_bytes = torch.cuda.memory_allocated() - weights_bytes if weights_bytes else None
    settings = engine_settings(args, device)
    t0 = time.perf_counter()
    ours, ours_wraps_pipe = make_ours(pipe, settings, device)
    engine_setup_s = time.perf_counter() - t0

    real = args.model != "tiny"  # the FLOP counts are those of the real architecture
    device_name = torch.cuda.get_device_name(device) if cuda else None
    peak, peak_key = flops.device_peak(device_name)
    cond_t, uncond_t = padded_tokens(pipe.tokenizer, PROMPT), padded_tokens(pipe.tokenizer, "")
    per_image = flops.scaled(args.width, args.height, args.steps, args.guidance) if real else None
    result: dict[str, Any] = {
        "benchmark": "engine",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "complete": False,
        "machine": {
            **machine_info(),
            "device": device,
            "device_name": device_name,
            "device_peak_bf16_tflops": peak / 1e12 if peak else None,
            "device_peak_matched": peak_key,
            "matmul_bf16_tflops_measured": flops.measured_matmul_tflops() if cuda else None,
            "transformers": __import__("transformers").__version__,
        },
        "code": code_version(),
        "config": {
            "model": args.model,
            "size": f"{args.width}x{args.height}",
            "quality": args.quality,
            "steps": args.steps,
            "guidance_scale": args.guidance,
            "seed": args.seed,
            "prompt": PROMPT,
            "text_tokens": {"cond": cond_t, "uncond": uncond_t},
            "dtype": str(pipe.transformer.dtype).removeprefix("torch."),
            "batches": args.batches,
            "stock_batches": args.stock_batches,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "engine": type(ours).__name__,
            "engine_settings": {
                k: str(getattr(settings, k))
                for k in ENGINE_FIELDS
                if k in type(settings).model_fields
            },
            "weights_shared": weights_shared and ours_wraps_pipe,
            # What torch_compile=auto did: a compiler failure falls back to eager (logged).
            "compiled": bool(getattr(getattr(ours, "fast", None), "compiled", False)),
        },
        "compile": {"graphs_after_setup": compiled_graphs(), "graphs_at_end": None},
        "flops": {
            "formula": flops.FORMULA,
            "per_image": per_image,
            "per_image_analytic": flops.analytic(
                args.width, args.height, args.steps, args.guidance, cond_t, uncond_t
            )
            if real
            else None,
            "note": "null for the tiny model (not the real shapes); fractions null on CPU",
        },
        "memory": {
            "weights_bytes": weights_bytes,
            "stock_copy_added_bytes": clone_bytes,
            "peak_rss_bytes": None,
        },
        "load_s": round(load_s, 2),
        "engine_setup_s": round(engine_setup_s, 2),
    }
    if args.json:  # the set-up figures, in case the run is cut short before a round ends
        emit_quiet(result, args.json)
    print(
        f"{args.model} on {device_name or device}: loaded in {load_s:.1f} s, engine set up in "
        f"{engine_setup_s:.1f} s, weights shared: {result['config']['weights_shared']}",
        file=sys.stderr,
    )

    runs: dict[str, dict[int, list[dict[str, Any]]]] = {"stock": {}, "ours": {}}
    first: dict[str, list[Any]] = {}  # the first counted images of each (side, batch)
    sides = {
        "stock": (lambda b: stock_call(stock_pipe, args, b), args.stock_batches),
        "ours": (lambda b: ours_call(ours, args, b), args.batches),
    }
    with cpu_audit() as audit:
        for round_no in range(args.warmup + args.repeats):
            counted = round_no >= args.warmup
            order = ["stock", "ours"] if round_no % 2 == 0 else ["ours", "stock"]
            for batch in sorted(set(args.batches) | set(args.stock_batches)):
                for side in order:
                    call, batches = sides[side]
                    if batch not in batches:
                        continue
                    images, timing = timed(lambda c=call, b=batch: c(b), cuda)
                    print(
                        f"round {round_no}{'' if counted else ' (warm-up)'} {side} "
                        f"batch {batch}: {timing['wall_s']:.3f} s",
                        file=sys.stderr,
                    )
                    if counted:
                        runs[side].setdefault(batch, []).append(timing)
                        first.setdefault(f"{side}{batch}", images)
            if counted:
                fill(result, runs, first, args, per_image, peak)
                if args.json:
                    emit_quiet(result, args.json)
        if args.variant_list:
            result["variants"] = run_variants(ours, pipe, settings, args, first, runs, cuda)
            if args.json:
                emit_quiet(result, args.json)
    result["other_cpu"] = audit
    # Equal to graphs_after_setup when no timed call compiled (the warm-up covered them all).
    result["compile"]["graphs_at_end"] = compiled_graphs()
    result["complete"] = True
    emit(result, args.json)
    print_table(result)
    return 0


def run_variants(
    ours: Any,
    pipe: Any,
    settings: Any,
    args: argparse.Namespace,
    first: dict[str, list[Any]],
    runs: dict[str, dict[int, list[dict[str, Any]]]],
    cuda: bool,
) -> dict[str, Any]:
    """Each image-changing mode on our engine, after the exact rounds: --warmup uncounted and
    --repeats counted calls per batch, seconds per image, its speed over ours exact (the exact
    rounds' median at that batch) and the largest 8-bit pixel difference from ours exact's
    images of the same seeds."""
    from cogview_api.engine.cogview4_quant import check_fp8_device, quantize_fp8
    from cogview_api.errors import EngineLoadError

    fast = ours.fast
    out: dict[str, Any] = {}
    for variant in args.variant_list:
        if variant == "step-cache":
            fast.step_cache_threshold = settings.step_cache_threshold
            described = f"first-block step cache, threshold {settings.step_cache_threshold}"
        else:
            try:
                check_fp8_device(fast.device)
            except EngineLoadError as exc:
                out[variant] = {"skipped": str(exc)}
                continue
            quantize_fp8(pipe.transformer)  # for good: the last variant (parse_args sorts)
            described = "FP8 attention and feed-forward linears (torchao, per-row scales)"
        figures: dict[str, Any] = {"what": described}
        for batch in args.batches:
            timings = []
            images: list[Any] = []
            for i in range(args.warmup + args.repeats):
                images, timing = timed(lambda b=batch: ours_call(ours, args, b), cuda)
                print(
                    f"{variant} batch {batch} call {i}: {timing['wall_s']:.3f} s", file=sys.stderr
                )
                if i >= args.warmup:
                    timings.append(timing)
            summary = summarise(timings, batch, None, None)
            exact = statistics.median(r["wall_s"] for r in runs["ours"][batch])
            summary["speed_over_exact"] = round(exact / summary["median_s"], 4)
            summary["max_pixel_diff_vs_exact"] = max(
                max_pixel_diff(a, b) for a, b in zip(images, first[f"ours{batch}"], strict=True)
            )
            if variant == "step-cache" and fast.last_step_cache is not None:
                cache = fast.last_step_cache
                summary["row_steps_skipped"] = f"{cache.skipped}/{cache.skipped + cache.computed}"
            figures[str(batch)] = summary
        out[variant] = figures
        fast.step_cache_threshold = None
    return out


def fill(
    result: dict[str, Any],
    runs: dict[str, dict[int, list[dict[str, Any]]]],
    first: dict[str, list[Any]],
    args: argparse.Namespace,
    per_image: float | None,
    peak: float | None,
) -> None:
    """(Re)compute the summaries, ratios, targets and image checks from the runs so far."""
    for side in ("stock", "ours"):
        result[side] = {
            str(b): summarise(r, b, per_image, peak) for b, r in sorted(runs[side].items())
        }
    result["ratios"] = ratios(result)
    result["targets"] = TARGETS
    result["meets_targets"] = targets_met(result)
    fidelity: dict[str, Any] = {}
    if "stock1" in first and "ours1" in first:
        fidelity["max_pixel_diff_ours_vs_stock_b1"] = max_pixel_diff(
            first["stock1"][0], first["ours1"][0]
        )
    for b in args.batches:
        if b != 1 and f"ours{b}" in first and "ours1" in first:
            fidelity[f"max_pixel_diff_ours_b{b}_vs_alone"] = max_pixel_diff(
                first[f"ours{b}"][0], first["ours1"][0]
            )
    result["fidelity"] = fidelity
    # Linux reports kilobytes; the process's high-water mark (CPU memory, both sides).
    result["memory"]["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def emit_quiet(result: dict[str, Any], out: Path) -> None:
    import json

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def print_table(result: dict[str, Any]) -> None:
    """A short table last, for a terminal or the tail of a remote log."""
    lines = ["", "side  batch  s/image  images/min  peak GB  fraction of peak"]
    for side in ("stock", "ours"):
        for b, s in result[side].items():
            gb = f"{s['peak_memory_bytes'] / 1e9:7.1f}" if s["peak_memory_bytes"] else "      -"
            frac = s["fraction_of_peak_flops"]
            lines.append(
                f"{side:5} {b:>5}  {s['seconds_per_image']:7.3f}  {s['images_per_minute']:10.2f}"
                f"  {gb}  {'-' if frac is None else f'{frac:.3f}'}"
            )
    for name, figures in result.get("variants", {}).items():
        for b, v in figures.items():
            if isinstance(v, dict):
                lines.append(
                    f"{name} batch {b}: {v['seconds_per_image']:.3f} s/image, "
                    f"{v['speed_over_exact']:.2f}x ours exact, "
                    f"max pixel diff {v['max_pixel_diff_vs_exact']}"
                )
        if "skipped" in figures:
            lines.append(f"{name}: skipped ({figures['skipped']})")
    lines.append(f"ratios: {result['ratios']}")
    lines.append(f"fidelity: {result['fidelity']}")
    lines.append(f"meets targets: {result['meets_targets']}")
    print("\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
