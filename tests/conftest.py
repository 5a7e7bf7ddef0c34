from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cogview_api.config import Settings
from cogview_api.store.db import Database
from tests import pg
from tests.support import TEST_ENV, InProcessApi, in_process_api

BACKENDS = ["sqlite", "pg"]


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


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database of each backend: a SQLite file, or a new PostgreSQL database
    (dropped afterwards: each one is a few MB on disk)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/cogview.db"
        return
    cluster: pg.PgCluster = request.getfixturevalue("pg_cluster")
    url = cluster.create_database()
    yield url
    cluster.drop_database(url)


def make_settings(tmp_path: Path, cache: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "database_url": f"sqlite:///{tmp_path}/cogview.db",
        "storage_url": f"file://{tmp_path}/images",
        "cache_dir": cache,
        "model": "tiny",
        "steps_hd": int(TEST_ENV["COGVIEW_STEPS_HD"]),
        "steps_standard": int(TEST_ENV["COGVIEW_STEPS_STANDARD"]),
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
    """The settings' database, migrated to the newest schema."""
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
