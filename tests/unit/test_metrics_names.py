"""The metric families: Prometheus's naming conventions and bounded label sets."""

from __future__ import annotations

import re

from prometheus_client import REGISTRY
from prometheus_client.metrics_core import Metric

from cogview_api.domain import PRESET_SIZES
from cogview_api.metrics import (
    STAGES,
    WEBHOOK_OUTCOMES,
    QueueCollector,
    QueueSnapshot,
    instruments,
    size_label,
)
from cogview_api.webhooks.dispatcher import attempt_outcome

# Every label any family may carry; each has a small set of values (a route template, not a
# path). Never a task id, a key, a prompt, a user or a URL.
BOUNDED_LABELS = {"route", "surface", "status", "quality", "size", "stage", "outcome", "reason"}
BOUNDED_LABELS |= {"device"}  # cuda:N, one per GPU of the machine


def families() -> list[Metric]:
    instruments()
    snapshot = QueueSnapshot(waiting=0, running=0, live_workers=0, webhooks_pending=0)
    ours = [m for m in REGISTRY.collect() if m.name.startswith("cogview_")]
    return ours + list(QueueCollector(lambda: snapshot).collect())


def label_names(family: Metric) -> set[str]:
    # A labelled family has samples only once a child exists: read them from the object.
    for metric in vars(instruments()).values():
        if metric._name == family.name:
            return set(metric._labelnames)
    return {name for s in family.samples for name in s.labels}


def test_names_follow_prometheus_conventions() -> None:
    found = families()
    assert len(found) >= 20
    for family in found:
        assert re.fullmatch(r"cogview_[a-z][a-z0-9_]*[a-z0-9]", family.name), family.name
        if family.type == "counter":  # exposed as <name>_total (prometheus-client adds it)
            assert not family.name.endswith("_total")
            assert all(s.name.endswith("_total") for s in family.samples)
        if re.search(r"duration|queue_wait|generation", family.name):
            assert family.name.endswith("_seconds"), family.name
        if "memory" in family.name:
            assert family.name.endswith("_bytes"), family.name
        assert family.documentation, family.name


def test_label_sets_are_bounded() -> None:
    for family in families():
        assert label_names(family) <= BOUNDED_LABELS, family.name


def test_the_required_families_exist() -> None:
    names = {f.name for f in families()}
    assert names >= {
        "cogview_http_requests",
        "cogview_http_request_duration_seconds",
        "cogview_tasks_submitted",
        "cogview_tasks_completed",
        "cogview_tasks_failed",
        "cogview_tasks_cancelled",
        "cogview_tasks_waiting",
        "cogview_tasks_running",
        "cogview_task_queue_wait_seconds",
        "cogview_task_generation_seconds",
        "cogview_stage_duration_seconds",
        "cogview_batch_images",
        "cogview_engine_step_duration_seconds",
        "cogview_gpu_memory_used_bytes",
        "cogview_gpu_memory_peak_bytes",
        "cogview_webhook_attempts",
        "cogview_webhooks_pending",
        "cogview_credits_charged",
        "cogview_credits_refunded",
        "cogview_workers_live",
    }
    assert STAGES == ("encode", "denoise", "decode", "store")


def test_sizes_outside_the_presets_share_one_label() -> None:
    assert {size_label(w, h) for w, h in PRESET_SIZES} == {f"{w}x{h}" for w, h in PRESET_SIZES}
    assert size_label(512, 512) == size_label(2048, 1024) == "other"


def test_webhook_attempt_outcomes() -> None:
    assert attempt_outcome(200, None) == attempt_outcome(204, None) == "delivered"
    assert attempt_outcome(500, None) == attempt_outcome(301, None) == "http_error"
    assert attempt_outcome(None, "ConnectTimeout: timed out") == "transport_error"
    assert attempt_outcome(None, "refused: 10.0.0.1 is private") == "refused"
    assert {"delivered", "http_error", "transport_error", "refused"} == set(WEBHOOK_OUTCOMES)
