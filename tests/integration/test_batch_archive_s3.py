"""A batch's archive with its images in S3 (moto's S3 server, a real HTTP endpoint): each image
is read from the bucket when its turn comes, and the ZIP holds the bucket's bytes."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

from cogview_api.storage import open_storage
from cogview_api.worker.loop import Worker
from tests.integration.conftest import MotoServer
from tests.integration.test_s3_urls import PREFIX, bucket, s3_api
from tests.support import FlakyEngine, auth

__all__ = ["bucket"]  # the fixture, from test_s3_urls

LINES = [
    {"model": "cogview-4", "prompt": "a red fox", "size": "512*512", "n": 2},
    {"model": "cogview-4", "prompt": "a lighthouse", "size": "512*512", "output_format": "webp"},
]


def test_the_archive_reads_each_image_from_the_bucket(
    tmp_path: Path, tiny_cache: Path, moto_s3: MotoServer, bucket: str
) -> None:
    with s3_api(tmp_path, tiny_cache, moto_s3, bucket) as api:
        key = api.make_key(credits=100)
        r = api.client.post("/api/v1/batches", json={"requests": LINES}, headers=auth(key))
        assert r.status_code == 200, r.text
        batch_id = r.json()["data"]["batch_id"]
        storage = open_storage(
            api.settings.storage_url, s3_endpoint_url=api.settings.s3_endpoint_url
        )
        worker = Worker(settings=api.settings, db=api.db, storage=storage, engine=FlakyEngine())
        while worker.run_once():
            pass
        r = api.client.get(f"/api/v1/batches/{batch_id}/archive", headers=auth(key))
        assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
        tasks = api.client.get(f"/api/v1/batches/{batch_id}/tasks", headers=auth(key)).json()[
            "data"
        ]["tasks"]
    archive = zipfile.ZipFile(io.BytesIO(r.content))
    assert archive.namelist() == [
        "images/00000-0.png",
        "images/00000-1.png",
        "images/00001-0.webp",
        "manifest.jsonl",
    ]
    objects = moto_s3.client().list_objects_v2(Bucket=bucket, Prefix=PREFIX)["Contents"]
    in_bucket = sorted(
        moto_s3.client().get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in objects
    )
    assert len(in_bucket) == 3  # FlakyEngine's images are all one gray: compared as a multiset
    assert sorted(archive.read(n) for n in archive.namelist()[:3]) == in_bucket
    manifest = [json.loads(x) for x in archive.read("manifest.jsonl").decode().splitlines()]
    assert [m["task_id"] for m in manifest] == [t["task_id"] for t in tasks]
    assert [m["files"] for m in manifest] == [
        ["images/00000-0.png", "images/00000-1.png"],
        ["images/00001-0.webp"],
    ]
