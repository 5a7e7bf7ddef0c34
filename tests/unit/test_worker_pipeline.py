"""The worker keeps the engine busy and writes little (issue 14), on SQLite and PostgreSQL: a
batch is stored while the next one denoises, a store failure there still fails its task with a
refund, a stop settles the batch in hand, progress is one write per step for a batch, an idle
poll writes nothing, the shared housekeeping is done by one process at a time, and an engine
that returns the wrong number of results fails its batch at once."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import func, select

from cogview_api.clock import utcnow
from cogview_api.config import Settings
from cogview_api.domain import ApiKey, GenerationRequest, Size, Task, TaskState
from cogview_api.engine import EngineJob, ProgressFn
from cogview_api.services import generation
from cogview_api.services import keys as key_service
from cogview_api.storage import LocalStorage
from cogview_api.store import keys as key_store
from cogview_api.store import queue
from cogview_api.store import tasks as task_store
from cogview_api.store.db import Database
from cogview_api.store.tables import tasks, workers
from cogview_api.worker.housekeeping import housekeep
from cogview_api.worker.loop import Worker
from cogview_api.worker.supervisor import WorkerThread, stop_workers

SQUARE, TALL, WIDE = Size(512, 512), Size(512, 768), Size(768, 512)
WAIT_S = 30  # a bound on waiting for another thread, never a measured time


class LockstepEngine:
    """Steps every job of a batch together, as the real engine's batched forward does, and
    records the batches it starts. `results_delta` returns that many results more (or fewer)
    than jobs: a broken engine."""

    name = "lockstep"
    device = "cpu"

    def __init__(self, results_delta: int = 0) -> None:
        self.batches: list[list[str]] = []
        self.started = [threading.Event() for _ in range(8)]
        self.results_delta = results_delta
        self.cancel_at: dict[tuple[str, int], Worker] = {}

    def generate(self, jobs: Sequence[EngineJob], progress: ProgressFn) -> list[list[Image.Image]]:
        self.batches.append([j.task_id for j in jobs])
        self.started[len(self.batches) - 1].set()
        live = {j.task_id for j in jobs}
        reports: dict[str, list[bool]] = {j.task_id: [] for j in jobs}
        for step in range(1, jobs[0].steps + 1):
            for j in jobs:
                if j.task_id in live:
                    going = progress(j.task_id, "denoising", step)
                    reports[j.task_id].append(going)
                    if not going:
                        live.discard(j.task_id)
        self.reports = reports
        out = [
            [Image.new("RGB", (j.width, j.height), "gray") for _ in j.seeds]
            if j.task_id in live
            else []
            for j in jobs
        ]
        if self.results_delta < 0:
            return out[: self.results_delta]
        return out + [[] for _ in range(self.results_delta)]


class GatedStorage(LocalStorage):
    """Local files whose `put` waits for `gate` (when set up) and may fail for some keys."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gate: threading.Event | None = None
        self.gate_was_open: list[bool] = []
        self.entered = threading.Event()
        self.fail_for: set[str] = set()

    def put(self, key: str, data: bytes, content_type: str) -> None:
        self.entered.set()
        if self.gate is not None:
            self.gate_was_open.append(self.gate.wait(WAIT_S))
        if any(task_id in key for task_id in self.fail_for):
            raise OSError("disk full")
        super().put(key, data, content_type)


class Setup:
    def __init__(self, db: Database, settings: Settings, tmp_path: Path, **engine: int) -> None:
        self.db = db
        self.settings = settings.model_copy(
            # A long lease: no renewal write lands in the counts, however slow the machine.
            update={"steps_hd": 5, "max_batch_size": 4, "submit_rate": 0.0, "lease_seconds": 600}
        )
        self.key: ApiKey = key_service.create_key(db, name="k", credits=1000)[0]
        self.engine = LockstepEngine(**engine)
        self.storage = GatedStorage(tmp_path / "images")
        self.worker = Worker(
            settings=self.settings, db=db, storage=self.storage, engine=self.engine
        )

    def submit(self, size: Size = SQUARE, n: int = 1) -> Task:
        request = GenerationRequest(model="cogview-4", prompt="a cat", size=size, quality="hd", n=n)
        return generation.submit(self.db, self.settings, key=self.key, request=request)

    def task(self, task_id: str) -> Task:
        with self.db.read() as conn:
            return task_store.get_task(conn, task_id)

    def balance(self) -> int:
        with self.db.read() as conn:
            return int(key_store.get_key(conn, self.key.id).balance)

    def wait_settled(self, *tasks: Task) -> list[Task]:
        done = threading.Event()
        for _ in range(WAIT_S * 20):
            now = [self.task(t.id) for t in tasks]
            if all(t.state.terminal for t in now):
                return now
            done.wait(0.05)
        raise AssertionError(f"not settled: {[t.state for t in now]}")


@pytest.fixture
def setup(db: Database, settings: Settings, tmp_path: Path) -> Setup:
    return Setup(db, settings, tmp_path)


@contextmanager
def running(worker: Worker) -> Iterator[WorkerThread]:
    thread = WorkerThread(worker).start()
    try:
        yield thread
    finally:
        stop_workers([thread], grace=WAIT_S)


@contextmanager
def counted_writes(db: Database) -> Iterator[list[int]]:
    """Counts the write transactions opened on `db` (by every thread)."""
    count = [0]
    write = db.write

    @contextmanager
    def counting() -> Iterator[object]:
        count[0] += 1
        with write() as conn:
            yield conn

    db.write = counting  # type: ignore[method-assign]
    try:
        yield count
    finally:
        db.write = write  # type: ignore[method-assign]


