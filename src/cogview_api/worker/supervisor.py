"""A worker on its own thread, restarted with backoff when its loop crashes, and the graceful
stop shared by `serve` and `worker`: stop claiming, let the batch in hand finish within a
grace period, else hand it back to the queue uncounted, deregister."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from cogview_api.errors import CogviewError
from cogview_api.worker.loop import Worker

log = logging.getLogger(__name__)

# The first wait before a crashed worker loop runs again, doubling to the second.
RESTART_BACKOFF_S = (1.0, 30.0)
# After a hand-back, how long to wait for the worker to notice at its next denoising step.
HAND_BACK_JOIN_S = 10.0
# How long an idle worker is given to go before a stop says it waits for a batch in hand.
IDLE_STOP_S = 0.5


class WorkerThread:
    """Runs `worker.run` on a daemon thread. The loop already survives a bad task or a database
    outage; anything that still escapes it (a bug) is logged and the loop starts again after a
    backoff (1 s, doubling to 30 s; back to 1 s after a run that lasted longer than that), so a
    process never serves on with a dead worker. Its tasks in hand come back by their leases."""

    def __init__(self, worker: Worker, *, backoff: tuple[float, float] = RESTART_BACKOFF_S) -> None:
        self.worker = worker
        self.backoff = backoff
        self.restarts = 0
        self._thread = threading.Thread(target=self._run, name=f"worker-{worker.id}", daemon=True)

    def start(self) -> WorkerThread:
        self._thread.start()
        return self

    @property
    def live(self) -> bool:
        """Running, registered, and its last housekeeping write went through (for /readyz)."""
        return self._thread.is_alive() and self.worker.healthy

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        first, most = self.backoff
        delay = first
        while True:
            started = time.monotonic()
            try:
                self.worker.run()
                return  # told to stop
            except Exception:
                if self.worker.stop.is_set():
                    log.exception("worker %s: crashed while stopping", self.worker.id)
                    return
                if time.monotonic() - started > most:
                    delay = first
                self.restarts += 1
                log.exception(
                    "worker %s crashed; restarting it in %g s (restart %d)",
                    self.worker.id,
                    delay,
                    self.restarts,
                )
            if self.worker.stop.wait(delay):
                return
            delay = min(delay * 2, most)


def stop_workers(threads: Sequence[WorkerThread], grace: float) -> None:
    """Stop claiming; let the batches in hand finish for up to `grace` seconds; hand back those
    that did not (to the queue, no attempt counted) so another worker, or this one restarted,
    takes them at once rather than after their lease."""
    for t in threads:
        t.worker.shutdown()
    started = time.monotonic()
    deadline = started + grace
    # An idle worker deregisters and ends in moments: only one still running after that has a
    # batch in hand, and only then does the log say the stop waits for it.
    for t in threads:
        t.join(timeout=max(0.0, min(deadline, started + IDLE_STOP_S) - time.monotonic()))
    busy = [t for t in threads if t.is_alive()]
    if grace > 0:
        for t in busy:
            log.info("worker %s: finishing the batch in hand (up to %g s)", t.worker.id, grace)
    for t in busy:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            try:
                released = t.worker.hand_back()
            except CogviewError as exc:  # the database is gone: the leases will lapse
                log.warning(
                    "worker %s: could not hand back its batch: %s", t.worker.id, exc.message
                )
                continue
            log.warning(
                "worker %s: its batch did not finish within %g s; %d task(s) back in the queue",
                t.worker.id,
                grace,
                released,
            )
            # Its next progress write, fenced on RUNNING and its id, now matches nothing, so it
            # stops at its next step; an exit while the engine still runs would abort in torch.
            t.join(timeout=HAND_BACK_JOIN_S)
    stopped = [t.worker.id for t in threads if not t.is_alive()]
    if stopped:
        log.info("stopped and deregistered worker(s) %s", ", ".join(stopped))
