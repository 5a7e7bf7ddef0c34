from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ServerProcess, server_env


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path) -> Iterator[ServerProcess]:
    """One `cogview-api serve --model tiny` subprocess for the module, ready to take work."""
    workdir = tmp_path_factory.mktemp("serve")
    with ServerProcess(workdir=workdir, env=server_env(tiny_cache)).start() as proc:
        yield proc