def test_the_next_batch_denoises_while_the_last_one_is_stored(setup: Setup) -> None:
    first, second = setup.submit(SQUARE), setup.submit(TALL)  # two shapes: two batches
    setup.storage.gate = setup.engine.started[1]  # storing waits for the second batch's start
    with running(setup.worker):
        done = setup.wait_settled(first, second)
    assert setup.engine.batches == [[first.id], [second.id]]
    assert setup.storage.gate_was_open[0]  # batch 2 had started while batch 1 was storing
    assert [t.state for t in done] == [TaskState.COMPLETED, TaskState.COMPLETED]


def test_a_store_failure_while_the_next_batch_runs_fails_that_task_with_its_refund(
    setup: Setup,
) -> None:
    first, second = setup.submit(SQUARE), setup.submit(TALL)
    setup.storage.gate = setup.engine.started[1]
    setup.storage.fail_for = {first.id}
    with running(setup.worker):
        failed, completed = setup.wait_settled(first, second)
    assert setup.storage.gate_was_open[0]
    assert failed.state is TaskState.FAILED and failed.credits_refunded == failed.credits_charged
    assert failed.error_message == "The images could not be stored."
    assert completed.state is TaskState.COMPLETED
    assert setup.balance() == 1000 - completed.credits_charged
    assert list(setup.storage.root.rglob(f"*{first.id}*.png")) == []


def test_a_stop_while_a_batch_is_settling_settles_it_then_the_worker_goes(setup: Setup) -> None:
    task = setup.submit()
    setup.storage.gate = gate = threading.Event()
    thread = WorkerThread(setup.worker).start()
    assert setup.storage.entered.wait(WAIT_S)  # the settle stage is storing its image
    stopping = threading.Thread(target=stop_workers, args=([thread], WAIT_S))
    stopping.start()  # what SIGTERM does in `serve` and `worker`
    assert setup.worker.stop.wait(WAIT_S)
    assert thread.is_alive() and setup.task(task.id).state is TaskState.RUNNING
    gate.set()
    stopping.join(WAIT_S)
    assert not thread.is_alive()
    assert setup.task(task.id).state is TaskState.COMPLETED
    with setup.db.read() as conn:
        assert queue.ready_workers(conn, within_seconds=3600) == 0  # deregistered


def test_progress_is_one_write_per_step_for_a_batch_and_cancel_still_stops_one(
    setup: Setup,
) -> None:
    doomed, *kept = [setup.submit() for _ in range(4)]
    real_progress = setup.worker._progress

    def cancel_at_step_2(task_id: str, stage: str, step: int) -> bool:
        if (task_id, step) == (doomed.id, 2):
            generation.cancel(setup.db, key=setup.key, task_id=doomed.id)
        return real_progress(task_id, stage, step)

    setup.worker._progress = cancel_at_step_2  # type: ignore[method-assign]
    with counted_writes(setup.db) as writes:
        assert setup.worker.run_once()
    assert setup.engine.batches == [[doomed.id, *(t.id for t in kept)]]
    # Step 2's write (after all four reported) finds it cancelled; it stops at its next step.
    assert setup.engine.reports[doomed.id] == [True, True, False]
    assert setup.task(doomed.id).state is TaskState.CANCELLED
    assert [setup.task(t.id).state for t in kept] == [TaskState.COMPLETED] * 3
    # The housekeeping pass, the claim, 5 steps, SAVING, then one completion per task.
    assert writes[0] <= 1 + 1 + 5 + 1 + 3 + 1


def test_an_idle_worker_polls_without_writing(setup: Setup) -> None:
    with counted_writes(setup.db) as writes:
        assert not setup.worker.poll()
        assert not setup.worker.poll()
    assert writes[0] == 0
    task = setup.submit()
    with counted_writes(setup.db) as writes:
        assert setup.worker.poll()  # something waits: now it claims
    setup.worker.settler.drain()
    assert writes[0] >= 1 and setup.task(task.id).state is TaskState.COMPLETED


@pytest.mark.parametrize("delta", [-1, 1])
def test_a_wrong_result_count_fails_the_batch_at_once_with_refunds(
    db: Database, settings: Settings, tmp_path: Path, delta: int
) -> None:
    setup = Setup(db, settings, tmp_path, results_delta=delta)
    submitted = [setup.submit() for _ in range(2)]
    assert setup.worker.run_once()
    for t in submitted:
        done = setup.task(t.id)
        assert done.state is TaskState.FAILED and done.attempts == 1  # not left to its lease
        assert done.credits_refunded == done.credits_charged
        assert "results for a batch of 2 tasks" in (done.error_message or "")
    assert setup.balance() == 1000
    assert list(setup.storage.root.rglob("*.png")) == []


def test_the_shared_housekeeping_is_done_by_one_process_at_a_time(setup: Setup) -> None:
    task = setup.submit()
    with setup.db.write() as conn:
        queue.claim_batch(conn, worker_id="gone", limit=1, lease_seconds=60)
        conn.execute(
            tasks.update()
            .where(tasks.c.id == task.id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
    if setup.db.dialect == "postgresql":
        # Another process's pass holds the lock: this one beats, and leaves the rest to it.
        with setup.db.write() as other:
            assert queue.take_housekeeping_lock(other)
            assert not housekeep(setup.worker)
            assert setup.task(task.id).state is TaskState.RUNNING
    assert housekeep(setup.worker)
    assert setup.task(task.id).state is TaskState.QUEUED  # the lapsed lease, reclaimed
    with setup.db.read() as conn:
        beats = conn.execute(
            select(func.count()).where(workers.c.id == setup.worker.id)
        ).scalar_one()
    assert beats == 1  # its own row, registered by its heartbeat
