"""Cancelling a task while a worker runs it: the engine stops at its next step, nothing is
stored, the credits come back, and the worker goes on. With the real (tiny) CogView4 engine."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image

from cogview_api.config import Settings
from cogview_api.domain import ApiKey, GenerationRequest, Size, Task, TaskState
from cogview_api.engine import Engine, EngineJob, ProgressFn
from cogview_api.services import generation
from cogview_api.services import keys as key_service
from cogview_api.storage import LocalStorage
from cogview_api.store import keys as key_store
from cogview_api.store import tasks as task_store
from cogview_api.store.db import Database
from cogview_api.worker.loop import Worker
from tests.conftest import make_settings
from tests.support import FlakyEngine

if TYPE_CHECKING:  # torch and diffusers load with the engine, not at collection
    from cogview_api.engine.cogview4 import CogView4Engine

STEPS = 6
SMALL = Size(512, 512)


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path) -> CogView4Engine:
    from cogview_api.engine.cogview4 import CogView4Engine

    return CogView4Engine.load(make_settings(tmp_path_factory.mktemp("engine"), tiny_cache))


class SteppedEngine:
    """Wraps an engine and watches it work: records each progress report with the worker's
    answer, and runs `after[(task_id, step)]` once that step is reported, as a client acting
    while the engine goes on."""

    def __init__(self, inner: Engine) -> None:
        self.inner = inner
        self.name, self.device = inner.name, inner.device
        self.reports: list[tuple[str, int, bool]] = []
        self.images: dict[str, int] = {}
        self.after: dict[tuple[str, int], Callable[[], object]] = {}
        self.batches: list[list[str]] = []

    def generate(self, jobs: Sequence[EngineJob], progress: ProgressFn) -> list[list[Image.Image]]:
        def watched(task_id: str, stage: str, step: int) -> bool:
            go_on = bool(progress(task_id, stage, step))
            self.reports.append((task_id, step, go_on))
            if hook := self.after.pop((task_id, step), None):
                hook()
            return go_on

        self.batches.append([job.task_id for job in jobs])
        out: list[list[Image.Image]] = self.inner.generate(jobs, watched)
        self.images.update({job.task_id: len(imgs) for job, imgs in zip(jobs, out, strict=True)})
        return out

    def reports_of(self, task_id: str) -> list[tuple[int, bool]]:
        return [(step, go_on) for t, step, go_on in self.reports if t == task_id]


class Setup:
    def __init__(self, db: Database, settings: Settings, engine: Engine, storage: Path) -> None:
        self.db, self.settings = db, settings
        self.key, _ = key_service.create_key(db, name="k", credits=40)
        self.engine = SteppedEngine(engine)
        self.storage = LocalStorage(storage)
        self.worker = Worker(settings=settings, db=db, storage=self.storage, engine=self.engine)

    def submit(self, prompt: str, n: int = 1) -> Task:
        request = GenerationRequest(model="cogview-4", prompt=prompt, size=SMALL, quality="hd", n=n)
        return generation.submit(self.db, self.settings, key=self.key, request=request)

    def cancel_later(self, task: Task) -> Callable[[], Task]:
        return lambda: generation.cancel(self.db, key=self.key, task_id=task.id)

    def task(self, task_id: str) -> Task:
        with self.db.read() as conn:
            return task_store.get_task(conn, task_id)

    def balance(self) -> int:
        with self.db.read() as conn:
            key: ApiKey = key_store.get_key(conn, self.key.id)
            assert key_store.ledger_sum(conn, key.id) == key.balance
            return int(key.balance)

    def files(self) -> list[Path]:
        return sorted(p for p in self.storage.root.rglob("*") if p.is_file())


@pytest.fixture
def real(db: Database, settings: Settings, tiny_engine: CogView4Engine, tmp_path: Path) -> Setup:
    return Setup(db, settings.model_copy(update={"steps_hd": STEPS}), tiny_engine, tmp_path / "i")


@pytest.fixture
def stand_in(db: Database, settings: Settings, tmp_path: Path) -> Iterator[Setup]:
    yield Setup(db, settings.model_copy(update={"steps_hd": STEPS}), FlakyEngine(), tmp_path / "i")


def assert_cancelled_and_refunded(setup: Setup, task: Task) -> None:
    done = setup.task(task.id)
    assert done.state is TaskState.CANCELLED and done.error_type == "cancelled"
    assert done.images == () and done.credits_refunded == done.credits_charged > 0


def test_cancelled_mid_denoising_stops_at_the_next_step_and_the_worker_goes_on(
    real: Setup,
) -> None:
    doomed, after = real.submit("a lighthouse"), real.submit("a harbour")
    real.engine.after[(doomed.id, 2)] = real.cancel_later(doomed)
    assert real.balance() == 32
    assert real.worker.run_once()
    # Step 3 was under way when the cancel came: its report finds the task gone, and the
    # engine stops there, with no more steps and no decoding.
    assert real.engine.reports_of(doomed.id) == [(1, True), (2, True), (3, False)]
    assert real.engine.images[doomed.id] == 0
    assert_cancelled_and_refunded(real, doomed)
    assert real.task(doomed.id).step == 2  # nothing written after the cancel
    assert real.files() == [] and real.balance() == 36

    assert real.worker.run_once()
    assert real.engine.reports_of(after.id) == [(s, True) for s in range(1, STEPS + 1)]
    done = real.task(after.id)
    assert done.state is TaskState.COMPLETED and len(done.images) == 1
    assert [p.name for p in real.files()] == [done.images[0].storage_key.rsplit("/", 1)[1]]
    assert real.balance() == 36


def test_only_the_cancelled_task_of_a_batch_of_4_stops(real: Setup) -> None:
    """One forward for four tasks with prompts of different lengths; cancelling one at its
    second step drops it from the batch, and the other three get the very images they get
    alone."""
    real.worker.settings = real.settings.model_copy(update={"max_batch_size": 4})
    prompts = ["a lighthouse", "a harbour at dusk, seen from the hills above the town", "a", "x y"]
    doomed, *kept = [real.submit(p) for p in prompts]
    real.engine.after[(doomed.id, 2)] = real.cancel_later(doomed)
    assert real.worker.run_once()
    assert real.engine.batches == [[t.id for t in (doomed, *kept)]]  # one batch of four
    assert real.engine.reports_of(doomed.id) == [(1, True), (2, True), (3, False)]
    assert real.engine.images == {doomed.id: 0, **{t.id: 1 for t in kept}}
    assert_cancelled_and_refunded(real, doomed)
    assert real.balance() == 40 - 3 * 4
    for task in kept:
        done = real.task(task.id)
        assert done.state is TaskState.COMPLETED
        with Image.open(real.storage.root / done.images[0].storage_key) as stored:
            batched = np.asarray(stored.convert("RGB"), dtype=np.int16)
        (alone,) = real.engine.inner.generate([EngineJob.from_task(done)], lambda *_: True)[0:1]
        diff = np.abs(batched - np.asarray(alone[0].convert("RGB"), dtype=np.int16))
        assert diff.max() <= 1, (task.id, int(diff.max()))  # PNG of the same pixels, +-1 rounding


def test_cancelled_while_decoding_writes_nothing(stand_in: Setup) -> None:
    task = stand_in.submit("a lighthouse")
    stand_in.engine.after[(task.id, STEPS)] = stand_in.cancel_later(task)  # the last report
    written: list[str] = []
    stand_in.storage.put = lambda key, data, content_type: written.append(key)
    assert stand_in.worker.run_once()
    assert stand_in.engine.images[task.id] == 1  # decoded: the cancel came after its last step
    assert_cancelled_and_refunded(stand_in, task)
    assert written == [] and stand_in.balance() == 40


def test_cancelled_while_saving_deletes_the_files_it_wrote(stand_in: Setup) -> None:
    task = stand_in.submit("a lighthouse", n=2)
    put = stand_in.storage.put
    cancel = stand_in.cancel_later(task)

    def put_then_cancel(key: str, data: bytes, content_type: str) -> None:
        put(key, data, content_type)
        if stand_in.task(task.id).state is TaskState.RUNNING:
            cancel()

    stand_in.storage.put = put_then_cancel
    assert stand_in.worker.run_once()
    assert_cancelled_and_refunded(stand_in, task)
    assert stand_in.files() == [] and stand_in.balance() == 40
