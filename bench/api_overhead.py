"""What the API adds to one image: wall time through the HTTP API vs the pipeline called directly.

Both sides make the same PNG file: the tiny random-weight CogView4 pipeline, one image, the same
prompt, size, step count, guidance scale and seed.

  direct: `CogView4Pipeline.from_pretrained(tiny)(...)` in this process, then PNG-encode to bytes.
  api:    `cogview-api serve --model tiny` as a subprocess; submit -> poll the task -> download.

The two never run at the same time, so on a small machine they do not compete for cores: the
direct runs happen before the server starts and again after it has stopped (so a drift of the
machine's speed shows up and averages out), the API runs in between.

The API time is split into phases from the task's own timestamps: submit, waiting in the queue
until a worker claims it, claimed to completed (engine, PNG encode, storage, database), completed
until the client's next poll sees it, and the image download.

    .venv/bin/python bench/api_overhead.py --out bench/results/api_overhead-cpu.json

Knobs for finding where time goes: --client-poll (how often the client polls), --poll-after (no
polls during the first N seconds), --separate-worker (`serve --workers 0` + `cogview-api worker`)
and --worker-poll (COGVIEW_POLL_INTERVAL, the idle worker's look for work when nothing wakes it).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

PROMPT = "A futuristic robot assistant helping in a modern kitchen, clean design"
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED")
TARGET_RATIO = 1.10
NOTES = [
    "direct = pipeline call + PNG encode to bytes, in this process, torch.inference_mode.",
    "api = POST -> poll GET /api/v1/tasks/{id} every client_poll_interval_s -> GET image; "
    "with client 'wait', POST with `Prefer: wait=60` answers with the finished task -> GET image.",
    "worker_poll_interval_s = COGVIEW_POLL_INTERVAL, how often an idle worker looks for work; "
    "it bounds queued_until_claimed where nothing wakes the worker on submit.",
    "Order (default): one direct run, then one API run, R times, with the server idle during "
    "direct runs; --blocks: direct (R runs), api (R runs), direct again (R runs), with no "
    "server during direct runs.",
    "Phases come from the task's created_at/started_at/completed_at and client clocks; "
    "*_saving_seen use the first poll that saw stage 'saving' (engine done, PNG encode and "
    "storage under way), so they are off by up to one client poll interval.",
    "other_cpu: CPU time used by processes other than the benchmark and its server during "
    "each side (from /proc/stat); near 0 means no competition for the cores.",
]

# One direct run: the PNG bytes and its timings.
DirectRun = tuple[bytes, dict[str, float]]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=10, help="timed runs per side (default 10)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    p.add_argument("--steps", type=int, default=2, help="COGVIEW_STEPS_HD (default 2, as tests)")
    p.add_argument("--size", default="1024*1024")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--guidance", type=float, default=3.5, help="the server's default")
    p.add_argument(
        "--client",
        choices=("poll", "wait"),
        default="poll",
        help="poll: submit, then poll GET /tasks/{id} (the hosted API's way, default); "
        "wait: submit with `Prefer: wait=60`, which answers with the finished task",
    )
    p.add_argument(
        "--client-poll", type=float, default=0.02, help="client poll interval, s (default 0.02)"
    )
    p.add_argument(
        "--poll-after",
        type=float,
        default=0.0,
        help="wait this long after submitting before the first poll, s (default 0)",
    )
    p.add_argument(
        "--worker-poll",
        type=float,
        default=None,
        help="COGVIEW_POLL_INTERVAL for the server's worker, s (default: the server's own, 0.5)",
    )
    p.add_argument(
        "--separate-worker",
        action="store_true",
        help="run `serve --workers 0` plus a `cogview-api worker` process (default: in-process)",
    )
    p.add_argument(
        "--blocks",
        action="store_true",
        help="all direct runs, then the server's, then direct again (default: take turns)",
    )
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "cogview-api")
    p.add_argument("--out", type=Path, help="also write the JSON result here")
    return p.parse_args()


# -- machine and numbers ----------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    import diffusers
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "cuda": torch.cuda.is_available(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def code_version() -> dict[str, Any]:
    """The git commit measured, and whether src/ had uncommitted changes (None outside git)."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        except OSError:
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--", "src")
    return {
        "commit": git("rev-parse", "HEAD"),
        "src_dirty": None if status is None else bool(status),
    }


