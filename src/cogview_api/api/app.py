"""The app factory: everything the HTTP layer needs is built here from one Settings."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from cogview_api import __version__
from cogview_api.api.errors import RequestGuard, install_error_handlers
from cogview_api.api.metrics import HttpMetrics
from cogview_api.api.openapi import install_docs
from cogview_api.api.routes import (
    admin,
    batches,
    health,
    images,
    info,
    metrics,
    native,
    openai_compat,
    page,
    zhipu_compat,
)
from cogview_api.api.routes.page import STATIC
from cogview_api.api.serving import GenerationServing
from cogview_api.config import Settings
from cogview_api.metrics import QueueCollector
from cogview_api.services.backends import Backends
from cogview_api.services.follow_limits import FollowLimits
from cogview_api.services.images import presigner
from cogview_api.services.metrics import queue_snapshot
from cogview_api.services.signals import TaskSignals
from cogview_api.services.watch import TaskWatcher


def create_app(
    settings: Settings,
    *,
    backends: Backends | None = None,
    on_submit: Sequence[Callable[[], None]] = (),
    signals: TaskSignals | None = None,
    live_workers: Callable[[], int] | None = None,
) -> FastAPI:
    """The HTTP app, on `backends` (else the settings' database and storage). `on_submit`
    callbacks run after each accepted task, and in-process workers call `signals.notify` when a
    task changes: both spare a wait for the next poll. `live_workers` counts this process's
    running workers, for /readyz; None where the workers run elsewhere (it then counts the
    workers with a fresh heartbeat in the database). One task watcher per app follows the
    tasks of its open event streams and waits (services/watch.py)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await app.state.watcher.aclose()
        app.state.serving.limits.close()

    app = FastAPI(
        lifespan=lifespan,
        title="cogview-api",
        version=__version__,
        description="Self-hosted HTTP API for Zhipu's CogView 4 text-to-image model.",
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.backends = backends = backends or Backends.open(settings)
    app.state.signals = signals = signals or TaskSignals()
    app.state.live_workers = live_workers
    listen = settings.listen and backends.db.dialect == "postgresql"
    app.state.watcher = watcher = TaskWatcher(
        backends.db,
        signals=signals,
        interval=settings.watch_fallback_seconds if listen else settings.watch_poll_seconds,
        listen=listen,
        batch_size=settings.max_batch_size,
    )
    app.state.serving = GenerationServing(
        settings=settings,
        backends=backends,
        watcher=watcher,
        limits=FollowLimits(
            backends.db,
            max_streams=settings.max_streams_per_key,
            max_waits=settings.max_waits_per_key,
        ),
        presign=presigner(settings.image_urls, backends.storage),
        on_submit=on_submit,
    )
    install_error_handlers(app)
    app.include_router(native.router)
    app.include_router(batches.router)
    app.include_router(info.router)
    app.include_router(openai_compat.router)
    app.include_router(zhipu_compat.router)
    app.include_router(images.router)
    app.include_router(health.router)
    app.include_router(page.router)
    if settings.metrics and settings.metrics_port is None:
        app.state.queue_collector = QueueCollector(lambda: queue_snapshot(backends.db, settings))
        app.include_router(metrics.router)
    if settings.admin_token is not None:  # off (unknown routes, 404) without a token
        app.include_router(admin.router)
    install_docs(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(
        RequestGuard,
        max_body_bytes=settings.max_body_bytes,
        body_limits={"/api/v1/batches": settings.batch_max_body_bytes},
        allowed_hosts=settings.allowed_hosts(),
        access_log=settings.access_log,
    )
    if settings.metrics:  # outermost: it also counts what RequestGuard refuses
        app.add_middleware(HttpMetrics)
    return app
