"""Composition of the running service: `serve` (API + in-process workers) and `worker`."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
from types import FrameType

import uvicorn
from fastapi import FastAPI
from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

from cogview_api import __version__, metrics
from cogview_api.api.app import create_app
from cogview_api.api.http_server import http_config
from cogview_api.api.present import webhook_payload
from cogview_api.api.present_batches import batch_webhook_payload
from cogview_api.config import Settings
from cogview_api.engine import Engine, load_engine
from cogview_api.errors import ServiceUnavailable, StartError
from cogview_api.http_supervisor import SpreadMultiprocess, bind_sockets
from cogview_api.log_context import ContextFilter, TextFormatter
from cogview_api.services.backends import Backends
from cogview_api.services.metrics import queue_snapshot
from cogview_api.services.signals import TaskSignals
from cogview_api.storage import open_storage
from cogview_api.store import keys as key_store
from cogview_api.store.db import Database, describe_database
from cogview_api.store.notify import Listener
from cogview_api.webhooks.dispatcher import Dispatcher
from cogview_api.worker.loop import Worker
from cogview_api.worker.supervisor import WorkerThread, stop_workers

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn's server, which first tells open event streams to end when it shuts down: it
    waits for open responses, and a stream lasts until its task ends."""

    def __init__(self, config: uvicorn.Config, signals: TaskSignals) -> None:
        super().__init__(config)
        self.signals = signals

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.signals.close()
        await super().shutdown(sockets)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(context)s: %(message)s"
# python-json-logger adds the records' extra fields (request_id, task_id, a finished task's
# figures) as keys of their own.
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s"
JSON_RENAMES = {"asctime": "time", "levelname": "level", "name": "logger"}
# uvicorn's records carry an ANSI-coloured copy of their message: not for a log shipper.
JSON_RESERVED = [*RESERVED_ATTRS, "color_message"]


