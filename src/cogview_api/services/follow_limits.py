"""Per-key caps on what holds a request open while following a task: event streams and
`Prefer: wait` submits (`COGVIEW_MAX_STREAMS_PER_KEY`, `COGVIEW_MAX_WAITS_PER_KEY`, or the
key's own `max_streams` / `max_waits`, set through services/limits.py).

The slots live in the database (`follow_slots`), so every API process enforces the same
numbers. Taking one is one write transaction: the key found by its secret's hash and its row
locked, its lapsed slots deleted, its live ones of the kind counted, a row inserted, or
RateLimited (429) when it holds its most. Its request gives it back when it ends (a delete). A
process renews the lease of the slots it holds (by id) every third of `SLOT_LEASE_S` in one
statement; a process that died, or a give-back that failed, leaves slots that lapse within that
lease.
"""

from __future__ import annotations

import logging
import secrets
import threading
from datetime import timedelta
from typing import Literal

from cogview_api.errors import CogviewError, RateLimited
from cogview_api.services.keys import usable_key
from cogview_api.store import follow_slots as slot_store
from cogview_api.store.db import Database

log = logging.getLogger(__name__)

Kind = Literal["stream", "wait"]
# Seconds a refused client is told to wait: a slot frees when one of its own requests ends.
RETRY_AFTER_S = 5
# How long a slot outlives a process that stopped renewing it (crashed, killed).
SLOT_LEASE_S = 30.0

_WHAT = {
    "stream": ("event streams open", "COGVIEW_MAX_STREAMS_PER_KEY", "close one"),
    "wait": ("`Prefer: wait` requests waiting", "COGVIEW_MAX_WAITS_PER_KEY", "let one end"),
}


class FollowLimits:
    def __init__(
        self, db: Database, *, max_streams: int, max_waits: int, lease_s: float = SLOT_LEASE_S
    ) -> None:
        self.db = db
        self.holder = secrets.token_hex(16)  # this process's slots
        self._most: dict[Kind, int] = {"stream": max_streams, "wait": max_waits}
        self._lease = timedelta(seconds=lease_s)
        self._lock = threading.Lock()
        self._held: set[str] = set()  # ids of the slots this process holds: it renews these
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def take(self, kind: Kind, secret: str) -> Slot:
        """A slot of `kind` for the secret's key. Raises AuthenticationFailed or
        PermissionDenied for a secret that may not be used, RateLimited when the key holds its
        most. Blocking: call from a thread."""
        with self.db.write() as conn:
            key = usable_key(slot_store.lock_key(conn, secret))
            own = key.max_streams if kind == "stream" else key.max_waits
            most = self._most[kind] if own is None else own
            held = slot_store.held(conn, key_id=key.id, kind=kind)
            if held >= most:
                what, setting, advice = _WHAT[kind]
                whose = setting if own is None else "its own cap"
                raise RateLimited(
                    f"This key has {held} {what}, its most ({whose}); {advice} and try again.",
                    retry_after=RETRY_AFTER_S,
                )
            slot_id = slot_store.take(
                conn, key_id=key.id, kind=kind, holder=self.holder, lease=self._lease
            )
        with self._lock:
            self._held.add(slot_id)
            if self._renewer is None:
                self._renewer = threading.Thread(
                    target=self._renew, name="follow-slots", daemon=True
                )
                self._renewer.start()
        return Slot(self, slot_id)

    def close(self) -> None:
        self._stop.set()

    def _release(self, slot_id: str) -> None:
        with self._lock:  # not renewed from now on: a delete that fails lapses with the lease
            self._held.discard(slot_id)
        try:
            with self.db.write() as conn:
                slot_store.release(conn, slot_id)
        except CogviewError as exc:  # the database is away: the slot lapses with its lease
            log.warning("could not give back slot %s: %s", slot_id, exc.message)
        except Exception:  # a raw driver error, a bug: never into a stream's or wait's teardown
            log.exception("could not give back slot %s; it lapses with its lease", slot_id)

    def _renew(self) -> None:
        interval = self._lease.total_seconds() / 3
        while not self._stop.wait(interval):
            with self._lock:
                held = list(self._held)
            if not held:
                continue
            try:
                with self.db.write() as conn:
                    slot_store.renew(conn, held, lease=self._lease)
            except CogviewError as exc:  # try again next time, before the lease runs out
                log.warning("could not renew this process's follow slots: %s", exc.message)
            except Exception:  # a raw driver error, a bug: the thread must live on
                log.exception("could not renew this process's follow slots")


class Slot:
    """One held slot; `release` (blocking) is idempotent."""

    def __init__(self, limits: FollowLimits, slot_id: str) -> None:
        self._limits: FollowLimits | None = limits
        self.id = slot_id

    def release(self) -> None:
        limits, self._limits = self._limits, None
        if limits is not None:
            limits._release(self.id)
