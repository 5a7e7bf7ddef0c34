"""What a new user waits for: one 1024x1024 hd image from the tiny model on this machine's CPU.

Starts `cogview-api serve --model tiny` (the README's quick start, default settings: hd = 50
steps) in a fresh data folder, submits the hosted API's example body (1024*1024, hd), polls
until COMPLETED, and reads the worker's own line of the task (COGVIEW_LOG_FORMAT=json) for its
queue wait and run time. The first start also builds the tiny model into --cache-dir; that
build is timed apart (the start before the server answers).

    .venv/bin/python bench/first_image.py --out bench/results/first_image-tiny-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
BODY = {
    "model": "cogview-4",
    "prompt": "A futuristic robot assistant helping in a modern kitchen, clean design",
    "size": "1024*1024",
    "quality": "hd",
}
CLI = [sys.executable, "-c", "from cogview_api.cli import main; raise SystemExit(main())"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "cogview-api")
    p.add_argument("--port", type=int, default=18471)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    # The tiny model is built at the first start into the cache, then loaded from it.
    built_now = not any(args.cache_dir.glob("tiny*"))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT / "src"),
            "COGVIEW_DATA_DIR": str(work / "data"),
            "COGVIEW_CACHE_DIR": str(args.cache_dir),
            "COGVIEW_LOG_FORMAT": "json",
            "HF_HUB_OFFLINE": "1",
        }
        made = subprocess.run(
            [*CLI, "keys", "create", "--name", "bench", "--credits", "100", "--json"],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        secret = json.loads(made.stdout)["key"]
        log_path = work / "serve.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [*CLI, "serve", "--model", "tiny", "--port", str(args.port)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            base = f"http://127.0.0.1:{args.port}"
            started = time.monotonic()
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(log_path.read_text()[-2000:])
                try:
                    if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            start_s = time.monotonic() - started
            headers = {"Authorization": f"Bearer {secret}"}
            submitted = time.monotonic()
            r = httpx.post(base + "/api/v1/images/generations", json=BODY, headers=headers)
            r.raise_for_status()
            task_id = r.json()["data"]["task_id"]
            while True:
                task = httpx.get(f"{base}/api/v1/tasks/{task_id}", headers=headers).json()["data"]
                if task["status"] != "IN_PROGRESS":
                    break
                time.sleep(0.5)
            wall_s = time.monotonic() - submitted
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        lines = [json.loads(x) for x in log_path.read_text().splitlines() if x.startswith("{")]
        (done,) = [x for x in lines if x.get("task_id") == task_id and x.get("outcome")]
    result: dict[str, Any] = {
        "benchmark": "first_image",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "config": {**BODY, "engine_model": "tiny", "steps": "hd default (50)"},
        "tiny_model_built_at_start": built_now,
        "status": task["status"],
        "start_to_ready_s": round(start_s, 1),
        "submit_to_completed_s": round(wall_s, 1),
        "worker_run_s": done["run_s"],
        "worker_queue_wait_s": done["queue_wait_s"],
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
