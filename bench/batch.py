"""The batches API: what one submit of many requests costs, and what running them costs beyond
the model.

1. echo: `cogview-api serve --model test-echo` (the Engine contract without torch: each image is
   one colour, made at once), one `POST /api/v1/batches` of N lines (default 1,000). Reports the
   submit's wall time (the whole batch validated, charged and written) and, from the batch's own
   `created_at` / `finished_at`, the wall time until its last task ended divided by N: the
   dispatch overhead per task (claim, progress writes, PNG encode, storage, settle), since the
   engine itself takes no time.
2. tiny: the tiny random-weight CogView4 pipeline. `direct` calls it in this process in a loop,
   one image per call (the same size, steps, guidance and seeds), PNG-encoding each; `api` is
   `cogview-api serve --model tiny` and one batch of the same M images (default 50), timed from
   the POST to the batch's end (its `finished_at`, seen by polling GET /api/v1/batches/{id}).
   Goal: api / direct <= 1.05. The two never run at the same time.

    .venv/bin/python bench/batch.py --out bench/results/batch-cpu.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import httpx

from api_overhead import (  # the sibling benchmark's machinery: server, audit, pipeline
    PROMPT,
    code_version,
    cpu_audit,
    emit,
    load_pipeline,
    machine_info,
    process_cpu_s,
    running_server,
    server_env,
    ts,
)

TARGET_RATIO = 1.05


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--echo-tasks", type=int, default=1000)
    p.add_argument("--tiny-images", type=int, default=50)
    p.add_argument("--size", default="512*512")
    p.add_argument("--steps", type=int, default=2, help="COGVIEW_STEPS_HD (default 2, as tests)")
    p.add_argument("--guidance", type=float, default=3.5, help="the server's default")
    p.add_argument("--skip-tiny", action="store_true")
    p.add_argument("--skip-echo", action="store_true")
    p.add_argument("--cache-dir", type=Path, default=None, help="where the tiny model is built")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args()


def lines(count: int, size: str) -> list[dict[str, Any]]:
    return [
        {"model": "cogview-4", "prompt": PROMPT, "size": size, "seed": seed}
        for seed in range(count)
    ]


def run_batch(base: str, key: str, count: int, size: str, poll_s: float) -> dict[str, Any]:
    """Submit one batch of `count` lines and wait for its end; the figures of both."""
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=base, timeout=300, headers=headers) as client:
        t0 = time.perf_counter()
        r = client.post("/api/v1/batches", json={"requests": lines(count, size)})
        t1 = time.perf_counter()
        r.raise_for_status()
        batch = r.json()["data"]
        while batch["status"] == "IN_PROGRESS":
            time.sleep(poll_s)
            batch = client.get(f"/api/v1/batches/{batch['batch_id']}").json()["data"]
        t2 = time.perf_counter()
    assert batch["counts"]["completed"] == count, batch
    server_wall = ts(batch["finished_at"]) - ts(batch["created_at"])
    return {
        "tasks": count,
        "submit_s": round(t1 - t0, 4),
        "submit_per_task_ms": round((t1 - t0) * 1000 / count, 4),
        "created_to_finished_s": round(server_wall, 4),
        "post_to_end_seen_s": round(t2 - t0, 4),
        "per_task_ms": round(server_wall * 1000 / count, 3),
        "body_bytes": len(r.request.content),
    }


def echo_phase(args: argparse.Namespace, cache: Path) -> dict[str, Any]:
    env = server_env(cache, {"COGVIEW_STEPS_HD": str(args.steps), "COGVIEW_MODEL": "test-echo"})
    with (
        running_server(
            ["--model", "test-echo"], env, ready_path="/readyz", credits=10 * args.echo_tasks
        ) as server,
        cpu_audit() as audit,
    ):
        cpu0 = process_cpu_s(server.pid) or 0.0
        result = run_batch(server.base_url, server.key, args.echo_tasks, args.size, 0.2)
        server_cpu = (process_cpu_s(server.pid) or 0.0) - cpu0
    return {**result, **server_cpu_figures(server_cpu, args.echo_tasks), "other_cpu": audit}


def server_cpu_figures(seconds: float, tasks: int) -> dict[str, float]:
    """The server process's CPU (API, in-process worker, engine): on a shared machine a
    steadier measure than wall time. `other_cpu` counts the server too (a running child)."""
    return {
        "server_cpu_s": round(seconds, 3),
        "server_cpu_per_task_ms": round(seconds * 1000 / tasks, 3),
    }


def direct_phase(args: argparse.Namespace, cache: Path) -> dict[str, Any]:
    import io

    import torch

    pipe = load_pipeline(cache)
    width, height = (int(v) for v in args.size.split("*"))

    def one(seed: int) -> None:
        with torch.inference_mode():
            image = pipe(
                prompt=PROMPT,
                negative_prompt="",
                width=width,
                height=height,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                num_images_per_prompt=1,
                generator=[torch.Generator("cpu").manual_seed(seed)],
                output_type="pil",
            ).images[0]
        image.save(io.BytesIO(), format="PNG")

    one(0)  # warm-up
    with cpu_audit() as audit:
        t0, cpu0 = time.perf_counter(), time.process_time()
        for seed in range(args.tiny_images):
            one(seed)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {
        "images": args.tiny_images,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "other_cpu": audit,
    }


def tiny_api_phase(args: argparse.Namespace, cache: Path) -> dict[str, Any]:
    env = server_env(cache, {"COGVIEW_STEPS_HD": str(args.steps)})
    with running_server(
        ["--model", "tiny"], env, ready_path="/readyz", credits=10 * args.tiny_images
    ) as server:
        run_batch(server.base_url, server.key, 1, args.size, 0.05)  # warm-up: one image
        with cpu_audit() as audit:
            cpu0 = process_cpu_s(server.pid) or 0.0
            result = run_batch(server.base_url, server.key, args.tiny_images, args.size, 0.05)
            server_cpu = (process_cpu_s(server.pid) or 0.0) - cpu0
    return {**result, **server_cpu_figures(server_cpu, args.tiny_images), "other_cpu": audit}


def main() -> int:
    args = parse_args()
    import tempfile

    with tempfile.TemporaryDirectory(prefix="cogview-bench-cache-") as tmp:
        cache = args.cache_dir or Path(tmp)
        result: dict[str, Any] = {
            "benchmark": "batch",
            "machine": machine_info(),
            "code": code_version(),
            "config": {
                "size": args.size,
                "steps": args.steps,
                "guidance": args.guidance,
                "echo_tasks": args.echo_tasks,
                "tiny_images": args.tiny_images,
            },
        }
        if not args.skip_echo:
            result["echo"] = echo_phase(args, cache)
        if not args.skip_tiny:
            direct = direct_phase(args, cache)
            api = tiny_api_phase(args, cache)
            ratio = api["created_to_finished_s"] / direct["wall_s"]
            result["tiny"] = {
                "direct": direct,
                "api": api,
                "ratio_api_over_direct": round(ratio, 4),
                "ratio_cpu_server_over_direct": round(api["server_cpu_s"] / direct["cpu_s"], 4),
                "ratio_post_to_end_seen_over_direct": round(
                    api["post_to_end_seen_s"] / direct["wall_s"], 4
                ),
                "target": TARGET_RATIO,
                "met": ratio <= TARGET_RATIO,
            }
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
