"""Prometheus instrumentation: the metric objects every layer records into, and their export.

A small module below the layers that record (api, worker, webhooks, services, engine): it
knows Prometheus (`prometheus-client`) and nothing of HTTP or the database. What it exports:

- `instruments()`: the process's metric objects, made on first use (not at import, so that
  `use_multiprocess` can come first). Labels are bounded sets: a route template, a surface, a
  status code, a quality, a preset size (else "other"), a stage, an outcome; never a prompt,
  a key or a task id.
- `QueueCollector`: the gauges read from the database (waiting and running tasks, live
  workers, pending webhooks), cached for a few seconds so scrapes stay cheap.
- `render` / `start_exporter`: the text format, on the API's `/metrics` or on a port of its own.

`serve --http-processes N` runs several HTTP processes on one port; `use_multiprocess` then
switches prometheus-client to its multiprocess mode (one file per process in
PROMETHEUS_MULTIPROC_DIR, summed at each scrape) before any metric is made.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    start_http_server,
    values,
)
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from cogview_api.domain import PRESET_SIZES

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST
# How long the database gauges of one process are reused between scrapes.
QUEUE_CACHE_S = 5.0

# Seconds. HTTP: from a cached poll (about a millisecond) to a synchronous compat route held for
# its image (up to COGVIEW_SYNC_WAIT_SECONDS, 280 s by default).
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
# Queue wait and generation: from an idle worker's instant claim to a long queue.
TASK_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
# One stage of one batch, and one denoising step (tens of ms on an H100 to seconds on a CPU).
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
STEP_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)
BATCH_IMAGES_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)

STAGES = ("encode", "denoise", "decode", "store")
WEBHOOK_OUTCOMES = ("delivered", "http_error", "transport_error", "refused")


@dataclass(frozen=True)
class Instruments:
    """Every metric one process records. Names follow Prometheus's conventions: the unit in
    the name, `_total` on counters (added by prometheus-client), base units (seconds, bytes)."""

    http_requests: Counter
    http_duration: Histogram
    tasks_submitted: Counter
    tasks_completed: Counter
    tasks_failed: Counter
    tasks_cancelled: Counter
    credits_charged: Counter
    credits_refunded: Counter
    queue_wait: Histogram
    generation: Histogram
    stage: Histogram
    batch_images: Histogram
    engine_step: Histogram
    gpu_memory: Gauge
    gpu_memory_peak: Gauge
    webhook_attempts: Counter


@functools.cache
def instruments() -> Instruments:
    """The process's metrics, registered with prometheus-client's default registry."""
    # No `<name>_created` series beside each counter and histogram: a third of a scrape's
    # lines, which nobody queries (Prometheus finds counter resets by itself).
    disable_created_metrics()  # type: ignore[no-untyped-call]
    size_quality = ("size", "quality")
    return Instruments(
        http_requests=Counter(
            "cogview_http_requests",
            "HTTP requests answered, by route template, surface and status code.",
            ("route", "surface", "status"),
        ),
        http_duration=Histogram(
            "cogview_http_request_duration_seconds",
            "Time from a request's arrival to the end of its answer (streams: their whole life).",
            ("route", "surface"),
            buckets=HTTP_BUCKETS,
        ),
        tasks_submitted=Counter(
            "cogview_tasks_submitted",
            "Tasks accepted (an Idempotency-Key replay is not counted).",
            ("surface", "quality"),
        ),
        tasks_completed=Counter(
            "cogview_tasks_completed",
            "Tasks completed with their images.",
            ("surface", "quality"),
        ),
        tasks_failed=Counter(
            "cogview_tasks_failed",
            "Tasks failed by a worker (credits refunded).",
            ("surface", "quality"),
        ),
        tasks_cancelled=Counter(
            "cogview_tasks_cancelled", "Tasks cancelled by their key.", ("surface", "quality")
        ),
        credits_charged=Counter(
            "cogview_credits_charged",
            "Credits reserved by accepted tasks (refunds are counted apart).",
            ("surface", "quality"),
        ),
        credits_refunded=Counter(
            "cogview_credits_refunded",
            "Credits given back: a failed or cancelled task.",
            ("reason",),
        ),
        queue_wait=Histogram(
            "cogview_task_queue_wait_seconds",
            "From a task's submit to its claim by a worker (its last claim, after a retry).",
            size_quality,
            buckets=TASK_BUCKETS,
        ),
        generation=Histogram(
            "cogview_task_generation_seconds",
            "From a batch's start on the engine to a task's images stored.",
            size_quality,
            buckets=TASK_BUCKETS,
        ),
        stage=Histogram(
            "cogview_stage_duration_seconds",
            "Time per stage of a batch: encode (prompts), denoise, decode (VAE), store (images).",
            ("stage",),
            buckets=STAGE_BUCKETS,
        ),
        batch_images=Histogram(
            "cogview_batch_images",
            "Images generated together in one engine batch.",
            buckets=BATCH_IMAGES_BUCKETS,
        ),
        engine_step=Histogram(
            "cogview_engine_step_duration_seconds",
            "One denoising step of a batch, by size.",
            ("size",),
            buckets=STEP_BUCKETS,
        ),
        gpu_memory=Gauge(
            "cogview_gpu_memory_used_bytes",
            "Memory held by tensors on the GPU, after the last batch (CUDA only).",
            ("device",),
            multiprocess_mode="livemax",
        ),
        gpu_memory_peak=Gauge(
            "cogview_gpu_memory_peak_bytes",
            "The most memory tensors held on the GPU since the worker started (CUDA only).",
            ("device",),
            multiprocess_mode="livemax",
        ),
        webhook_attempts=Counter(
            "cogview_webhook_attempts",
            "Webhook delivery attempts by outcome: delivered (2xx), http_error (another "
            "status), transport_error (no answer), refused (the address is not allowed).",
            ("outcome",),
        ),
    )


def size_label(width: int, height: int) -> str:
    """A preset size as `WxH`; any other size is "other", which keeps the label set bounded."""
    return f"{width}x{height}" if (width, height) in PRESET_SIZES else "other"


# -- the database gauges -------------------------------------------------------------------


@dataclass(frozen=True)
class QueueSnapshot:
    waiting: int
    running: int
    live_workers: int
    webhooks_pending: int


class QueueCollector(Collector):
    """Gauges read from the database by `read`, at most once per `ttl` seconds per process:
    many scrapers (or an impatient dashboard) cost one query set per `ttl`. When the database
    does not answer, only `cogview_database_up 0` is reported."""

    def __init__(self, read: Callable[[], QueueSnapshot], ttl: float = QUEUE_CACHE_S) -> None:
        self.read = read
        self.ttl = ttl
        self._lock = threading.Lock()
        self._at = -float("inf")
        self._snapshot: QueueSnapshot | None = None

    def snapshot(self) -> QueueSnapshot | None:
        with self._lock:
            now = time.monotonic()
            if now - self._at >= self.ttl:
                try:
                    self._snapshot = self.read()
                except Exception:  # noqa: BLE001 - a scrape reports the outage, never a 500
                    log.warning("metrics: the database did not answer", exc_info=True)
                    self._snapshot = None
                self._at = now
            return self._snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        yield GaugeMetricFamily(
            "cogview_database_up", "Whether the database answered the last look.", snap is not None
        )
        if snap is None:
            return
        for name, doc, value in (
            ("cogview_tasks_waiting", "Tasks in the queue, not yet claimed.", snap.waiting),
            ("cogview_tasks_running", "Tasks a worker is generating now.", snap.running),
            (
                "cogview_workers_live",
                "Workers with the model loaded and a recent heartbeat (as /readyz counts).",
                snap.live_workers,
            ),
            (
                "cogview_webhooks_pending",
                "Webhook deliveries not yet delivered nor given up.",
                snap.webhooks_pending,
            ),
        ):
            yield GaugeMetricFamily(name, doc, value)


# -- export --------------------------------------------------------------------------------


def use_multiprocess(directory: str) -> None:
    """Record into per-process files under `directory` (prometheus-client's multiprocess
    mode), here and in the processes this one starts. Call before `instruments()`."""
    if instruments.cache_info().currsize:
        raise RuntimeError("use_multiprocess must come before the first metric is made")
    os.environ[MULTIPROC_ENV] = directory
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]


def _process_registry() -> CollectorRegistry:
    """This process's metrics, or all processes' in multiprocess mode."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry
    instruments()  # every family is listed from the first scrape on, at zero
    return REGISTRY


def render(extra: Iterable[Collector] = ()) -> bytes:
    """The text format of this process's (or all HTTP processes') metrics and `extra`."""
    out = generate_latest(_process_registry())
    if extra:
        registry = CollectorRegistry(auto_describe=False)
        for collector in extra:
            registry.register(collector)
        out += generate_latest(registry)
    return out


class _Combined(Collector):
    def __init__(self, registry: CollectorRegistry, extra: Iterable[Collector]) -> None:
        self.registry = registry
        self.extra = tuple(extra)

    def collect(self) -> Iterator[Metric]:
        yield from self.registry.collect()
        for collector in self.extra:
            yield from collector.collect()


def start_exporter(host: str, port: int, extra: Iterable[Collector] = ()) -> None:
    """Serve the metrics on a port of their own (a daemon thread), for a worker process or
    `COGVIEW_METRICS_PORT`. Raises OSError when the port is taken."""
    start_http_server(port, addr=host, registry=_Combined(_process_registry(), extra))


__all__ = [
    "CONTENT_TYPE",
    "Instruments",
    "QueueCollector",
    "QueueSnapshot",
    "instruments",
    "render",
    "size_label",
    "start_exporter",
    "use_multiprocess",
]
