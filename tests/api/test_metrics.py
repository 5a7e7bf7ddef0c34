"""`/metrics` of the API and what the API, the worker and the database gauges record, on both
backends. The metrics are the process's own (prometheus-client's default registry), shared by
every test in this process, so each test compares values before and after what it does."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from cogview_api.metrics import QueueCollector, QueueSnapshot
from cogview_api.services.metrics import queue_snapshot
from cogview_api.store import queue
from cogview_api.store.tables import tasks
from tests.conftest import make_settings
from tests.support import (
    EXAMPLE_BODY,
    InProcessApi,
    auth,
    complete_next_task,
    free_port,
    in_process_api,
    submit_task,
)

POLL = "/api/v1/tasks/{task_id}"


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def delta(name: str, **labels: str) -> Callable[[], float]:
    """The change of one sample from now to when the returned function is called."""
    before = value(name, **labels)
    return lambda: value(name, **labels) - before


def scrape(api: InProcessApi) -> dict[str, float]:
    r = api.client.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=")
    return {
        s.name + str(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def test_requests_are_counted_by_route_template_surface_and_status(api: InProcessApi) -> None:
    key = api.make_key()
    task_id = submit_task(api.client, key)
    ok = delta("cogview_http_requests_total", route=POLL, surface="native", status="200")
    refused = delta("cogview_http_requests_total", route=POLL, surface="native", status="401")
    timed = delta("cogview_http_request_duration_seconds_count", route=POLL, surface="native")
    unmatched = delta(
        "cogview_http_requests_total", route="unmatched", surface="other", status="404"
    )
    for _ in range(2):
        assert api.client.get(f"/api/v1/tasks/{task_id}", headers=auth(key)).status_code == 200
    assert api.client.get(f"/api/v1/tasks/{task_id}").status_code == 401
    assert api.client.get("/no/such/route").status_code == 404
    assert (ok(), refused(), timed(), unmatched()) == (2, 1, 3, 1)
    text = api.client.get("/metrics").text
    assert task_id not in text and key not in text


def test_submits_and_cancels_are_counted_with_their_credits(api: InProcessApi) -> None:
    key = api.make_key(credits=100)
    submitted = delta("cogview_tasks_submitted_total", surface="native", quality="hd")
    charged = delta("cogview_credits_charged_total", surface="native", quality="hd")
    cancelled = delta("cogview_tasks_cancelled_total", surface="native", quality="hd")
    refunded = delta("cogview_credits_refunded_total", reason="cancelled")
    task_id = submit_task(api.client, key, n=2)
    # An Idempotency-Key replay is the same task: not a second submit, not charged twice.
    body = {**EXAMPLE_BODY, "n": 1}
    headers = {**auth(key), "Idempotency-Key": "metrics-replay"}
    for _ in range(2):
        r = api.client.post("/api/v1/images/generations", json=body, headers=headers)
        assert r.status_code == 200, r.text
    assert (submitted(), charged()) == (2, 8 + 4)
    r = api.client.post(f"/api/v1/tasks/{task_id}/cancel", headers=auth(key))
    assert r.status_code == 200, r.text
    assert (cancelled(), refunded()) == (1, 8)
    # A refused submit is neither counted nor charged.
    r = api.client.post("/api/v1/images/generations", json={"prompt": ""}, headers=auth(key))
    assert r.status_code == 400
    assert (submitted(), charged()) == (2, 12)


def test_the_worker_records_outcome_queue_wait_stages_and_batch(api: InProcessApi) -> None:
    key = api.make_key()
    completed = delta("cogview_tasks_completed_total", surface="native", quality="hd")
    failed = delta("cogview_tasks_failed_total", surface="native", quality="hd")
    refunded = delta("cogview_credits_refunded_total", reason="failed")
    waits = delta("cogview_task_queue_wait_seconds_count", size="1024x1024", quality="hd")
    other = delta("cogview_task_generation_seconds_count", size="other", quality="hd")
    stores = delta("cogview_stage_duration_seconds_count", stage="store")
    images = delta("cogview_batch_images_sum")
    steps = delta("cogview_engine_step_duration_seconds_count", size="1024x1024")
    submit_task(api.client, key, n=2)
    complete_next_task(api)
    submit_task(api.client, key, size="512*512")
    complete_next_task(api)
    submit_task(api.client, key, prompt="oom please")  # FlakyEngine fails it
    complete_next_task(api)
    assert (completed(), failed(), refunded()) == (2, 1, 4)
    assert (waits(), other(), stores(), images()) == (2, 1, 2, 4)
    assert steps() == 1  # 2 steps (COGVIEW_STEPS_HD in tests): one interval between them


def test_outcomes_are_counted_by_the_surface_the_task_came_in_by(api: InProcessApi) -> None:
    """The worker labels an outcome with the task's own surface (its column), not the native
    default: a task recorded as a Zhipu submit counts under surface="zhipu"."""
    key = api.make_key()
    zhipu = delta("cogview_tasks_completed_total", surface="zhipu", quality="hd")
    native = delta("cogview_tasks_completed_total", surface="native", quality="hd")
    task_id = submit_task(api.client, key)
    with api.db.write() as conn:
        conn.execute(update(tasks).where(tasks.c.id == task_id).values(surface="zhipu"))
    complete_next_task(api)
    assert (zhipu(), native()) == (1, 0)


def test_queue_gauges_are_read_from_the_database(api: InProcessApi) -> None:
    key = api.make_key()
    for _ in range(3):
        submit_task(api.client, key)
    with api.db.write() as conn:
        queue.register_worker(conn, worker_id="w-metrics", model="tiny", device="cpu")
        queue.claim_batch(conn, worker_id="w-metrics", limit=1, lease_seconds=60)
    assert queue_snapshot(api.db, api.settings) == QueueSnapshot(
        waiting=2, running=1, live_workers=1, webhooks_pending=0
    )
    got = scrape(api)
    assert got["cogview_tasks_waiting[]"] == 2
    assert got["cogview_tasks_running[]"] == 1
    assert got["cogview_workers_live[]"] == 1
    assert got["cogview_database_up[]"] == 1


def test_queue_gauges_are_cached_and_report_a_database_outage() -> None:
    calls: list[int] = []

    def read() -> QueueSnapshot:
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("database gone")
        return QueueSnapshot(waiting=5, running=1, live_workers=2, webhooks_pending=0)

    cached = QueueCollector(read, ttl=3600)
    for _ in range(3):
        names = {m.name: m.samples[0].value for m in cached.collect()}
    assert len(calls) == 1 and names["cogview_tasks_waiting"] == 5
    broken = QueueCollector(read, ttl=0)
    assert {m.name: m.samples[0].value for m in broken.collect()} == {"cogview_database_up": 0}


def test_metrics_answer_any_host_header(api: InProcessApi) -> None:
    """Scrapers reach a replica by its address, as the health probes do."""
    r = api.client.get("/metrics", headers={"Host": "10.1.2.3:8000"})
    assert r.status_code == 200
    assert api.client.get("/account", headers={"Host": "10.1.2.3:8000"}).status_code == 400


@pytest.mark.parametrize("change", [{"metrics": False}, {"metrics_port": "free"}])
def test_metrics_off_or_on_their_own_port(
    tmp_path: Path, tiny_cache: Path, change: dict[str, object]
) -> None:
    if change.get("metrics_port") == "free":
        change = {"metrics_port": free_port()}
    settings = make_settings(tmp_path, tiny_cache, **change)
    with in_process_api(settings) as api:
        counted = delta(
            "cogview_http_requests_total", route="/healthz", surface="health", status="200"
        )
        assert api.client.get("/healthz").status_code == 200
        r = api.client.get("/metrics")
        assert r.status_code == 404
        assert r.json()["error"]["type"] == "not_found"
        # Off: nothing recorded; on another port: the API's requests are still counted there.
        assert counted() == (0 if change.get("metrics") is False else 1)


def test_openapi_does_not_list_metrics(api: InProcessApi) -> None:
    paths = api.client.get("/openapi.json").json()["paths"]
    assert "/metrics" not in paths and "/healthz" in paths
