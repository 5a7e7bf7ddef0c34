"""What the embedded default writes to disk is its owner's alone (issue: hardening, finding 11:
the SQLite file, which holds webhook signing secrets, was created world-readable)."""

from __future__ import annotations

import stat
from pathlib import Path

from cogview_api.storage.local import LocalStorage
from cogview_api.store.db import Database


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_database_its_wal_and_the_images_are_owner_only(tmp_path: Path) -> None:
    data = tmp_path / "data"
    db = Database(f"sqlite:///{data}/cogview.db")
    try:
        db.migrate()
        with db.read() as conn:  # WAL mode: the -wal and -shm files exist while it is open
            conn.exec_driver_sql("SELECT 1")
            files = [data / "cogview.db", data / "cogview.db-wal", data / "cogview.db-shm"]
            assert {f.name: _mode(f) for f in files} == {f.name: 0o600 for f in files}
    finally:
        db.dispose()
    assert _mode(data) == 0o700
    storage = LocalStorage(tmp_path / "images")
    storage.put("task_1/0.png", b"\x89PNG...", "image/png")
    assert _mode(tmp_path / "images") == 0o700
    assert _mode(tmp_path / "images" / "task_1") == 0o700
    assert _mode(tmp_path / "images" / "task_1" / "0.png") == 0o600
