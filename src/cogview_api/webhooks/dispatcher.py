"""The dispatcher: claims due webhook deliveries, POSTs them, records every attempt.

One runs as a thread in each `cogview-api serve` and `cogview-api worker` process; the claim in
the database (store/webhooks.py) keeps any number of them from sending one attempt twice. Each
attempt re-checks the target's addresses (DNS may have changed since the submit) and connects to
the very address it checked; a refused target is a failed attempt like a refused connection.
Redirects are not followed, and proxies from the environment are not used: either would send
the request somewhere that was never checked. COGVIEW_WEBHOOK_TIMEOUT_SECONDS bounds a whole
attempt (DNS, connect, send, the answer's head), not each read: a receiver that dribbles a byte
at a time cannot hold a dispatcher thread, nor outlive the claim's lease and be sent twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import httpx
from sqlalchemy import Connection

from cogview_api import __version__, signing
from cogview_api.addresses import (
    Resolver,
    Target,
    UnsafeTarget,
    check_url,
    parse_allow_list,
)
from cogview_api.config import Settings
from cogview_api.domain import Batch, Task
from cogview_api.errors import CogviewError
from cogview_api.log_context import task_context
from cogview_api.metrics import instruments
from cogview_api.store import batches as batch_store
from cogview_api.store import tasks as task_store
from cogview_api.store import webhooks as delivery_store
from cogview_api.store.db import Database
from cogview_api.webhooks.deadline import deadline as cut_at
from cogview_api.webhooks.deadline import transport as deadline_transport

log = logging.getLogger(__name__)

# Attempts in flight per process; each claim's lease covers one attempt's overall deadline and
# a margin for a slow resolver (getaddrinfo cannot be cut) and for recording the attempt.
CONCURRENCY = 4
LEASE_MARGIN_S = 30.0
MAX_ERROR_CHARS = 300

# A settled task -> the JSON payload of its webhook (signed and sent as is, on every attempt).
# Given by the composition root (server.py: `api.present.webhook_payload`), so the delivery
# loop does not import the HTTP layer whose task object it sends.
RenderPayload = Callable[[Task], str]
# An ended batch and its event -> the JSON payload of its webhook (`api.present_batches`).
RenderBatchPayload = Callable[[Batch, str], str]


def attempt_outcome(status: int | None, error: str | None) -> str:
    """The metrics' outcome of one attempt (cogview_api.metrics.WEBHOOK_OUTCOMES)."""
    if status is not None:
        return "delivered" if 200 <= status < 300 else "http_error"
    return "refused" if (error or "").startswith("refused") else "transport_error"


