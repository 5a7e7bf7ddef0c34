"""`COGVIEW_MODEL=test-echo`: a stand-in engine for the scale-out tests, never for serving.

The fault and concurrency tests run hundreds of tasks through several real `cogview-api worker`
processes on a 2-core machine; the tiny diffusers model takes over a second per image there,
which would make those tests take many minutes while proving nothing more about the queue. This
engine keeps the contract of `Engine.generate` (progress per step, stop on False, one image
per seed, the job's size) without torch, and appends one line per job to
`<cache_dir>/echo-calls/<pid>.txt` ("task_id batch_size") when a batch starts, so a test can
count how often each task was run and by which process. `COGVIEW_TEST_ECHO_STEP_SECONDS`
(default 0) sleeps per step, so a test can catch a worker in the middle of a batch.

A prompt containing `FAIL_MARKER` ("[echo:fail]") makes the engine raise EngineError for its
batch, as a real engine does on a GPU fault: the tests' way to fail a task in a real process.
One containing `NOISE_MARKER` ("[echo:noise]") gets images of noise drawn from each image's
seed instead of one colour: files as large as a photograph's, which no encoder can shrink, for
the tests of what the server holds in memory while it sends images (a batch's archive).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from cogview_api.engine import EngineJob, PreviewFn, ProgressFn
from cogview_api.errors import EngineError

if TYPE_CHECKING:
    from cogview_api.config import Settings

ECHO_MODEL = "test-echo"
STEP_SECONDS_ENV = "COGVIEW_TEST_ECHO_STEP_SECONDS"
FAIL_MARKER = "[echo:fail]"
NOISE_MARKER = "[echo:noise]"


def calls_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / "echo-calls"


class EchoEngine:
    name = ECHO_MODEL
    device = "cpu"

    def __init__(self, settings: Settings) -> None:
        self.log_dir = calls_dir(settings.cache_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.step_seconds = float(os.environ.get(STEP_SECONDS_ENV, "0") or 0)

    def generate(
        self,
        jobs: Sequence[EngineJob],
        progress: ProgressFn,
        preview: PreviewFn | None = None,
    ) -> list[list[Image.Image]]:
        with open(self.log_dir / f"{os.getpid()}.txt", "a") as log:
            log.write("".join(f"{job.task_id} {len(jobs)}\n" for job in jobs))
        if any(FAIL_MARKER in job.prompt for job in jobs):
            raise EngineError("The test-echo engine was asked to fail this batch.")
        live = {job.task_id for job in jobs}
        for step in range(1, max(job.steps for job in jobs) + 1):
            if not live:  # every task cancelled or taken back: the batch ends here, as the
                break  # real engines' do at their next step
            if self.step_seconds:
                time.sleep(self.step_seconds)
            for job in jobs:
                going = job.task_id in live and step <= job.steps
                if going and not progress(job.task_id, "denoising", step):
                    live.discard(job.task_id)
                elif going and preview is not None and step in job.preview_steps:
                    # A stand-in preview: the first image's colour, darker the earlier the step.
                    shade = _image(job.width, job.height, job.seeds[0]).point(
                        lambda v, f=step / job.steps: int(v * f)
                    )
                    preview(job.task_id, job.preview_steps.index(step), step, shade)
        return [
            [_image(job.width, job.height, seed, NOISE_MARKER in job.prompt) for seed in job.seeds]
            if job.task_id in live
            else []
            for job in jobs
        ]


def _image(width: int, height: int, seed: int, noise: bool = False) -> Image.Image:
    if noise:
        return Image.frombytes(
            "RGB", (width, height), random.Random(seed).randbytes(width * height * 3)
        )
    return Image.new("RGB", (width, height), (seed % 256, (seed >> 8) % 256, (seed >> 16) % 256))
