"""A real Prometheus (Debian's `prometheus` package) scrapes a real `serve --workers 0` and a real
`cogview-api worker --metrics-port`, and what it stored is read back through its HTTP API with
PromQL: the tasks completed, the submits, the live worker, and a latency quantile.

The worker runs the `test-echo` engine (engine/echo.py): the subject is the metrics pipeline,
not the model.
"""

from __future__ import annotations

import math
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cogview_api.services import keys as key_service
from cogview_api.store.db import Database
from tests.support import (
    CLI,
    ServerProcess,
    auth,
    free_port,
    poll_until_done,
    server_env,
    submit_task,
)

PROMETHEUS = Path("/usr/bin/prometheus")
TASKS = 3
READYZ = 20
POLL_ROUTE = 'route="/api/v1/tasks/{task_id}"'


@dataclass
class Stack:
    api: ServerProcess
    worker_port: int
    prometheus: str  # base URL of its HTTP API

    def query(self, promql: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.prometheus}/api/v1/query", params={"query": promql}, timeout=10)
        r.raise_for_status()
        body = r.json()
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def scalar(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, promql: str, want: float, timeout: float = 60) -> float:
        """The query's value once it equals `want` (Prometheus scrapes every second)."""
        deadline = time.monotonic() + timeout
        got = None
        while time.monotonic() < deadline:
            got = self.scalar(promql)
            if got == want:
                return got
            time.sleep(0.5)
        raise AssertionError(f"{promql} = {got}, not {want}, after {timeout} s")


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer in {timeout} s: {log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    assert PROMETHEUS.exists(), "Debian's prometheus package is needed (scripts/test.sh)"
    workdir = tmp_path_factory.mktemp("prom")
    env = server_env(workdir / "cache", {"COGVIEW_MODEL": "test-echo"})
    # Two HTTP processes on the port: whichever answers a scrape reports both (multiprocess).
    api = ServerProcess(workdir=workdir, env=env, args=("--workers", "0", "--http-processes", "2"))
    worker_port, prom_port = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        api.start(wait_ready=False)
        worker_log = workdir / "worker.log"
        with open(worker_log, "ab") as out:
            worker = subprocess.Popen(
                [*CLI, "worker", "--metrics-port", str(worker_port)],
                cwd=workdir,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        procs.append(worker)
        _wait_http(f"http://127.0.0.1:{worker_port}/metrics", worker, worker_log)
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  evaluation_interval: 1s\n"
            "scrape_configs:\n"
            "  - job_name: cogview-api\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{api.port}']}}]\n"
            "  - job_name: cogview-worker\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{worker_port}']}}]\n"
        )
        prom_log = workdir / "prometheus.log"
        with open(prom_log, "ab") as out:
            prom = subprocess.Popen(
                [
                    str(PROMETHEUS),
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                ],
                cwd=workdir,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        procs.append(prom)
        base = f"http://127.0.0.1:{prom_port}"
        _wait_http(f"{base}/-/ready", prom, prom_log)
        yield Stack(api=api, worker_port=worker_port, prometheus=base)
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        api.stop()


def test_prometheus_reads_back_the_traffic_it_scraped(stack: Stack) -> None:
    stack.wait_for('sum(up{job=~"cogview-.*"})', 2)
    key = stack.api.make_key()["key"]
    with httpx.Client(base_url=stack.api.base_url, timeout=30) as client:
        ids = [submit_task(client, key) for _ in range(TASKS)]
        for task_id in ids:
            assert poll_until_done(client, task_id, key)["status"] == "COMPLETED"
        # A refused request is counted with its status, under its route's template.
        assert client.get("/api/v1/tasks/nope_cv4", headers=auth(key)).status_code == 404
    for _ in range(READYZ):  # a new connection each: the two HTTP processes share them out
        assert httpx.get(stack.api.base_url + "/readyz").status_code == 200

    # Completions are the worker's; submits and polls the API's.
    stack.wait_for("sum(cogview_tasks_completed_total)", TASKS)
    stack.wait_for('sum(cogview_tasks_submitted_total{surface="native",quality="hd"})', TASKS)
    stack.wait_for("sum(cogview_http_requests_total{" + POLL_ROUTE + ',status="404"})', 1)
    stack.wait_for("cogview_workers_live", 1)
    # Every scrape of the API sums both processes' files: the count reaches them all and never
    # drops back (as it would if a scrape saw only the process that answered it).
    stack.wait_for('sum(cogview_http_requests_total{route="/readyz"})', READYZ)
    assert stack.scalar('sum(resets(cogview_http_requests_total{route="/readyz"}[5m]))') == 0
    assert stack.scalar("sum(cogview_batch_images_count)") == TASKS
    assert stack.scalar('sum(cogview_stage_duration_seconds_count{stage="store"})') == TASKS

    p99 = stack.scalar(
        "histogram_quantile(0.99, sum by (le) "
        "(cogview_http_request_duration_seconds_bucket{" + POLL_ROUTE + "}))"
    )
    assert p99 is not None and math.isfinite(p99) and 0 < p99 <= 300
    # No series of any family carries a task id or a key.
    labels = " ".join(str(s["metric"]) for s in stack.query('{__name__=~"cogview_.*"}'))
    assert not any(task_id in labels for task_id in ids)
    assert key not in labels


def scraped(text: str, name: str, **labels: str) -> float:
    """The sum of a family's samples in a scrape whose labels include `labels`."""
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    )


def test_http_processes_share_one_set_of_metrics(tmp_path: Path) -> None:
    """`serve --http-processes 2`: whichever process answers a scrape reports every process's
    requests, and the tasks that the workers (in the first process) completed."""
    env = server_env(tmp_path / "cache", {"COGVIEW_MODEL": "test-echo"})
    api = ServerProcess(workdir=tmp_path, env=env, args=("--http-processes", "2"))
    api.start()
    try:
        db = Database(f"sqlite:///{tmp_path}/cogview-data/cogview.db")
        _, key = key_service.create_key(db, name="mp", credits=100)
        db.dispose()
        with httpx.Client(base_url=api.base_url, timeout=30) as client:
            ids = [submit_task(client, key) for _ in range(2)]
            for task_id in ids:
                assert poll_until_done(client, task_id, key)["status"] == "COMPLETED"
        healthz = 40
        for _ in range(healthz):  # a new connection each: the processes share them out
            assert httpx.get(api.base_url + "/healthz").status_code == 200
        for _ in range(4):
            text = httpx.get(api.base_url + "/metrics").text
            name = "cogview_http_requests_total"
            assert scraped(text, name, route="/healthz", status="200") >= healthz
            assert scraped(text, "cogview_tasks_completed_total") == len(ids)
            assert scraped(text, "cogview_tasks_submitted_total", surface="native") == len(ids)
    finally:
        api.stop()
