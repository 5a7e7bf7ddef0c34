"""In-process signals that a task settled, so a request waiting on it (`Prefer: wait`, an event
stream) wakes at once instead of reading the database in a loop. Workers in the same process
and the cancel route signal; waiters also re-read the database now and then for workers
elsewhere."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class TaskSignals:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self._closing = threading.Event()

    @contextmanager
    def subscribe(self, task_id: str) -> Iterator[asyncio.Event]:
        """An event set when `notify(task_id)` is called; call from the event loop."""
        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._waiters.setdefault(task_id, []).append(entry)
        try:
            yield entry[1]
        finally:
            with self._lock:
                entries = self._waiters.get(task_id, [])
                entries.remove(entry)
                if not entries:
                    self._waiters.pop(task_id, None)

    def notify(self, task_id: str) -> None:
        """Safe from any thread."""
        with self._lock:
            entries = list(self._waiters.get(task_id, ()))
        for loop, event in entries:
            loop.call_soon_threadsafe(event.set)

    def subscribers(self, task_id: str) -> int:
        """How many are waiting on the task now."""
        with self._lock:
            return len(self._waiters.get(task_id, ()))

    def close(self) -> None:
        """The server is shutting down: waiters with no end of their own (event streams)
        should stop, or the server would wait for them. Safe from any thread."""
        self._closing.set()

    @property
    def closing(self) -> bool:
        return self._closing.is_set()
