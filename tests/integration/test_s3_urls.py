"""Image URLs with images in S3 (moto's S3 server, a real HTTP endpoint): proxied by the API or
presigned in the bucket (COGVIEW_IMAGE_URLS), and retention cleanup that empties the bucket.

moto accepts unsigned requests and does not check query-string signatures, so a download alone
would not show that a presigned URL is signed right: these tests also recompute its SigV4
signature from AWS's published algorithm, with the credentials and the host a client uses.
"""

from __future__ import annotations

import hashlib
import hmac
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import httpx
import pytest
from botocore.exceptions import ClientError
from pydantic import ValidationError
from sqlalchemy import select, update

from cogview_api.api.present import ImageLinks
from cogview_api.clock import utcnow
from cogview_api.config import Settings
from cogview_api.domain import ImageRecord
from cogview_api.services.images import presigner
from cogview_api.storage import PRESIGN_MAX_SECONDS, open_storage
from cogview_api.storage.s3 import S3Storage
from cogview_api.store.tables import images, tasks
from cogview_api.worker.loop import Worker
from tests.conftest import make_settings
from tests.integration.conftest import AWS_ENV, MotoServer
from tests.support import (
    CLI,
    FlakyEngine,
    InProcessApi,
    auth,
    free_port,
    in_process_api,
    server_env,
    submit_task,
)

PREFIX = "cogview"


@pytest.fixture
def bucket(moto_s3: MotoServer, aws_env: dict[str, str]) -> str:
    return moto_s3.new_bucket()


@contextmanager
def s3_api(
    tmp_path: Path, cache: Path, moto: MotoServer, bucket: str, **overrides: Any
) -> Iterator[InProcessApi]:
    settings = make_settings(
        tmp_path,
        cache,
        storage_url=f"s3://{bucket}/{PREFIX}",
        s3_endpoint_url=moto.endpoint_url,
        **overrides,
    )
    with in_process_api(settings) as api:
        yield api


def completed_task(api: InProcessApi, key: str) -> dict[str, Any]:
    """Submit the example body and run it with a stand-in engine into the API's bucket."""
    task_id = submit_task(api.client, key)
    storage = open_storage(api.settings.storage_url, s3_endpoint_url=api.settings.s3_endpoint_url)
    worker = Worker(settings=api.settings, db=api.db, storage=storage, engine=FlakyEngine())
    assert worker.run_once()
    task: dict[str, Any] = api.client.get(f"/api/v1/tasks/{task_id}", headers=auth(key)).json()[
        "data"
    ]
    assert task["status"] == "COMPLETED", task
    return task


def stored_object(moto: MotoServer, bucket: str) -> tuple[str, bytes]:
    (obj,) = moto.client().list_objects_v2(Bucket=bucket)["Contents"]
    body: bytes = moto.client().get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return obj["Key"], body


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def sigv4_signatures(url: str, secret: str) -> tuple[str, str]:
    """(the signature in a presigned GET URL, the one SigV4 gives for it): AWS's query-string
    signing, written out here so the check does not lean on botocore."""
    parts = urlsplit(url)
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    given = params.pop("X-Amz-Signature")
    assert params["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"
    assert params["X-Amz-SignedHeaders"] == "host"
    query = "&".join(
        f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(params.items())
    )
    canonical = "\n".join(
        ["GET", parts.path, query, f"host:{parts.netloc}", "", "host", "UNSIGNED-PAYLOAD"]
    )
    _, date, region, service, terminal = params["X-Amz-Credential"].split("/")
    scope = f"{date}/{region}/{service}/{terminal}"
    to_sign = "\n".join(
        [
            "AWS4-HMAC-SHA256",
            params["X-Amz-Date"],
            scope,
            hashlib.sha256(canonical.encode()).hexdigest(),
        ]
    )
    key = _hmac(("AWS4" + secret).encode(), date)
    for part in (region, service, terminal):
        key = _hmac(key, part)
    return given, hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


def query_of(url: str) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(url).query))


# -- the two modes, end to end -----------------------------------------------------------------


def test_proxied_url_serves_the_bytes_in_the_bucket(
    tmp_path: Path, tiny_cache: Path, moto_s3: MotoServer, bucket: str
) -> None:
    with s3_api(tmp_path, tiny_cache, moto_s3, bucket) as api:
        key = api.make_key(credits=40)
        (image,) = completed_task(api, key)["images"]
        assert image["url"].startswith(f"{api.base_url}/images/")
        _, stored = stored_object(moto_s3, bucket)
        got = httpx.get(image["url"], timeout=30)  # no key: the URL is the secret
        assert got.status_code == 200 and got.headers["content-type"] == "image/png"
        assert got.content == stored and stored.startswith(b"\x89PNG")


def test_presigned_url_downloads_the_same_bytes_without_credentials(
    tmp_path: Path, tiny_cache: Path, moto_s3: MotoServer, bucket: str
) -> None:
    with s3_api(tmp_path, tiny_cache, moto_s3, bucket, image_urls="presigned") as api:
        key = api.make_key(credits=40)
        task = completed_task(api, key)
        (image,) = task["images"]
        object_key, stored = stored_object(moto_s3, bucket)
        url = image["url"]
        assert url.startswith(f"{moto_s3.endpoint_url}/{bucket}/{object_key}?")
        given, expected = sigv4_signatures(url, AWS_ENV["AWS_SECRET_ACCESS_KEY"])
        assert given == expected
        # Valid for the image's remaining retention (7 days by default: SigV4's maximum too).
        assert PRESIGN_MAX_SECONDS - 60 < int(query_of(url)["X-Amz-Expires"]) <= PRESIGN_MAX_SECONDS
        got = httpx.get(url, timeout=30)  # a plain GET: no credentials, no key
        assert got.status_code == 200 and got.content == stored