def cpu_counters_s() -> tuple[float, float] | None:
    """(busy, steal) CPU seconds of all cores since boot, from Linux /proc/stat, or None."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal
    busy = sum(fields[:7]) - fields[3] - fields[4]
    return busy / os.sysconf("SC_CLK_TCK"), fields[7] / os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (Linux /proc), or None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()  # children count once they have been waited for
    return t.user + t.system + t.children_user + t.children_system


@contextmanager
def cpu_audit() -> Iterator[dict[str, Any]]:
    """CPU time used meanwhile by processes other than this one and its (waited) children.

    Also the hypervisor's steal time. Near zero means the figures are clean; a large share
    means another job competed for the cores.
    """
    audit: dict[str, Any] = {}
    start, own0, wall0 = cpu_counters_s(), _own_cpu_s(), time.perf_counter()
    yield audit
    end, own1, wall = cpu_counters_s(), _own_cpu_s(), time.perf_counter() - wall0
    if start is None or end is None:
        audit["other_cpu_s"] = None
        return
    other = max(0.0, (end[0] - start[0]) - (own1 - own0))
    audit.update(
        wall_s=round(wall, 2),
        own_cpu_s=round(own1 - own0, 2),
        other_cpu_s=round(other, 2),
        steal_s=round(end[1] - start[1], 2),
        other_share_of_all_cores=round(other / (wall * (os.cpu_count() or 1)), 3),
    )
    if audit["other_share_of_all_cores"] > 0.05:
        print(f"warning: other processes used the CPU meanwhile: {audit}", file=sys.stderr)


def summary(seconds: list[float]) -> dict[str, Any]:
    return {
        "median_s": round(statistics.median(seconds), 4),
        "mean_s": round(statistics.fmean(seconds), 4),
        "min_s": round(min(seconds), 4),
        "max_s": round(max(seconds), 4),
        "runs_s": [round(s, 4) for s in seconds],
    }


def median_of(rows: Sequence[Mapping[str, float | None]]) -> dict[str, float | None]:
    """Per key, the median of the values that are not None (None if all are)."""
    out: dict[str, float | None] = {}
    for k in rows[0]:
        values = [v for r in rows if (v := r[k]) is not None]
        out[k] = round(statistics.median(values), 4) if values else None
    return out


# -- direct: the pipeline in this process -----------------------------------------------------


def direct_once(pipe: Any, args: argparse.Namespace, width: int, height: int) -> DirectRun:
    """One image as the engine makes it (CPU generator, guidance, steps), then PNG bytes."""
    import torch

    t0 = time.perf_counter()
    with torch.inference_mode():
        image = pipe(
            prompt=PROMPT,
            negative_prompt="",
            width=width,
            height=height,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            num_images_per_prompt=1,
            generator=[torch.Generator("cpu").manual_seed(args.seed)],
            output_type="pil",
        ).images[0]
    t1 = time.perf_counter()
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    t2 = time.perf_counter()
    return buf.getvalue(), {"pipeline": t1 - t0, "png_encode": t2 - t1, "total": t2 - t0}


def load_pipeline(cache_dir: Path) -> Any:
    import torch
    from diffusers import CogView4Pipeline

    from cogview_api.engine.tiny import tiny_model_dir

    folder = tiny_model_dir(cache_dir)
    pipe = CogView4Pipeline.from_pretrained(folder, dtype=torch.float32)  # type: ignore[no-untyped-call]
    pipe.set_progress_bar_config(disable=True)
    return pipe


def direct_runs(pipe: Any, args: argparse.Namespace, width: int, height: int) -> list[DirectRun]:
    for _ in range(args.warmup):
        direct_once(pipe, args, width, height)
    return [direct_once(pipe, args, width, height) for _ in range(args.repeats)]


def direct_result(before: list[DirectRun], after: list[DirectRun]) -> dict[str, Any]:
    runs = before + after
    png = runs[-1][0]
    return {
        **summary([r["total"] for _, r in runs]),
        "median_before_api_s": round(statistics.median(r["total"] for _, r in before), 4),
        "median_after_api_s": round(statistics.median(r["total"] for _, r in after), 4),
        "breakdown_median_s": median_of([r for _, r in runs]),
        "png_bytes": len(png),
        "png_sha256": hashlib.sha256(png).hexdigest(),
    }


# -- api: the real server as a subprocess -----------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cogview_api_command() -> list[str]:
    script = Path(sys.executable).parent / "cogview-api"
    return [str(script)] if script.exists() else [sys.executable, "-m", "cogview_api.cli"]


@dataclass
class Server:
    base_url: str
    key: str
    workdir: Path
    pid: int


def server_env(cache_dir: Path, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COGVIEW_")}
    env.update({"COGVIEW_CACHE_DIR": str(cache_dir), "COGVIEW_LOG_LEVEL": "warning"})
    env["HF_HUB_OFFLINE"] = "1"
    env.update(extra)
    return env


def wait_for(proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready in {timeout}s:\n{log.read_text()[-3000:]}")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def cogview_process(args: list[str], env: dict[str, str], log: Path) -> Iterator[Any]:
    """`cogview-api ARGS` in the data folder `log.parent`, stopped by SIGINT on exit."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*cogview_api_command(), *args],
            cwd=log.parent, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        yield proc
    finally:
        stop_process(proc)


