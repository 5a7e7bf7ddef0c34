"""SIGTERM (and SIGINT, Ctrl-C) to the separate `worker` process and SIGTERM to
`serve --http-processes N`, as real
processes (issue: hardening, finding 5): stop claiming, finish the batch in hand within the
grace period or hand it back uncounted, deregister, exit 0. The echo engine stands in for the
model (not under test), slowed per step so that the signal lands mid-batch."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_faults import _task_row, wait_for_stage
from tests.support import CLI, EXAMPLE_BODY, ServerProcess, auth, server_env

# 12 steps of 0.3 s: the signal comes at step 2, with 3 s or more to go.
MID_TASK_ENV = {
    "COGVIEW_MODEL": "test-echo",
    "COGVIEW_TEST_ECHO_STEP_SECONDS": "0.3",
    "COGVIEW_STEPS_HD": "12",
    "COGVIEW_LOG_LEVEL": "info",
}
NO_GRACE = {"COGVIEW_SHUTDOWN_GRACE_SECONDS": "0", "COGVIEW_LEASE_SECONDS": "600"}


def submit_and_wait_for_denoising(server: ServerProcess) -> str:
    key = str(server.make_key(credits=40)["key"])
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        r = client.post("/api/v1/images/generations", json=EXAMPLE_BODY, headers=auth(key))
        task_id = str(r.json()["data"]["task_id"])
        wait_for_stage(client, task_id, key, "denoising")
    return task_id


def signal_worker_mid_task(
    workdir: Path, env: dict[str, str], signum: signal.Signals
) -> tuple[str, str]:
    """An API-only `serve` and one `worker` process; `signum` to the worker mid-task. Returns
    (task id, the worker's log) once the worker exited 0. (Finishing within the grace is the
    same `stop_workers` as serve's, tested in test_faults.py.)"""
    api = ServerProcess(workdir=workdir, env=env, args=("--workers", "0"))
    api.start(wait_ready=False)
    log_path = workdir / "worker.log"
    with open(log_path, "ab") as log:
        worker = subprocess.Popen(
            [*CLI, "worker"], cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        task_id = submit_and_wait_for_denoising(api)
        worker.send_signal(signum)
        assert worker.wait(timeout=60) == 0, log_path.read_text()
    finally:
        if worker.poll() is None:
            worker.kill()
        api.stop()
    return task_id, log_path.read_text()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_a_signal_to_a_worker_past_its_grace_hands_the_batch_back_uncounted(
    tmp_path: Path, tiny_cache: Path, signum: signal.Signals
) -> None:
    env = server_env(tiny_cache, {**MID_TASK_ENV, **NO_GRACE})
    task_id, log = signal_worker_mid_task(tmp_path, env, signum)
    assert _task_row(tmp_path, task_id) == ("queued", 0, None)
    assert "1 task(s) back in the queue" in log


def test_sigterm_to_serve_with_http_processes_hands_the_batch_back_and_exits_0(
    tmp_path: Path, tiny_cache: Path
) -> None:
    env = server_env(tiny_cache, {**MID_TASK_ENV, **NO_GRACE})
    server = ServerProcess(workdir=tmp_path, env=env, args=("--http-processes", "2")).start()
    task_id = submit_and_wait_for_denoising(server)
    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=60) == 0, server.read_log()
    assert _task_row(tmp_path, task_id) == ("queued", 0, None)
    assert "1 task(s) back in the queue" in server.read_log()
