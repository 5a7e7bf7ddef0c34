"""One watcher per API process for the tasks that its open event streams and `Prefer: wait`
requests follow, so an idle follower costs no database reads of its own.

It learns that something changed from
- `TaskSignals`, rung by writers in this process (the workers of `serve`, the cancel route);
- on PostgreSQL, a LISTEN connection on `cogview_task_changes`, which every write that moves a
  task (claim, progress, settle, cancel, lease lapse) or revokes a key NOTIFYs on commit;
- its own tick: every `watch_poll_seconds` (SQLite, or PostgreSQL with `listen` off: writers in
  other processes cannot signal), or every `watch_fallback_seconds` on PostgreSQL with LISTEN
  (a notification lost while the listener reconnected).

Each wake-up, while anything is followed, runs one statement for all followed tasks
(`store.tasks.watch_look`): per task a version and whether its key was revoked, and where the
queue stands. Only a task whose version changed, whose place in the queue may have moved, or
that is newly followed is then read in full: once, however many follow it. Revocation reaches
the followers through the same look (the key's `revoked_at`), so a revoked key's streams and
waits end within one tick (or at once on PostgreSQL).

Batches are followed the same way (`follow_batch`, for the batch event streams): each look
also reads, for all followed batches at once, their status and their tasks counted by state
(store.batches.batch_versions), and reads a batch in full only when that changed.

All state lives on the event loop; `poke` is the only method for other threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from cogview_api.domain import Batch, Task, TaskState
from cogview_api.errors import CogviewError, NotFound
from cogview_api.services.signals import TaskSignals
from cogview_api.store import batches as batch_store
from cogview_api.store import tasks as task_store
from cogview_api.store.db import Database
from cogview_api.store.notify import CHANGES_CHANNEL, Listener

log = logging.getLogger(__name__)

_BACKOFF_S = 0.5  # after a look that failed unexpectedly, before the next one


class Follower:
    """One stream's or wait's view of its task: `changed` is set when `task`, `revoked` or
    `gone` is new (or the server is closing); the follower clears it."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.revoked = False  # the task's key was revoked: end without another frame
        self.gone = False  # the task no longer exists
        self.changed = asyncio.Event()


class BatchFollower:
    """One batch stream's view of its batch, as `Follower` is of a task."""

    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self.revoked = False
        self.gone = False
        self.changed = asyncio.Event()


_F = TypeVar("_F", Follower, BatchFollower)


@dataclass(frozen=True)
class _Seen:
    look: task_store.WatchLook
    full: dict[str, Task]
    batches: dict[str, batch_store.BatchVersion]
    full_batches: dict[str, Batch]


