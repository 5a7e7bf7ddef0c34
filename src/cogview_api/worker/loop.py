"""The worker: claims tasks from the store, runs the engine, stores images, settles the task.

One worker drives one engine (one GPU). It can run as a thread inside `cogview-api serve` or
as its own process (`cogview-api worker`); either way all coordination goes through the
database, so any number of workers and API processes can share one queue.

The GPU should never wait on anything but the queue:
- a finished batch is stored and recorded by the settle stage (worker/settle.py) on its own
  thread while the next batch is claimed and denoised, one batch settling at a time;
- progress is one write per step for the whole batch (worker/progress.py);
- housekeeping (heartbeat, lapsed leases, dead workers' rows, retention, orphaned files) runs
  on its own timer (worker/housekeeping.py), not between batches;
- an idle worker looks at the queue with a read (the waiting-tasks counter) and claims, a
  write, only when something waits.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING

from cogview_api.config import Settings
from cogview_api.domain import BatchKey, ImageRecord, Stage, Task
from cogview_api.engine import Engine, EngineJob
from cogview_api.errors import CogviewError, EngineError
from cogview_api.log_context import task_context
from cogview_api.storage import ImageStorage
from cogview_api.store import queue
from cogview_api.store import tasks as task_store
from cogview_api.store.db import Database
from cogview_api.worker.housekeeping import HousekeepingTimer, housekeep
from cogview_api.worker.metering import BatchMeter
from cogview_api.worker.previews import PreviewWriter
from cogview_api.worker.progress import BatchProgress
from cogview_api.worker.settle import SettleStage, result_count_error

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)


def new_worker_id() -> str:
    return f"{socket.gethostname()[:40]}-{secrets.token_hex(4)}"


# The longest wait between two tries to register at the start (doubling from poll_interval).
REGISTER_BACKOFF_MAX_S = 30.0


class Worker:
    def __init__(
        self,
        *,
        settings: Settings,
        db: Database,
        storage: ImageStorage,
        engine: Engine,
        worker_id: str | None = None,
        on_changed: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.storage = storage
        self.engine = engine
        self.id = worker_id or new_worker_id()
        # Called with a task's id after each write that moves it (progress, settle), so the
        # API of the same process tells its streams at once.
        self.on_changed = on_changed
        self.stop = threading.Event()
        # Set when there may be new work, so an idle worker starts at once instead of at its
        # next poll: by an API in the same process on submit, and on PostgreSQL by the
        # process's LISTEN connection (store/notify.py). The poll stays as the fallback.
        self.wake = threading.Event()
        self._last_cleanup = 0.0  # time.monotonic() of this process's last retention pass
        # API key -> tasks of it in this worker's previous batch: the claim's fairness load.
        self._recent: dict[str, int] = {}
        # Images stored for a task whose settling write failed; see housekeeping.py.
        self._unrecorded: list[ImageRecord] = []
        self._unrecorded_lock = threading.Lock()
        self._steps: BatchProgress | None = None  # the batch in the engine's
        self._meter: BatchMeter | None = None  # the batch in the engine's, for the metrics
        self.settler = SettleStage(self)
        # Registered and its last housekeeping write went through: what /readyz counts.
        self.healthy = False

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> None:
        """Claim and run batches until `stop` is set, each batch settling while the next one
        runs. Never raises for one bad task (it fails that task), nor for a database that is
        unavailable or cannot be written (it tries again, backing off at the start); other
        errors are bugs, raised after deregistering, for `WorkerThread` to restart the loop
        with a backoff. On stop, the batch settling is finished before the worker goes."""
        if not self._register():
            return
        timer = HousekeepingTimer(self)
        try:
            timer.start()  # its first pass at once, beside the first claim
            while not self.stop.is_set():
                # Cleared before the claim looks at the queue, so a wake-up that arrives while
                # it runs is not lost: the wait below then returns at once.
                self.wake.clear()
                try:
                    worked = self.poll()
                except CogviewError as exc:  # database briefly unavailable, and the like
                    log.warning("worker %s: %s", self.id, exc.message)
                    self.healthy = False
                    worked = False
                # Anything else is a bug: it ends this run (deregistered below), and the
                # thread's supervisor (worker/supervisor.py) logs it and starts the loop
                # again after a backoff; leases protect the tasks.
                if not worked:
                    self.settler.drain()  # idle: nothing to overlap with
                    self.wake.wait(self.settings.poll_interval)
        finally:
            self.healthy = False
            timer.stop()
            self.healthy = False  # again: a pass that was under way may have set it
            self.settler.drain()  # SIGTERM: the batch settling is stored and recorded
            try:
                with self.db.write() as conn:
                    queue.unregister_worker(conn, worker_id=self.id)
            except CogviewError:
                pass

    def _register(self) -> bool:
        """Announce this worker (for /readyz), retrying while the database refuses: a thread
        that died here would leave the process serving with no worker. False if stopped first."""
        delay = self.settings.poll_interval
        while not self.stop.is_set():
            try:
                with self.db.write() as conn:
                    queue.register_worker(
                        conn, worker_id=self.id, model=self.engine.name, device=self.engine.device
                    )
            except CogviewError as exc:
                log.warning("worker %s: cannot start yet: %s", self.id, exc.message)
            except Exception:  # a bug; keep trying rather than die unseen
                log.exception("worker %s: unexpected error at its start", self.id)
            else:
                log.info("worker %s ready on %s", self.id, self.engine.device)
                # Healthy from the housekeeping's first pass (its heartbeat), which starts next.
                return True
            log.info("worker %s: trying again in %g s", self.id, delay)
            self.stop.wait(delay)
            delay = min(delay * 2, REGISTER_BACKOFF_MAX_S)
        return False

    def shutdown(self) -> None:
        """Stop claiming; the batch in hand runs on and settles (see `hand_back`)."""
        self.stop.set()
        self.wake.set()

    def hand_back(self) -> int:
        """The batches in hand (running and settling) back to the queue, uncounted, and this
        worker's row gone: for a shutdown whose grace ran out. Returns how many tasks went back."""
        with self.db.write() as conn:
            released = queue.release_worker_tasks(conn, worker_id=self.id)
            queue.unregister_worker(conn, worker_id=self.id)
        return released

    def housekeep(self) -> None:
        """One housekeeping pass (worker/housekeeping.py); the timer runs it in `run`."""
        housekeep(self)

    def run_once(self) -> bool:
        """One whole pass, in this thread: housekeeping, then at most one batch, stored and
        recorded before it returns. True if a batch ran."""
        self.housekeep()
        worked = self._claim_and_run()
        self.settler.drain()
        return worked

    def poll(self) -> bool:
        """The loop's pass: if any task waits, claim a batch and run it, its settling left to
        the settle stage. Whether anything waits is a read of the waiting-tasks counter, so an
        idle worker's poll never takes the write lock (SQLite) nor a row lock (PostgreSQL).
        True if a batch ran."""
        with self.db.read() as conn:
            if task_store.waiting_tasks(conn) == 0:
                return False
        return self._claim_and_run()

    def _claim_and_run(self) -> bool:
        """Claim a batch and run it through the engine, its settling handed to the settle
        stage. True if a batch ran."""
        with self.db.write() as conn:
            batch = queue.claim_tasks(
                conn,
                worker_id=self.id,
                limit=self.settings.max_batch_size,
                lease_seconds=self.settings.lease_seconds,
                recent=self._recent,
            )
        self.healthy = True
        if not batch:
            self._recent = {}  # an idle spell: nobody is owed a turn
            return False
        batch += self._top_up(batch)
        self._recent = dict(Counter(t.key_id for t in batch))
        self._run_batch(batch)
        return True

    def _top_up(self, batch: Sequence[Task]) -> list[Task]:
        """Dynamic batching: a claim short of max_batch_size waits up to `batch_timeout` for
        more tasks of the same batch key and claims them too. Each look is its own short
        transaction; no transaction stays open while waiting. The first tasks' leases
        (at least seconds long) outlast the wait."""
        room = self.settings.max_batch_size - len(batch)
        if room <= 0 or self.settings.batch_timeout <= 0:
            return []
        key = BatchKey.of(batch[0])
        deadline = time.monotonic() + self.settings.batch_timeout
        more: list[Task] = []
        while room > 0 and not self.stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            # Woken by a submit (in process, or NOTIFY), else one look per poll interval
            # and a last one at the deadline.
            self.wake.wait(min(left, self.settings.poll_interval))
            self.wake.clear()
            try:
                with self.db.write() as conn:
                    got = queue.claim_tasks(
                        conn,
                        worker_id=self.id,
                        limit=room,
                        lease_seconds=self.settings.lease_seconds,
                        batch_key=key,
                    )
            except CogviewError as exc:  # run what we have; these tasks are ours already
                log.warning("worker %s: topping up the batch: %s", self.id, exc.message)
                break
            more += got
            room -= len(got)
        return more

    # -- one batch ------------------------------------------------------------------------

    def run_batch(self, batch: Sequence[Task]) -> None:
        """Run a claimed batch and settle it, before returning."""
        self._run_batch(batch)
        self.settler.drain()

    def _run_batch(self, batch: Sequence[Task]) -> None:
        """Run a claimed batch through the engine and hand its results to the settle stage
        (which waits for the batch before it first). Its leases are renewed until it settles."""
        ids = [t.id for t in batch]
        meter = self._meter = BatchMeter(batch)
        self._steps = BatchProgress(
            db=self.db, worker_id=self.id, task_ids=ids, on_changed=self._changed
        )
        renewer = _LeaseRenewer(self, ids)
        renewer.start()
        started = time.monotonic()
        try:
            jobs = [EngineJob.from_task(t) for t in batch]
            try:
                results = self._generate(jobs, batch)
                self._steps.flush()
                wrong = result_count_error(batch, results)
            except EngineError as exc:
                wrong = exc.message
                log.warning("engine failed on batch %s: %s", ids, exc.message)
            except Exception:  # a bug in the engine must not take the worker down
                log.exception("unexpected engine failure on batch %s", ids)
                wrong = "The engine failed on this task."
            if wrong is not None:
                self._fail_batch(batch, wrong, meter, started)
                renewer.stop()
                return
        except BaseException:
            renewer.stop()
            raise
        finally:
            self._steps = self._meter = None
        self.settler.submit(batch, results, meter=meter, done=renewer.stop, started=started)

    def _fail_batch(
        self, batch: Sequence[Task], message: str, meter: BatchMeter, started: float
    ) -> None:
        for t in batch:
            with task_context(t.id, t.request_id):
                log.warning("engine failed on this task's batch: %s", message)
                self._fail(t, message, meter)
                self._log_done(t, "failed", started, len(batch))

    def _generate(self, jobs: Sequence[EngineJob], batch: Sequence[Task]) -> list[list[Image]]:
        """The engine's call, with a preview writer when a task of the batch asked for any."""
        if not any(t.previews for t in batch):
            return self.engine.generate(jobs, self._progress)
        writer = PreviewWriter(
            db=self.db,
            storage=self.storage,
            worker_id=self.id,
            batch=batch,
            retention=timedelta(days=self.settings.retention_days),
            on_changed=self._changed,
        )
        return self.engine.generate(jobs, self._progress, writer)

    def _log_done(self, task: Task, outcome: str, started: float, batch_size: int) -> None:
        """The one info line per task this worker ran: what it was, how long it waited and ran,
        how it ended (completed, failed, or stopped: cancelled or no longer this worker's).
        Never the prompt."""
        run_s = time.monotonic() - started
        wait_s = (task.started_at - task.created_at).total_seconds() if task.started_at else 0.0
        images = task.n if outcome == "completed" else 0
        log.info(
            "task %s %s: %dx%d %s, %d image(s), waited %.2f s, ran %.2f s (batch of %d)",
            task.id,
            outcome,
            task.width,
            task.height,
            task.quality,
            images,
            wait_s,
            run_s,
            batch_size,
            extra={
                "outcome": outcome,
                "size": f"{task.width}x{task.height}",
                "quality": str(task.quality),
                "images": images,
                "queue_wait_s": round(wait_s, 3),
                "run_s": round(run_s, 3),
                "batch_size": batch_size,
                "attempt": task.attempts,
            },
        )

    def _progress(self, task_id: str, stage: str, step: int) -> bool:
        """The engine's per-step callback. Records the step (one write per step for the whole
        batch, worker/progress.py); False when the task is no longer this worker's to run
        (cancelled, or its lease lapsed): the engine then stops it."""
        if self._meter is not None:
            self._meter.step(task_id)
        if self._steps is None:  # not inside a batch: nothing to record
            return True
        return self._steps.report(task_id, Stage(stage), step)

    def _fail(self, task: Task, message: str, meter: BatchMeter | None = None) -> None:
        try:
            with self.db.write() as conn:
                failed = task_store.fail_task(
                    conn,
                    task_id=task.id,
                    worker_id=self.id,
                    error_code=500,
                    error_type="server_error",
                    message=message,
                )
        except CogviewError:
            log.exception("could not mark task %s failed; its lease will run out", task.id)
        else:
            if failed and meter is not None:
                meter.failed(task)
        self._changed(task.id)

    def _changed(self, task_id: str) -> None:
        if self.on_changed is not None:
            self.on_changed(task_id)

    def unrecorded(self, records: Sequence[ImageRecord]) -> None:
        """Images stored for a task whose settling write failed: housekeeping deletes those
        whose task was not completed with them, once the database answers."""
        with self._unrecorded_lock:
            self._unrecorded.extend(records)

    def take_unrecorded(self) -> list[ImageRecord]:
        with self._unrecorded_lock:
            taken, self._unrecorded = self._unrecorded, []
        return taken


class _LeaseRenewer:
    """Renews a batch's leases every third of the lease, from its claim until it settles."""

    def __init__(self, worker: Worker, task_ids: list[str]) -> None:
        self.worker = worker
        self.task_ids = task_ids
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="lease-renewer")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        interval = self.worker.settings.lease_seconds / 3
        while not self._stop.wait(interval):
            try:
                with self.worker.db.write() as conn:
                    queue.renew_leases(
                        conn,
                        worker_id=self.worker.id,
                        task_ids=self.task_ids,
                        lease_seconds=self.worker.settings.lease_seconds,
                    )
            except CogviewError as exc:
                log.warning("lease renewal failed: %s", exc.message)
