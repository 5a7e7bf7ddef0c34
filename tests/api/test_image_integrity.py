"""An image file damaged in storage is not served as an image (issue: hardening, finding 11):
each image carries its file's size and SHA-256 from when the worker stored it, the download
checks them, and the SHA-256 is the answer's ETag."""

from __future__ import annotations

import hashlib
from pathlib import Path

from cogview_api.store import tasks as task_store
from tests.support import EXAMPLE_BODY, InProcessApi, auth, complete_next_task


def test_a_damaged_image_file_is_refused_and_a_sound_one_has_its_sha256_as_etag(
    api: InProcessApi,
) -> None:
    key = api.make_key(credits=40)
    body = {**EXAMPLE_BODY, "size": "864x1152"}
    task_id = api.client.post("/api/v1/images/generations", json=body, headers=auth(key)).json()[
        "data"
    ]["task_id"]
    complete_next_task(api)
    (image,) = api.client.get(f"/api/v1/tasks/{task_id}", headers=auth(key)).json()["data"][
        "images"
    ]
    good = api.client.get(image["url"])
    assert good.status_code == 200 and good.headers["content-type"] == "image/png"
    digest = hashlib.sha256(good.content).hexdigest()
    assert good.headers["etag"] == f'"{digest}"'
    with api.db.read() as conn:
        stored = task_store.find_image(conn, image["url"].rsplit("/", 1)[1].split(".")[0])
    assert stored is not None and stored.size_bytes == len(good.content)
    (file,) = list(Path(api.settings.storage_url.removeprefix("file://")).rglob("*.png"))
    damaged = bytearray(file.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # one flipped byte, same length
    file.write_bytes(bytes(damaged))
    bad = api.client.get(image["url"])
    assert bad.status_code == 404, bad.headers
    assert bad.headers["content-type"].startswith("application/json")
    assert "damaged" in bad.json()["error"]["message"]
    file.write_bytes(damaged[:-10])  # truncated
    assert api.client.get(image["url"]).status_code == 404