class TaskWatcher:
    def __init__(
        self,
        db: Database,
        *,
        signals: TaskSignals,
        interval: float,
        listen: bool,
        batch_size: int = 1,
    ) -> None:
        self.db = db
        self.batch_size = batch_size  # positions as GET and the first frame count them
        self.signals = signals
        self.interval = interval
        self._listen = listen
        self._followers: dict[str, set[Follower]] = {}
        self._versions: dict[str, tuple[Any, ...]] = {}
        self._fresh: set[str] = set()  # followed since the last look: read in full
        self._batch_followers: dict[str, set[BatchFollower]] = {}
        self._batch_versions: dict[str, tuple[Any, ...]] = {}
        self._batch_fresh: set[str] = set()
        self._queue: task_store.QueueMark | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._runner: asyncio.Task[None] | None = None
        self._listener: Listener | None = None
        signals.on_change(self.poke)

    @property
    def closing(self) -> bool:
        return self.signals.closing

    def poke(self) -> None:
        """Look now (soon). Safe from any thread."""
        loop, wake = self._loop, self._wake
        if loop is None or wake is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(wake.set)

    def subscribers(self, task_id: str) -> int:
        """How many follow the task now."""
        return len(self._followers.get(task_id, ()))

    @contextlib.contextmanager
    def follow(self, task: Task) -> Iterator[Follower]:
        """Follow `task` (as its key may see it now) until the block ends. Call on the loop."""
        with self._follow(
            task.id, Follower(task), self._followers, self._versions, self._fresh
        ) as follower:
            yield follower

    @contextlib.contextmanager
    def follow_batch(self, batch: Batch) -> Iterator[BatchFollower]:
        """Follow `batch` (as its key may see it now) until the block ends. Call on the loop."""
        with self._follow(
            batch.id,
            BatchFollower(batch),
            self._batch_followers,
            self._batch_versions,
            self._batch_fresh,
        ) as follower:
            yield follower

    @contextlib.contextmanager
    def _follow(
        self,
        key: str,
        follower: _F,
        registry: dict[str, set[_F]],
        versions: dict[str, tuple[Any, ...]],
        fresh: set[str],
    ) -> Iterator[_F]:
        """`follower` in `registry` under `key` until the block ends; the first follower of a key
        has it read in full at the next look (it may have changed since the caller read it)."""
        wake = self._start()
        followers = registry.setdefault(key, set())
        if not followers:
            fresh.add(key)
            wake.set()
        followers.add(follower)
        try:
            yield follower
        finally:
            followers.discard(follower)
            if not followers and registry.get(key) is followers:
                del registry[key]
                versions.pop(key, None)
                fresh.discard(key)

    @property
    def _following(self) -> bool:
        return bool(self._followers or self._batch_followers)

    async def aclose(self) -> None:
        """End the followers and the watcher (the app's shutdown)."""
        self.signals.close()
        if self._runner is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        if self._listener is not None:
            await asyncio.to_thread(self._listener.stop)

    # -- on the loop ------------------------------------------------------------------------

    def _start(self) -> asyncio.Event:
        if self._wake is None or self._runner is None or self._runner.done():
            self._loop = asyncio.get_running_loop()
            self._wake = asyncio.Event()
            self._runner = self._loop.create_task(self._run(), name="task-watcher")
            if self._listen and self.db.dialect == "postgresql" and self._listener is None:
                self._listener = Listener(self.db.url, self.poke, channel=CHANGES_CHANNEL).start()
        return self._wake

    async def _run(self) -> None:
        wake = self._wake
        assert wake is not None
        while not self.closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), self.interval if self._following else None)
            wake.clear()
            if self.closing or not self._following:
                continue
            ids = list(self._followers)
            fresh = self._fresh & set(ids)
            bids = list(self._batch_followers)
            bfresh = self._batch_fresh & set(bids)
            try:
                seen = await asyncio.to_thread(
                    self._look,
                    ids,
                    fresh,
                    dict(self._versions),
                    self._queue,
                    (bids, bfresh, dict(self._batch_versions)),
                )
            except CogviewError as exc:  # the database is away: try again at the next tick
                log.warning("task watcher: %s", exc.message)
                continue
            except Exception:  # a raw driver error, a bug: never end every stream's watcher
                log.exception("task watcher: the look failed; trying again")
                await asyncio.sleep(_BACKOFF_S)
                continue
            self._publish(ids, fresh, seen)
            self._publish_batches(bids, bfresh, seen)
        for followers in self._followers.values():
            for f in followers:
                f.changed.set()
        for batch_followers in self._batch_followers.values():
            for b in batch_followers:
                b.changed.set()

    def _look(
        self,
        ids: Sequence[str],
        fresh: set[str],
        known: dict[str, tuple[Any, ...]],
        queue: task_store.QueueMark | None,
        batches: tuple[list[str], set[str], dict[str, tuple[Any, ...]]] = ([], set(), {}),
    ) -> _Seen:
        """One statement for all; a full read of each task that changed (in a thread)."""
        with self.db.read() as conn:
            seen_batches, full_batches = self._look_batches(conn, *batches)
            if not ids:
                look = task_store.WatchLook(
                    versions={}, revoked=frozenset(), queue=queue, queue_moved=False
                )
                return _Seen(look=look, full={}, batches=seen_batches, full_batches=full_batches)
            look = task_store.watch_look(conn, ids, queue)
            changed = [
                i
                for i, version in look.versions.items()
                if i in fresh
                or version != known.get(i)
                or (look.queue_moved and version[0] == TaskState.QUEUED)
            ]
            full: dict[str, Task] = {}
            for i in changed:
                if i not in look.revoked:
                    with contextlib.suppress(NotFound):  # deleted since: gone at the next look
                        full[i] = task_store.get_task(conn, i, batch_size=self.batch_size)
        return _Seen(look=look, full=full, batches=seen_batches, full_batches=full_batches)

    def _look_batches(
        self, conn: Any, ids: list[str], fresh: set[str], known: dict[str, tuple[Any, ...]]
    ) -> tuple[dict[str, batch_store.BatchVersion], dict[str, Batch]]:
        if not ids:
            return {}, {}
        seen = batch_store.batch_versions(conn, ids)
        full: dict[str, Batch] = {}
        for i, v in seen.items():
            if not v.revoked and (i in fresh or v.version != known.get(i)):
                with contextlib.suppress(NotFound):
                    full[i] = batch_store.get_batch(conn, i)
        return seen, full

    def _publish_batches(self, ids: Sequence[str], fresh: set[str], seen: _Seen) -> None:
        self._batch_fresh -= fresh
        for batch_id in ids:
            followers = self._batch_followers.get(batch_id)
            if not followers:
                continue
            found = seen.batches.get(batch_id)
            if found is not None:
                self._batch_versions[batch_id] = found.version
            batch = seen.full_batches.get(batch_id)
            gone, revoked = found is None, found is not None and found.revoked
            if batch is None and not gone and not revoked:
                continue
            for f in followers:
                f.gone, f.revoked = gone, revoked
                if batch is not None:
                    f.batch = batch
                f.changed.set()

    def _publish(self, ids: Sequence[str], fresh: set[str], seen: _Seen) -> None:
        look = seen.look
        self._fresh -= fresh
        self._queue = look.queue
        for task_id in ids:
            followers = self._followers.get(task_id)
            if not followers:
                continue
            version = look.versions.get(task_id)
            if version is not None:
                self._versions[task_id] = version
            task = seen.full.get(task_id)
            gone, revoked = version is None, task_id in look.revoked
            if task is None and not gone and not revoked:
                continue
            for f in followers:
                f.gone, f.revoked = gone, revoked
                if task is not None:
                    f.task = task
                f.changed.set()