class Dispatcher:
    def __init__(
        self,
        *,
        settings: Settings,
        db: Database,
        render: RenderPayload,
        render_batch: RenderBatchPayload | None = None,
        resolve: Resolver | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.render = render
        self.render_batch = render_batch
        self.resolve = resolve
        self.allow = parse_allow_list(settings.webhook_allow_hosts)
        self.stop = threading.Event()
        self._client = httpx.Client(
            timeout=settings.webhook_timeout_seconds,
            follow_redirects=False,
            trust_env=False,
            transport=deadline_transport(),
            headers={"user-agent": f"cogview-api-webhooks/{__version__}"},
        )
        self._pool = ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="webhook")

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="webhook-dispatcher", daemon=True)
        thread.start()
        return thread

    def run(self) -> None:
        """Deliver until `shutdown`. Never raises: a database outage only delays deliveries."""
        try:
            while not self.stop.is_set():
                try:
                    busy = self.run_once() > 0
                except CogviewError as exc:
                    log.warning("webhook dispatcher: %s", exc.message)
                    busy = False
                except Exception:  # a bug: keep delivering the others
                    log.exception("webhook dispatcher: unexpected error")
                    busy = False
                if not busy:
                    self.stop.wait(self.settings.webhook_poll_seconds)
        finally:
            self._pool.shutdown(wait=True)
            self._client.close()

    def shutdown(self) -> None:
        self.stop.set()

    def run_once(self) -> int:
        """Claim what is due (up to CONCURRENCY), attempt each, record them; how many."""
        claimed = self._claim()
        for future in [self._pool.submit(self._deliver, delivery) for delivery in claimed]:
            future.result()  # never raises: each attempt is recorded on its own
        return len(claimed)

    def _deliver(self, delivery: delivery_store.DueDelivery) -> None:
        """Attempt one delivery and record it as soon as it is done, whatever the others do.
        A record that cannot be written leaves the delivery to be claimed again after its
        lease (at least once). Its log lines carry the task's id."""
        with task_context(delivery.task_id or delivery.batch_id or "-", None):
            self._deliver_in_context(delivery)

    def _deliver_in_context(self, delivery: delivery_store.DueDelivery) -> None:
        status, error = self._attempt(delivery)
        instruments().webhook_attempts.labels(attempt_outcome(status, error)).inc()
        try:
            with self.db.write() as conn:
                state = delivery_store.record_attempt(
                    conn,
                    delivery=delivery,
                    status_code=status,
                    error=error,
                    retry_delays=self.settings.webhook_retry_delays,
                )
        except Exception:
            log.exception("webhook %s: could not record attempt %d", delivery.id, delivery.number)
            return
        log.info(
            "webhook %s (%s) attempt %d: %s -> %s",
            delivery.id,
            delivery.task_id or delivery.batch_id,
            delivery.number,
            status if status is not None else error,
            state,
        )

    def _claim(self) -> list[delivery_store.DueDelivery]:
        with self.db.read() as conn:
            if not delivery_store.any_due(conn):
                return []
        with self.db.write() as conn:
            claimed = delivery_store.claim_due(
                conn,
                limit=CONCURRENCY,
                lease_seconds=self.settings.webhook_timeout_seconds + LEASE_MARGIN_S,
            )
            out = []
            for delivery in claimed:
                if delivery.body is None:  # first attempt: fix the payload for all of them
                    body = self._render(conn, delivery)
                    delivery_store.fix_body(conn, delivery_id=delivery.id, body=body)
                    delivery = replace(delivery, body=body)
                out.append(delivery)
            return out

    def _render(self, conn: Connection, delivery: delivery_store.DueDelivery) -> str:
        if delivery.batch_id is not None:
            if self.render_batch is None:
                raise CogviewError("no renderer for batch webhooks was given")
            batch = batch_store.get_batch(conn, delivery.batch_id)
            return self.render_batch(batch, delivery.event)
        assert delivery.task_id is not None
        return self.render(task_store.get_task(conn, delivery.task_id))

    def _attempt(self, delivery: delivery_store.DueDelivery) -> tuple[int | None, str | None]:
        """(status code, None) when the receiver answered, else (None, why not). Never raises:
        whatever goes wrong with one target is that attempt's failure, and nothing else's."""
        deadline = time.monotonic() + self.settings.webhook_timeout_seconds
        try:
            target = check_url(delivery.url, self.allow, self.resolve)
            body = (delivery.body or "").encode()
            headers = signing.headers(delivery.secret, delivery.id, int(time.time()), body)
            return self._post(target, body, headers, deadline), None
        except UnsafeTarget as exc:
            return None, f"refused: {exc}"[:MAX_ERROR_CHARS]
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
        except Exception as exc:  # e.g. httpx.InvalidURL: the client sees its type, no internals
            log.warning("webhook %s attempt %d failed", delivery.id, delivery.number, exc_info=True)
            return None, type(exc).__name__

    def _post(self, target: Target, body: bytes, headers: dict[str, str], deadline: float) -> int:
        """POST to the checked address itself, naming the (ASCII) host in Host and TLS SNI; the
        answer's body is not read. Every step is cut at `deadline` (time.monotonic())."""
        address = target.addresses[0]
        userinfo = target.url.netloc.rpartition("@")[0]
        netloc = f"[{address}]" if ":" in address else address
        url = target.url._replace(
            netloc=f"{userinfo + '@' if userinfo else ''}{netloc}:{target.port}"
        ).geturl()
        host = f"[{target.host}]" if ":" in target.host else target.host
        if target.url.port is not None:
            host += f":{target.url.port}"
        extensions = {"sni_hostname": target.host} if target.url.scheme == "https" else {}
        with (
            cut_at(deadline),
            self._client.stream(
                "POST", url, content=body, headers={**headers, "host": host}, extensions=extensions
            ) as response,
        ):
            return response.status_code
