from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cogview_api.config import Settings
from tests.support import TEST_ENV, InProcessApi, in_process_api


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder per run; the tiny model is built in it on first use."""
    return tmp_path_factory.mktemp("cache")


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
def settings(tmp_path: Path, tiny_cache: Path) -> Settings:
    return make_settings(tmp_path, tiny_cache)


@pytest.fixture
def api(settings: Settings) -> Iterator[InProcessApi]:
    """The API (no worker) behind a real HTTP server in this process."""
    with in_process_api(settings) as running:
        yield running