def configure_logging(level: str, fmt: str = "text") -> None:
    """The root handler, in `fmt` (text or json), with the request and task ids on every line;
    uvicorn's loggers are left unconfigured (log_config=None) so they come through it too."""
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(JSON_FIELDS, rename_fields=JSON_RENAMES, reserved_attrs=JSON_RESERVED)
        )
    else:
        handler.setFormatter(TextFormatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    for noisy in ("httpx", "diffusers", "transformers", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Importing diffusers imports torchao when it is installed (the int8 extra), and that import
    # warns about kernels and checkpoint formats we never use (mxfp8, CUTLASS sm90a, torchao-
    # serialized checkpoints, deprecated pytree registrations): noise at every start.
    for import_noise in ("torchao", "diffusers.quantizers.torchao", "torch.utils._pytree"):
        logging.getLogger(import_noise).setLevel(logging.ERROR)


def worker_devices(settings: Settings, count: int) -> list[str]:
    """One device per in-process worker: cuda:0..N-1 when asked for `auto` on a GPU box."""
    if count <= 1 or settings.device != "auto":
        return [settings.device] * count
    return [f"cuda:{i}" for i in range(count)]


def load_engines(settings: Settings, count: int) -> list[Engine]:
    """Load before serving, so a model that cannot load stops the start with its reason."""
    engines = []
    for device in worker_devices(settings, count):
        engines.append(load_engine(settings.model_copy(update={"device": device})))
    return engines


def check_port_free(host: str, port: int) -> None:
    """Refuse a taken port in a second, before minutes of loading a model: bind it as uvicorn
    will (SO_REUSEADDR, so a port left in TIME_WAIT by a stopped server counts as free)."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise StartError(f"cannot listen on {host!r}: {exc.strerror}") from exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            raise StartError(
                f"port {port} on {host} is taken ({exc.strerror}): stop what runs there, or "
                "choose another with --port (COGVIEW_PORT)."
            ) from exc


def _reachable_host(host: str) -> str:
    """A listening address as a URL's host: 0.0.0.0 and :: mean every address of this machine,
    of which 127.0.0.1 works from here."""
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def base_url(settings: Settings) -> str:
    if settings.public_url:
        return settings.public_url.rstrip("/")
    return f"http://{_reachable_host(settings.host)}:{settings.port}"


def log_start(settings: Settings, engines: list[Engine]) -> None:
    """Once, at the start: what runs where, and where to point a browser."""
    model = settings.model + (" (random weights: its images are noise)" if settings.is_tiny else "")
    if engines:
        devices = ", ".join(e.device for e in engines)
        workers = f"{len(engines)} in-process worker(s) on {devices}"
    else:
        workers = "no in-process worker (tasks wait for `cogview-api worker` processes)"
    base = base_url(settings)
    log.info(
        "cogview-api %s: model %s, %s; database %s; images %s; %d HTTP process(es) on %s:%d",
        __version__,
        model,
        workers,
        describe_database(settings.database_url),
        settings.storage_url,
        settings.http_processes,
        settings.host,
        settings.port,
    )
    log.info("try-it page %s/ ; API docs %s/docs ; %s", base, base, metrics_place(settings, base))


def metrics_place(settings: Settings, base: str) -> str:
    if not settings.metrics:
        return "metrics off (COGVIEW_METRICS=false)"
    if settings.metrics_port is not None:  # its own listener, on COGVIEW_HOST
        return f"metrics http://{_reachable_host(settings.host)}:{settings.metrics_port}/metrics"
    return f"metrics {base}/metrics"


def serve(settings: Settings) -> None:
    check_port_free(settings.host, settings.port)
    if settings.metrics and settings.http_processes > 1:
        share_metrics_between_processes()
    db = Database(settings.database_url)
    db.migrate()
    if settings.metrics and settings.metrics_port is not None:  # before the model's long load
        start_metrics_exporter(
            settings, [metrics.QueueCollector(lambda: queue_snapshot(db, settings))]
        )
    storage = open_storage(
        settings.storage_url,
        s3_endpoint_url=settings.s3_endpoint_url,
        s3_public_endpoint_url=settings.s3_public_endpoint_url,  # the API presigns for clients
    )
    engines = load_engines(settings, settings.workers)
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again with the handler it
    # found: this one, so that the workers' shutdown below runs and the exit status is 0 (the
    # default action would kill the process with the batch in hand still RUNNING).
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    signals = TaskSignals()
    workers = [
        Worker(settings=settings, db=db, storage=storage, engine=e, on_changed=signals.notify)
        for e in engines
    ]
    threads = [WorkerThread(w).start() for w in workers]
    listener = start_listener(settings, db, workers)
    # Webhooks, also with --workers 0; their payload is the API's task object.
    dispatcher = Dispatcher(
        settings=settings,
        db=db,
        render=webhook_payload(settings),
        render_batch=batch_webhook_payload(),
    )
    dispatcher_thread = dispatcher.start()
    with db.read() as conn:
        if not key_store.list_keys(conn):
            log.warning(
                "no API keys yet: create one with `cogview-api keys create --name me --credits 100`"
            )
    warn_about_hosts(settings)
    try:
        if settings.http_processes > 1:
            log_start(settings, engines)
            serve_http_processes(settings)  # each HTTP process builds its own app
        else:
            app = create_app(
                settings,
                backends=Backends.open(settings, db=db, storage=storage),
                on_submit=[w.wake.set for w in workers],
                signals=signals,
                live_workers=(lambda: sum(t.live for t in threads)) if threads else None,
            )
            log_start(settings, engines)
            config = http_config(
                app,
                settings,
                host=settings.host,
                port=settings.port,
                log_level=settings.log_level,
                log_config=None,  # configure_logging's handler, in the chosen format
                access_log=False,  # ours (COGVIEW_ACCESS_LOG) carries the request id
            )
            _Server(config, signals).run()
    finally:
        signal.signal(signal.SIGTERM, _stopping)
        if listener is not None:
            listener.stop()
        stop_workers(threads, settings.shutdown_grace_seconds)
        dispatcher.shutdown()
        dispatcher_thread.join(timeout=settings.webhook_timeout_seconds + 5)
        db.dispose()


def warn_about_hosts(settings: Settings) -> None:
    """Say at the start which Host headers are answered when the operator named none."""
    allowed = settings.allowed_hosts()
    if allowed is None or settings.trusted_hosts.strip():
        return
    reachable = settings.host in ("0.0.0.0", "::", "")
    log.log(
        logging.WARNING if reachable else logging.INFO,
        "COGVIEW_PUBLIC_URL is not set: image URLs are built from the request's Host header, so "
        "only requests for %s are answered (others get 400). Set COGVIEW_PUBLIC_URL=https://... "
        "(or COGVIEW_TRUSTED_HOSTS) for clients that reach this server by another name.",
        ", ".join(sorted(allowed)),
    )


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def _stopping(signum: int, frame: FrameType | None) -> None:
    log.info("signal %s: already stopping", signum)


# `serve --http-processes N`: the settings the HTTP processes build their app from.
SETTINGS_ENV = "COGVIEW_SERVE_SETTINGS_JSON"


def serve_http_processes(settings: Settings) -> None:
    """N HTTP processes on one port (uvicorn's own supervisor: it restarts one that dies, and
    stops them all on SIGINT/SIGTERM), while this process keeps the workers and the webhook
    dispatcher. A waiting request (`Prefer: wait`, a sync compat route, an event stream) is
    then told of a settled task by its next read of the database (every 0.5 s or less), and
    on SQLite a new task waits for the workers' next poll, as with separate worker processes;
    on PostgreSQL LISTEN/NOTIFY wakes them."""
    os.environ[SETTINGS_ENV] = settings.model_dump_json()
    config = http_config(
        "cogview_api.server:http_process_app",
        settings,
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.http_processes,
        log_level=settings.log_level,
        log_config=None,
        access_log=False,
    )
    # What uvicorn.run does for workers > 1, with our config (it builds its own from keywords),
    # but a socket per process (http_supervisor.py: the kernel spreads the connections).
    try:
        sockets = bind_sockets(settings.host, settings.port, settings.http_processes)
    except OSError as exc:  # taken since check_port_free, or a name with no IPv4 address
        raise StartError(
            f"cannot listen on {settings.host}:{settings.port} ({exc.strerror}): choose another"
            " --port (COGVIEW_PORT) or --host."
        ) from exc
    SpreadMultiprocess(config, sockets=sockets).run()


def http_process_app() -> FastAPI:
    """The app of one HTTP process of `serve --http-processes N` (uvicorn imports it there)."""
    settings = Settings.model_validate_json(os.environ[SETTINGS_ENV])
    configure_logging(settings.log_level, settings.log_format)
    return create_app(settings)


def start_listener(settings: Settings, db: Database, workers: list[Worker]) -> Listener | None:
    """On PostgreSQL, one LISTEN connection per process that wakes its workers on new tasks
    (submitted by any API process); None on SQLite, without workers, or with listen off."""
    if not workers or not settings.listen or db.dialect != "postgresql":
        return None

    def wake_all() -> None:
        for w in workers:
            w.wake.set()

    return Listener(db.url, wake_all).start()


def share_metrics_between_processes() -> None:
    """`serve --http-processes N`: every process (the HTTP ones, and this one with the
    workers) records into a file of its own in one folder, and each scrape sums them. The
    operator's PROMETHEUS_MULTIPROC_DIR is emptied (last run's files would count again), else
    a new temporary folder serves."""
    folder = os.environ.get(metrics.MULTIPROC_ENV)
    if folder:
        os.makedirs(folder, exist_ok=True)
        for name in os.listdir(folder):
            if name.endswith(".db"):
                os.remove(os.path.join(folder, name))
    else:
        folder = tempfile.mkdtemp(prefix="cogview-metrics-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
    metrics.use_multiprocess(folder)


def start_metrics_exporter(settings: Settings, extra: list[metrics.QueueCollector]) -> None:
    assert settings.metrics_port is not None
    try:
        metrics.start_exporter(settings.host, settings.metrics_port, extra)
    except OSError as exc:
        raise ServiceUnavailable(
            f"cannot serve metrics on {settings.host}:{settings.metrics_port}: {exc.strerror}"
            " (COGVIEW_METRICS_PORT / --metrics-port)"
        ) from exc
    log.info("metrics on http://%s:%d/metrics", settings.host, settings.metrics_port)


def run_worker(settings: Settings) -> None:
    """`cogview-api worker`: one worker and the webhook dispatcher. SIGTERM/SIGINT stop it like
    `serve`: stop claiming, finish the batch in hand within the grace period or hand it back
    uncounted, deregister, exit 0."""
    db = Database(settings.database_url)
    db.migrate()
    if settings.metrics and settings.metrics_port is not None:
        # Its own metrics only: the queue's gauges come from the API (one copy of each).
        start_metrics_exporter(settings, [])
    storage = open_storage(settings.storage_url, s3_endpoint_url=settings.s3_endpoint_url)
    (engine,) = load_engines(settings, 1)
    worker = Worker(settings=settings, db=db, storage=storage, engine=engine)
    log.info(
        "cogview-api %s worker: model %s on %s; database %s; images %s",
        __version__,
        settings.model,
        engine.device,
        describe_database(settings.database_url),
        settings.storage_url,
    )
    stopping = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        if stopping.is_set():
            log.info("signal %s: already stopping", signum)
            return
        log.info("signal %s: finishing the batch in hand, then exiting", signum)
        stopping.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    listener = start_listener(settings, db, [worker])
    dispatcher = Dispatcher(
        settings=settings,
        db=db,
        render=webhook_payload(settings),
        render_batch=batch_webhook_payload(),
    )
    dispatcher_thread = dispatcher.start()
    thread = WorkerThread(worker).start()
    try:
        # A timed wait, so the main thread wakes to run the signal handler.
        while not stopping.wait(1.0):
            pass
    finally:
        if listener is not None:
            listener.stop()
        stop_workers([thread], settings.shutdown_grace_seconds)
        dispatcher.shutdown()
        dispatcher_thread.join(timeout=settings.webhook_timeout_seconds + 5)
        db.dispose()
