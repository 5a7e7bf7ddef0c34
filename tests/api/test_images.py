"""Image URLs: no key needed, unguessable, 404 after the retention period, files cleaned up."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from sqlalchemy import update

from cogview_api.clock import utcnow
from cogview_api.storage import LocalStorage
from cogview_api.store.tables import images
from cogview_api.worker.loop import Worker
from tests.conftest import make_settings
from tests.support import EXAMPLE_BODY, FlakyEngine, auth, in_process_api


def test_image_url_works_without_a_key_then_expires(
    tmp_path: Path, tiny_cache: Path, database_url: str
) -> None:
    # A day's retention, ended below by moving the image's expiry into the past: a retention of
    # seconds raced the worker on a slow machine (the image expired before it was fetched).
    settings = make_settings(tmp_path, tiny_cache, retention_days=1.0, database_url=database_url)
    with in_process_api(settings) as api:
        key = api.make_key(credits=40)
        body = {**EXAMPLE_BODY, "size": "864x1152", "output_format": "jpeg"}
        r = api.client.post("/api/v1/images/generations", json=body, headers=auth(key))
        task_id = r.json()["data"]["task_id"]
        storage = LocalStorage(tmp_path / "images")
        worker = Worker(settings=settings, db=api.db, storage=storage, engine=FlakyEngine())
        assert worker.run_once()
        task = api.client.get(f"/api/v1/tasks/{task_id}", headers=auth(key)).json()["data"]
        assert task["status"] == "COMPLETED"
        (image,) = task["images"]
        assert image["url"].startswith(api.base_url + "/images/") and image["url"].endswith(".jpeg")
        got = api.client.get(image["url"])  # no Authorization header
        assert got.status_code == 200 and got.headers["content-type"] == "image/jpeg"
        assert got.content.startswith(b"\xff\xd8")  # a JPEG
        token = image["url"].rsplit("/", 1)[1].split(".")[0]
        assert len(token) >= 32  # 192 random bits, base64url
        assert api.client.get(image["url"].replace(".jpeg", ".png")).status_code == 404
        files = list((tmp_path / "images").rglob("*.jpeg"))
        assert len(files) == 1

        with api.db.write() as conn:
            conn.execute(update(images).values(expires_at=utcnow() - timedelta(seconds=1)))
        gone = api.client.get(image["url"])
        assert gone.status_code == 404 and gone.json()["error"]["type"] == "not_found"
        worker._last_cleanup = 0.0  # housekeeping runs at the next pass
        worker.run_once()
        assert list((tmp_path / "images").rglob("*.jpeg")) == []
