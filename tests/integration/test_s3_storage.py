"""Image storage on S3 (moto's S3 server, a real HTTP endpoint) and in a local folder: one
contract for both, errors as our errors, and the service end to end with its images in a bucket."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from cogview_api.errors import StorageError
from cogview_api.storage import ImageStorage, open_storage
from cogview_api.storage.s3 import S3Storage
from cogview_api.worker.loop import Worker
from tests.conftest import make_settings
from tests.integration.conftest import MotoServer
from tests.pg import PgCluster
from tests.support import (
    EXAMPLE_BODY,
    FlakyEngine,
    InProcessApi,
    ServerProcess,
    auth,
    free_port,
    in_process_api,
    server_env,
    submit_task,
)

KEY = "2026/11/24/task_cv4/0-tok.png"


@pytest.fixture(params=["local", "s3"])
def storage(
    request: pytest.FixtureRequest, tmp_path: Path, aws_env: dict[str, str]
) -> ImageStorage:
    if request.param == "local":
        return open_storage(f"file://{tmp_path}/images")
    moto: MotoServer = request.getfixturevalue("moto_s3")
    return open_storage(f"s3://{moto.new_bucket()}/images", s3_endpoint_url=moto.endpoint_url)


def test_put_then_get_gives_the_bytes_back(storage: ImageStorage) -> None:
    storage.put(KEY, b"\x89PNG one", "image/png")
    assert storage.get(KEY) == b"\x89PNG one"


def test_put_overwrites(storage: ImageStorage) -> None:
    storage.put(KEY, b"first", "image/png")
    storage.put(KEY, b"second", "image/png")
    assert storage.get(KEY) == b"second"


def test_a_key_never_written_is_none(storage: ImageStorage) -> None:
    assert storage.get("2026/01/01/nothing/0-x.png") is None


def test_delete_removes_and_is_idempotent(storage: ImageStorage) -> None:
    storage.put(KEY, b"bytes", "image/png")
    storage.delete(KEY)
    assert storage.get(KEY) is None
    storage.delete(KEY)  # again: not an error
    storage.delete("2026/01/01/never/0-x.png")


def test_keys_with_slashes_are_separate_objects(storage: ImageStorage) -> None:
    keys = ["2026/11/24/a_cv4/0-x.png", "2026/11/24/a_cv4/1-y.png", "2026/11/25/b_cv4/0-z.webp"]
    for i, key in enumerate(keys):
        storage.put(key, f"image {i}".encode(), "image/png")
    storage.delete(keys[0])
    assert [storage.get(k) for k in keys] == [None, b"image 1", b"image 2"]


def test_s3_objects_live_under_the_prefix_with_their_content_type(
    moto_s3: MotoServer, aws_env: dict[str, str]
) -> None:
    bucket = moto_s3.new_bucket()
    storage = open_storage(f"s3://{bucket}/run/1/", s3_endpoint_url=moto_s3.endpoint_url)
    assert isinstance(storage, S3Storage)
    storage.put(KEY, b"\xff\xd8 jpeg", "image/jpeg")
    head = moto_s3.client().head_object(Bucket=bucket, Key=f"run/1/{KEY}")
    assert head["ContentType"] == "image/jpeg" and head["ContentLength"] == 7
    whole_bucket = S3Storage(bucket, endpoint_url=moto_s3.endpoint_url)
    assert whole_bucket.get(f"run/1/{KEY}") == b"\xff\xd8 jpeg"


def test_a_missing_bucket_is_a_storage_error_not_a_missing_image(
    moto_s3: MotoServer, aws_env: dict[str, str]
) -> None:
    storage = S3Storage("no-such-bucket-here", endpoint_url=moto_s3.endpoint_url)
    with pytest.raises(StorageError):
        storage.put(KEY, b"x", "image/png")
    with pytest.raises(StorageError):
        storage.get(KEY)


def test_an_unreachable_store_fails_within_seconds(aws_env: dict[str, str]) -> None:
    storage = S3Storage("bucket", endpoint_url=f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(StorageError) as caught:
        storage.put(KEY, b"x", "image/png")
    with pytest.raises(StorageError):
        storage.get(KEY)  # an outage is never reported as a missing image
    with pytest.raises(StorageError):
        storage.delete(KEY)
    assert caught.value.status == 503 and caught.value.type == "service_unavailable"
    # Connection refused, retried with short backoff: seconds, not botocore's minutes.
    assert time.monotonic() - started < 30


def test_store_down_fails_the_task_with_a_refund_and_never_shows_it_completed(
    api: InProcessApi, aws_env: dict[str, str]
) -> None:
    key = api.make_key(credits=40)
    r = api.client.post("/api/v1/images/generations", json=EXAMPLE_BODY, headers=auth(key))
    task_id = r.json()["data"]["task_id"]
    down = S3Storage("bucket", endpoint_url=f"http://127.0.0.1:{free_port()}")
    worker = Worker(settings=api.settings, db=api.db, storage=down, engine=FlakyEngine())
    run = threading.Thread(target=worker.run_once)
    run.start()
    seen = []
    while run.is_alive():
        task = api.client.get(f"/api/v1/tasks/{task_id}", headers=auth(key)).json()["data"]
        seen.append(task["status"])
        time.sleep(0.05)
    run.join()
    task = api.client.get(f"/api/v1/tasks/{task_id}", headers=auth(key)).json()["data"]
    assert "COMPLETED" not in seen
    assert task["status"] == "FAILED" and task["images"] == []
    assert task["error"]["message"] == "The images could not be stored."
    assert task["credits"] == {"charged": 4, "refunded": 4}
    acct = api.client.get("/api/v1/account", headers=auth(key)).json()["data"]
    assert acct["balance"] == 40


def test_previews_are_stored_in_the_bucket_and_served_from_it(
    tmp_path: Path,
    tiny_cache: Path,
    database_url: str,
    moto_s3: MotoServer,
    aws_env: dict[str, str],
) -> None:
    bucket = moto_s3.new_bucket()
    settings = make_settings(
        tmp_path,
        tiny_cache,
        database_url=database_url,
        storage_url=f"s3://{bucket}/cogview",
        s3_endpoint_url=moto_s3.endpoint_url,
    )
    with in_process_api(settings) as api:
        key = api.make_key(credits=40)
        task_id = submit_task(api.client, key, previews=1)  # hd: 2 steps, a preview after 1
        storage = open_storage(settings.storage_url, s3_endpoint_url=moto_s3.endpoint_url)
        worker = Worker(settings=settings, db=api.db, storage=storage, engine=FlakyEngine())
        assert worker.run_once()
        task = api.client.get(f"/api/v1/tasks/{task_id}", headers=auth(key)).json()["data"]
        (preview,) = task["previews"]
        got = api.client.get(preview["url"])  # proxied by the API from the bucket
    assert got.status_code == 200 and got.headers["content-type"] == "image/webp"
    (stored,) = [
        o["Key"]
        for o in moto_s3.client().list_objects_v2(Bucket=bucket)["Contents"]
        if "/preview-" in o["Key"]
    ]
    assert stored.startswith("cogview/") and stored.endswith(".webp")
    obj = moto_s3.client().get_object(Bucket=bucket, Key=stored)
    assert obj["ContentType"] == "image/webp" and obj["Body"].read() == got.content


@pytest.mark.e2e
def test_serve_on_postgres_stores_images_in_s3_and_serves_them_back(
    tmp_path: Path,
    tiny_cache: Path,
    pg_cluster: PgCluster,
    moto_s3: MotoServer,
    aws_env: dict[str, str],
) -> None:
    """The scale-out configuration: the database on PostgreSQL, the images in a bucket."""
    bucket = moto_s3.new_bucket()
    env = server_env(
        tiny_cache,
        {
            **aws_env,
            "COGVIEW_DATABASE_URL": pg_cluster.create_database(),
            "COGVIEW_STORAGE_URL": f"s3://{bucket}/cogview",
            "COGVIEW_S3_ENDPOINT_URL": moto_s3.endpoint_url,
            # The database and the bucket are under test, not the model: the echo engine
            # (no torch) draws the image.
            "COGVIEW_MODEL": "test-echo",
        },
    )
    server = ServerProcess(workdir=tmp_path, env=env, args=()).start()
    try:
        key = str(server.make_key(credits=40)["key"])
        with httpx.Client(base_url=server.base_url, timeout=90) as client:
            r = client.post(
                "/api/v1/images/generations",
                json=EXAMPLE_BODY,
                headers={**auth(key), "Prefer": "wait=60"},
            )
            task = r.json()["data"]
        assert task["status"] == "COMPLETED", task
        (image,) = task["images"]
        got = httpx.get(image["url"], timeout=30)  # proxied by the API from the bucket
        assert got.status_code == 200 and got.headers["content-type"] == "image/png"
        assert got.content.startswith(b"\x89PNG")
        listed = moto_s3.client().list_objects_v2(Bucket=bucket)["Contents"]
        (obj,) = listed
        assert obj["Key"].startswith("cogview/") and obj["Key"].endswith(".png")
        stored = moto_s3.client().get_object(Bucket=bucket, Key=obj["Key"])
        assert stored["Body"].read() == got.content
        assert stored["ContentType"] == "image/png"
        assert not list(tmp_path.rglob("*.png"))  # nothing written to a local folder
    finally:
        server.stop()
