from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from cogview_api.config import Settings
from cogview_api.store.db import Database
from tests import pg
from tests.support import TEST_ENV, InProcessApi, in_process_api

# torch runs its CPU kernels on one OpenMP thread per core by default, in every test process at
# once (each pytest-xdist worker, and each `serve` it starts): with -n 2 on 2 cores that is 4 or
# more spinning threads on 2 cores, which measured twice the CPU for the same work (the real-engine
# tests of tests/unit/test_cancel_worker.py: 28 s user by default, 14 s with one thread). So each
# test process gets its share of the cores, set here before anything imports torch (children
# inherit it); an OMP_NUM_THREADS of the caller's own wins.
os.environ.setdefault(
    "OMP_NUM_THREADS",
    str(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))),
)

BACKENDS = ["sqlite", "pg"]
# Each folder under tests/ is a tier, and every test in it carries that tier's marker
# (registered in pyproject.toml), so that `-m "not e2e"` or `-m unit` select by folder.
TIERS = ("unit", "api", "integration", "e2e")
# The order the tiers run in: slowest modules first (real `serve` processes, the tiny model on
# the CPU), the many short api modules last. pytest-xdist hands out whole modules (--dist
# loadfile) in this order as workers free up, so the last ones to start are short and no worker
# idles at the end while the other runs a long module it took late.
RUN_ORDER = ("e2e", "unit", "integration", "api")
TESTS = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    untiered = []
    for item in items:
        if not item.path.is_relative_to(TESTS):
            continue
        tier = item.path.relative_to(TESTS).parts[0]
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))
        else:
            untiered.append(item.nodeid)
    if untiered:
        raise pytest.UsageError(
            f"these tests are in no tier folder, tests/{{{','.join(TIERS)}}}/: "
            + ", ".join(untiered[:5])
        )
    items.sort(key=_run_order)  # stable: a module's tests keep their order


def _run_order(item: pytest.Item) -> int:
    if not item.path.is_relative_to(TESTS):
        return len(RUN_ORDER)
    return RUN_ORDER.index(item.path.relative_to(TESTS).parts[0])


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder per run; the tiny model is built in it on first use."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[pg.PgCluster]:
    """A throwaway PostgreSQL server for the session. Without Debian's binaries: skipped, or
    failed when COGVIEW_TEST_REQUIRE_PG=1 (scripts/test.sh, CI)."""
    bindir = pg.find_bindir()
    if bindir is None:
        if os.environ.get(pg.REQUIRE_ENV) == "1":
            pytest.fail(f"{pg.REQUIRE_ENV}=1 but {pg.missing_message()}", pytrace=False)
        pytest.skip(pg.missing_message())
    cluster = pg.start_cluster(bindir)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file at the newest schema, migrated once for the session; tests get copies."""
    path = tmp_path_factory.mktemp("sqlite-template") / "cogview.db"
    database = Database(f"sqlite:///{path}")
    try:
        database.migrate()
    finally:
        database.dispose()
    # The last connection closed checkpointed the WAL into the file: it is the whole database.
    assert not path.with_name(path.name + "-wal").exists()
    return path


def _fresh_database(
    request: pytest.FixtureRequest, tmp_path: Path, migrated: bool
) -> Iterator[str]:
    if request.param == "sqlite":
        path = tmp_path / "cogview.db"
        if migrated:
            shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite:///{path}"
        return
    cluster: pg.PgCluster = request.getfixturevalue("pg_cluster")
    url = cluster.create_database(migrated=migrated)
    yield url
    cluster.drop_database(url)  # each one is a few MB on disk


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database of each backend, this test's own, at the newest schema: a copy of the
    session's migrated template (a SQLite file, or a PostgreSQL database made with
    `CREATE DATABASE ... TEMPLATE`, dropped afterwards)."""
    yield from _fresh_database(request, tmp_path, migrated=True)


@pytest.fixture(params=BACKENDS)
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database of each backend (no tables), for tests of the migrations."""
    yield from _fresh_database(request, tmp_path, migrated=False)


def make_settings(tmp_path: Path, cache: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "database_url": f"sqlite:///{tmp_path}/cogview.db",
        "storage_url": f"file://{tmp_path}/images",
        "cache_dir": cache,
        "model": "tiny",
        "steps_hd": int(TEST_ENV["COGVIEW_STEPS_HD"]),
        "steps_standard": int(TEST_ENV["COGVIEW_STEPS_STANDARD"]),
        "steps_low": int(TEST_ENV["COGVIEW_STEPS_LOW"]),
        "poll_interval": 0.1,
        "workers": 0,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def settings(tmp_path: Path, tiny_cache: Path, database_url: str) -> Settings:
    return make_settings(tmp_path, tiny_cache, database_url=database_url)


@pytest.fixture
def db(settings: Settings) -> Iterator[Database]:
    """The settings' database at the newest schema (`migrate` finds nothing to do on a copy of
    the template; it is there for modules whose `settings` name another database)."""
    database = Database(settings.database_url)
    database.migrate()
    try:
        yield database
    finally:
        database.dispose()


@pytest.fixture
def api(settings: Settings) -> Iterator[InProcessApi]:
    """The API (no worker) behind a real HTTP server in this process."""
    with in_process_api(settings) as running:
        yield running
