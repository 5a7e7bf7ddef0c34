"""What partial previews cost: one engine call with and without `k` previews, same jobs.

A preview is one VAE decode of one image (plus its float32 prediction), made inside the
denoising loop; the images are the same either way (tests/unit/test_engine_previews.py). This
times `CogView4Engine.generate` for one job with 0 and with k previews, taking turns (the order
flipped every round) so drift hits both alike, and reports the median extra seconds per preview
and per preview as a share of one denoising step. The engine call only: storing the WebP and its
row is the worker's (a few ms on a local folder).

    .venv/bin/python bench/previews.py --model tiny --size 512x512 --steps 8 \\
        --json bench/results/previews-tiny-cpu.json
    python bench/previews.py --model full-random --size 1024x1024 --steps 50 --json ...
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from api_overhead import code_version, cpu_audit, emit, machine_info

PROMPT = "A futuristic robot assistant helping in a modern kitchen, clean design"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--size", default="512x512")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--previews", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from cogview_api.config import Settings
    from cogview_api.domain import preview_steps
    from cogview_api.engine import EngineJob
    from cogview_api.engine.cogview4 import CogView4Engine

    width, height = (int(v) for v in args.size.lower().split("x"))
    engine = CogView4Engine.load(Settings(model=args.model))

    def job(previews: int) -> EngineJob:
        return EngineJob(
            task_id="bench",
            prompt=PROMPT,
            negative_prompt="",
            width=width,
            height=height,
            steps=args.steps,
            guidance_scale=3.5,
            seeds=(1,),
            preview_steps=preview_steps(previews, args.steps),
        )

    made: list[int] = []

    def run(previews: int) -> float:
        started = time.perf_counter()
        engine.generate(
            [job(previews)], lambda *_: True, lambda task, index, step, image: made.append(step)
        )
        return time.perf_counter() - started

    times: dict[int, list[float]] = {0: [], args.previews: []}
    with cpu_audit() as audit:
        for r in range(args.warmup + args.rounds):
            order = [0, args.previews] if r % 2 == 0 else [args.previews, 0]
            for k in order:
                seconds = run(k)
                if r >= args.warmup:
                    times[k].append(seconds)
    k = len(preview_steps(args.previews, args.steps))
    base, with_previews = statistics.median(times[0]), statistics.median(times[args.previews])
    per_preview = (with_previews - base) / k if k else 0.0
    result: dict[str, Any] = {
        "bench": "previews",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "code": code_version(),
        "machine": machine_info(),
        "engine": {"model": args.model, "device": engine.device, "size": args.size},
        "steps": args.steps,
        "previews": k,
        "rounds": args.rounds,
        "median_s": {"without": round(base, 4), "with": round(with_previews, 4)},
        "extra_s_per_preview": round(per_preview, 4),
        # A step's time, roughly: the run without previews over its steps (encode and the
        # final decode included, so this share is an upper bound's lower side).
        "preview_over_step": round(per_preview / (base / args.steps), 3),
        "all_s": {str(key): [round(t, 4) for t in v] for key, v in times.items()},
        "cpu_audit": audit,
    }
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