@contextmanager
def running_server(
    serve_args: list[str],
    env: dict[str, str],
    *,
    ready_path: str,
    credits: int,
    worker_processes: int = 0,
) -> Iterator[Server]:
    """`cogview-api serve` in a fresh data folder on a free port, and a key made by the CLI.

    With `worker_processes`, that many `cogview-api worker --model tiny` processes too.
    """
    with tempfile.TemporaryDirectory(prefix="cogview-bench-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log = workdir / "serve.log"
        proc = stack.enter_context(
            cogview_process(["serve", "--port", str(port), *serve_args], env, log)
        )
        wait_for(proc, base + "/healthz", log)  # the schema is in place before workers start
        for i in range(worker_processes):
            args = ["worker", "--model", "tiny"]
            stack.enter_context(cogview_process(args, env, workdir / f"worker-{i}.log"))
        wait_for(proc, base + ready_path, log)
        made = subprocess.run(
            [*cogview_api_command(), "keys", "create", "--name", "bench"]
            + ["--credits", str(credits), "--json"],
            cwd=workdir, env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        key = json.loads(made.stdout)["key"]
        yield Server(base_url=base, key=key, workdir=workdir, pid=proc.pid)


def ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def api_once(
    client: httpx.Client, body: dict[str, Any], poll: float, poll_after: float, wait: bool
) -> dict[str, Any]:
    """Submit, poll until terminal (or, with `wait`, let `Prefer: wait=60` hold the submit
    until the task is done), download the image. Times from the client's clock."""
    t_send = time.time()
    headers = {"Prefer": "wait=60"} if wait else {}
    r = client.post("/api/v1/images/generations", json=body, headers=headers)
    r.raise_for_status()
    task = r.json()["data"]
    task_id = task["task_id"]
    if not wait:
        time.sleep(poll_after)
    t_saving = None  # when a poll first saw stage "saving": the engine is done
    while True:
        if task.get("status") in TERMINAL and "images" in task:
            break
        task = client.get(f"/api/v1/tasks/{task_id}").raise_for_status().json()["data"]
        if task["status"] in TERMINAL:
            break
        if t_saving is None and task["progress"]["stage"] == "saving":
            t_saving = time.time()
        time.sleep(poll)
    t_seen = time.time()
    if task["status"] != "COMPLETED":
        raise RuntimeError(f"task {task_id} ended {task['status']}: {task['error']}")
    png = client.get(task["images"][0]["url"]).raise_for_status().content
    t_done = time.time()
    created, started, completed = (
        ts(task[k]) for k in ("created_at", "started_at", "completed_at")
    )
    phases = {
        "submit_to_created": created - t_send,
        "queued_until_claimed": started - created,
        "claimed_to_completed": completed - started,
        "claimed_to_saving_seen": None if t_saving is None else t_saving - started,
        "saving_seen_to_completed": None if t_saving is None else completed - t_saving,
        "completed_to_seen_by_client": t_seen - completed,
        "download": t_done - t_seen,
        "total": t_done - t_send,
    }
    return {"png": png, "phases": phases}


@contextmanager
def api_client(args: argparse.Namespace) -> Iterator[tuple[httpx.Client, dict[str, Any]]]:
    """A ready server (as `--separate-worker` says) and a client holding its key."""
    extra = {"COGVIEW_STEPS_HD": str(args.steps), "COGVIEW_GUIDANCE_SCALE": str(args.guidance)}
    if args.worker_poll is not None:
        extra["COGVIEW_POLL_INTERVAL"] = str(args.worker_poll)
    env = server_env(args.cache_dir, extra)
    body = {"model": "cogview-4", "prompt": PROMPT, "size": args.size, "quality": "hd"}
    body["seed"] = args.seed
    credits = 4 * 2 * (args.warmup + args.repeats) + 100
    if args.separate_worker:  # API-only server + one `cogview-api worker` process
        serve_args, worker_processes = ["--workers", "0"], 1
    else:  # the default: `serve` runs the worker in-process
        serve_args, worker_processes = ["--model", "tiny"], 0
    with (
        running_server(
            serve_args,
            env,
            ready_path="/readyz",
            credits=credits,
            worker_processes=worker_processes,
        ) as srv,
        httpx.Client(
            base_url=srv.base_url, headers={"Authorization": f"Bearer {srv.key}"}, timeout=120
        ) as client,
    ):
        yield client, body


def api_call(args: argparse.Namespace, client: httpx.Client, body: dict[str, Any]) -> Any:
    return api_once(client, body, args.client_poll, args.poll_after, args.client == "wait")


def api_result(runs: list[dict[str, Any]]) -> dict[str, Any]:
    png = runs[-1]["png"]
    return {
        **summary([r["phases"]["total"] for r in runs]),
        "breakdown_median_s": median_of([r["phases"] for r in runs]),
        "png_bytes": len(png),
        "png_sha256": hashlib.sha256(png).hexdigest(),
    }


def api_runs(args: argparse.Namespace) -> dict[str, Any]:
    with api_client(args) as (client, body):
        for _ in range(args.warmup):
            api_call(args, client, body)
        runs = [api_call(args, client, body) for _ in range(args.repeats)]
    return api_result(runs)


def interleaved_runs(
    args: argparse.Namespace, pipe: Any, width: int, height: int
) -> tuple[list[DirectRun], dict[str, Any], list[float]]:
    """Direct and API runs taking turns, so drift in the machine's speed hits both alike.
    The direct run happens while the server idles (its worker looks for work every
    COGVIEW_POLL_INTERVAL: one short database transaction)."""
    with api_client(args) as (client, body):
        for _ in range(args.warmup):
            direct_once(pipe, args, width, height)
            api_call(args, client, body)
        direct, api = [], []
        for _ in range(args.repeats):
            direct.append(direct_once(pipe, args, width, height))
            api.append(api_call(args, client, body))
    pair_ratios = [a["phases"]["total"] / d[1]["total"] for d, a in zip(direct, api, strict=True)]
    return direct, api_result(api), pair_ratios


# -- main -------------------------------------------------------------------------------------


def config_of(args: argparse.Namespace) -> dict[str, Any]:
    if args.separate_worker:
        server = "cogview-api serve --workers 0 + cogview-api worker --model tiny"
    else:
        server = "cogview-api serve --model tiny (worker in-process)"
    worker_poll = args.worker_poll
    if worker_poll is None:
        worker_poll = "server default (COGVIEW_POLL_INTERVAL unset, 0.5)"
    return {
        "model": "tiny",
        "size": args.size,
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "seed": args.seed,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "client": args.client,
        "client_poll_interval_s": args.client_poll if args.client == "poll" else None,
        "client_first_poll_after_s": args.poll_after,
        "server": server,
        "worker_poll_interval_s": worker_poll,
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Direct and API runs, interleaved (default) or in blocks; each side under a CPU audit."""
    width, height = (int(v) for v in args.size.replace("x", "*").split("*"))
    pipe = load_pipeline(args.cache_dir)
    extra: dict[str, Any] = {}
    if args.blocks:
        print("direct: pipeline in this process ...", file=sys.stderr)
        with cpu_audit() as audit_before:
            before = direct_runs(pipe, args, width, height)
        print("api: cogview-api serve subprocess ...", file=sys.stderr)
        with cpu_audit() as api_audit:
            api = api_runs(args)
        print("direct again, after the server has stopped ...", file=sys.stderr)
        with cpu_audit() as audit_after:
            after = direct_runs(pipe, args, width, height)
        direct = direct_result(before, after)
        audits = {"direct_before": audit_before, "api": api_audit, "direct_after": audit_after}
    else:
        print("direct and api runs, taking turns ...", file=sys.stderr)
        with cpu_audit() as audit:
            runs, api, pair_ratios = interleaved_runs(args, pipe, width, height)
        half = len(runs) // 2
        direct = direct_result(runs[:half] or runs, runs[half:] or runs)
        audits = {"interleaved": audit}
        extra["ratio_per_pair_median"] = round(statistics.median(pair_ratios), 4)
        extra["ratio_per_pair"] = [round(r, 4) for r in pair_ratios]
    ratio_median = api["median_s"] / direct["median_s"]
    return {
        "other_cpu": audits,
        "direct": direct,
        "api": api,
        "same_png": direct["png_sha256"] == api["png_sha256"],
        "ratio_api_over_direct_median": round(ratio_median, 4),
        "ratio_api_over_direct_mean": round(api["mean_s"] / direct["mean_s"], 4),
        "ratio_api_over_direct_min": round(api["min_s"] / direct["min_s"], 4),
        **extra,
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio_median <= TARGET_RATIO,
    }


def main() -> int:
    args = parse_args()
    result = {
        "benchmark": "api_overhead",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "code": code_version(),
        "config": config_of(args),
        "notes": NOTES,
        **measure(args),
    }
    emit(result, args.out)
    return 0


def emit(result: dict[str, Any], out: Path | None) -> None:
    """Print the result as JSON, and write it to `out` when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
