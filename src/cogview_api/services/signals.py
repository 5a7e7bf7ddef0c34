"""In-process signals that tasks changed, so the process's task watcher (services/watch.py)
looks at once instead of at its next tick. Workers in the same process ring it on each
progress step and settle, the cancel route on a cancel; `close` says the server is stopping."""

from __future__ import annotations

import threading
from collections.abc import Callable


class TaskSignals:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hooks: list[Callable[[], None]] = []
        self._closing = threading.Event()

    def on_change(self, hook: Callable[[], None]) -> None:
        """Call `hook` (from the notifying thread) on every `notify` and on `close`."""
        with self._lock:
            self._hooks.append(hook)

    def notify(self, task_id: str | None = None) -> None:
        """A task changed (which one is for logs: the watcher looks at all it follows).
        Safe from any thread."""
        with self._lock:
            hooks = list(self._hooks)
        for hook in hooks:
            hook()

    def close(self) -> None:
        """The server is shutting down: followers with no end of their own (event streams)
        should stop, or the server would wait for them. Safe from any thread."""
        self._closing.set()
        self.notify()

    @property
    def closing(self) -> bool:
        return self._closing.is_set()