def test_presigned_expiry_is_the_remaining_retention_capped_at_seven_days(
    moto_s3: MotoServer, bucket: str
) -> None:
    storage = S3Storage(bucket, PREFIX, endpoint_url=moto_s3.endpoint_url)
    links = ImageLinks(base="http://api.test", presign=presigner("presigned", storage))
    image = ImageRecord(
        token="tok", index=0, width=8, height=8, seed=1, format="png", storage_key="a/0-tok.png"
    )

    def expires_in(after: timedelta) -> int:
        url = links.url(image, utcnow() + after)
        assert url.startswith(f"{moto_s3.endpoint_url}/{bucket}/{PREFIX}/a/0-tok.png?")
        return int(query_of(url)["X-Amz-Expires"])

    assert 3590 <= expires_in(timedelta(hours=1)) <= 3600
    assert expires_in(timedelta(days=30)) == PRESIGN_MAX_SECONDS  # the cap: poll again later
    # Past its retention an image gets the API's URL, which answers 404 like any expired image.
    assert links.url(image, utcnow() - timedelta(seconds=1)) == "http://api.test/images/tok.png"
    with pytest.raises(ValueError):
        storage.presigned_url("a/0-tok.png", PRESIGN_MAX_SECONDS + 1)


def test_presigned_urls_name_the_public_endpoint_when_one_is_set(
    moto_s3: MotoServer, bucket: str
) -> None:
    """The API reaches the store at one address, clients at another (compose: minio:9000 vs
    localhost:9000). The signature covers the host, so it must be signed for the public one."""
    S3Storage(bucket, PREFIX, endpoint_url=moto_s3.endpoint_url).put("k.png", b"bytes", "image/png")
    internal = f"http://127.0.0.1:{free_port()}"  # nothing listens: signing needs no request
    storage = S3Storage(
        bucket, PREFIX, endpoint_url=internal, public_endpoint_url=moto_s3.endpoint_url
    )
    url = storage.presigned_url("k.png", 600)
    assert url.startswith(f"{moto_s3.endpoint_url}/{bucket}/{PREFIX}/k.png?")
    given, expected = sigv4_signatures(url, AWS_ENV["AWS_SECRET_ACCESS_KEY"])
    assert given == expected
    assert httpx.get(url, timeout=30).content == b"bytes"


# -- refused at start ----------------------------------------------------------------------


def test_presigned_with_local_files_is_refused_at_start(tmp_path: Path, tiny_cache: Path) -> None:
    with pytest.raises(ValidationError, match="COGVIEW_IMAGE_URLS=presigned needs images in S3"):
        Settings(storage_url=f"file://{tmp_path}/images", image_urls="presigned")
    env = server_env(tiny_cache, {"COGVIEW_IMAGE_URLS": "presigned"})
    done = subprocess.run(
        [*CLI, "serve", "--workers", "0", "--port", str(free_port())],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "cogview-api: COGVIEW_IMAGE_URLS=presigned needs images in S3 "
        "(COGVIEW_STORAGE_URL=s3://...); with local files use COGVIEW_IMAGE_URLS=proxy."
    ]
    assert not (tmp_path / "cogview-data").exists()  # stopped before touching anything


# -- retention ---------------------------------------------------------------------------------


def test_retention_cleanup_deletes_the_objects_and_expires_the_urls(
    tmp_path: Path, tiny_cache: Path, moto_s3: MotoServer, bucket: str, database_url: str
) -> None:
    with s3_api(
        tmp_path, tiny_cache, moto_s3, bucket, image_urls="presigned", database_url=database_url
    ) as api:
        key = api.make_key(credits=40)
        task = completed_task(api, key)
        presigned = task["images"][0]["url"]
        object_key, _ = stored_object(moto_s3, bucket)
        with api.db.read() as conn:
            (token, fmt) = conn.execute(
                select(images.c.token, images.c.format).where(images.c.task_id == task["task_id"])
            ).one()
        proxied = f"{api.base_url}/images/{token}.{fmt}"
        assert httpx.get(proxied, timeout=30).status_code == 200

        # The retention has passed: move the expiry into the past instead of waiting for it.
        past = utcnow() - timedelta(seconds=5)
        with api.db.write() as conn:
            conn.execute(update(images).where(images.c.token == token).values(expires_at=past))
            conn.execute(update(tasks).where(tasks.c.id == task["task_id"]).values(expires_at=past))
        storage = open_storage(api.settings.storage_url, s3_endpoint_url=moto_s3.endpoint_url)
        worker = Worker(settings=api.settings, db=api.db, storage=storage, engine=FlakyEngine())
        # A new worker cleans up on its first pass; pin that here rather than lean on the
        # machine's uptime exceeding the cleanup interval (the clock is time.monotonic()).
        worker._last_cleanup = float("-inf")
        assert worker.run_once() is False  # housekeeping only: nothing waits

        with pytest.raises(ClientError) as gone:
            moto_s3.client().head_object(Bucket=bucket, Key=object_key)
        assert gone.value.response["Error"]["Code"] == "404"
        with api.db.read() as conn:
            deleted_at = conn.execute(
                select(images.c.deleted_at).where(images.c.token == token)
            ).scalar_one()
        assert deleted_at is not None
        r = httpx.get(proxied, timeout=30)
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
        assert httpx.get(presigned, timeout=30).status_code == 404  # the object is gone
        # The task now links to the API's URL, which answers 404 the same way.
        after = api.client.get(f"/api/v1/tasks/{task['task_id']}", headers=auth(key))
        if after.status_code == 200:
            (image,) = after.json()["data"]["images"]
            assert image["url"] == proxied
