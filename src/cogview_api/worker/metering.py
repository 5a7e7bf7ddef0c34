"""What a worker records for the metrics about one batch (cogview_api.metrics)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from cogview_api.domain import Task
from cogview_api.metrics import instruments, size_label


class BatchMeter:
    """Made when a batch starts: records each task's queue wait and the batch's image count,
    then the engine's step time from the progress calls of the batch's first task (one call
    per step; the first interval, which holds the prompt encoding, is not a step), and each
    task's outcome with its generation time."""

    def __init__(self, batch: Sequence[Task]) -> None:
        self.m = instruments()
        self.started = time.perf_counter()
        first = batch[0]
        self.size = size_label(first.width, first.height)
        self._probe = first.id
        self._last_step: float | None = None
        for task in batch:
            if task.started_at is not None:
                wait = (task.started_at - task.created_at).total_seconds()
                self.m.queue_wait.labels(self._size(task), task.quality.value).observe(wait)
        self.m.batch_images.observe(sum(len(task.seeds) for task in batch))

    @staticmethod
    def _size(task: Task) -> str:
        return size_label(task.width, task.height)

    def step(self, task_id: str) -> None:
        if task_id != self._probe:
            return
        now = time.perf_counter()
        if self._last_step is not None:
            self.m.engine_step.labels(self.size).observe(now - self._last_step)
        self._last_step = now

    def stored(self, seconds: float) -> None:
        self.m.stage.labels("store").observe(seconds)

    def completed(self, task: Task) -> None:
        elapsed = time.perf_counter() - self.started
        self.m.generation.labels(self._size(task), task.quality.value).observe(elapsed)
        self.m.tasks_completed.labels(task.surface, task.quality.value).inc()

    def failed(self, task: Task) -> None:
        self.m.tasks_failed.labels(task.surface, task.quality.value).inc()
        if task.credits_charged:
            self.m.credits_refunded.labels("failed").inc(task.credits_charged)
