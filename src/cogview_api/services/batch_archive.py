"""A batch's archive: a ZIP of its finished images and a manifest, built as it is sent.

stream-zip writes each member as its bytes come and the central directory at the end, so the
archive is never whole anywhere: the batch's lines are read from the database a page at a time,
and each image is read from storage (local folder or S3) only when its turn comes, one at a
time. Images are stored as they are (PNG, JPEG and WebP are compressed already), with their
size and CRC-32 known before their header is written (ZIP64, so an archive may pass 4 GiB).
What the archive holds is what had finished when its lines were read: it may be fetched at
any time. The manifest comes last, one JSON line per task in line order, naming the files of
each task that are in the archive (an image no longer kept, expired, is left out of both).
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

from stream_zip import NO_COMPRESSION_64, ZIP_64, Method, stream_zip

from cogview_api.clock import utcnow
from cogview_api.domain import Batch, Size, TaskState
from cogview_api.services.batches import archive_page
from cogview_api.storage import ImageStorage
from cogview_api.store.batches import ArchiveEntry
from cogview_api.store.db import Database

log = logging.getLogger(__name__)

PAGE = 200  # lines read from the database at a time
MANIFEST = "manifest.jsonl"
_FILE_MODE = 0o100644  # a regular file, rw-r--r--

Member = tuple[str, datetime, int, Method, Iterable[bytes]]


def image_name(index: int, k: int, fmt: str) -> str:
    """An image's name in the archive: its line (5 digits) and its index in the task."""
    ext = "jpg" if fmt == "jpeg" else fmt
    return f"images/{index:05d}-{k}.{ext}"


def archive_chunks(db: Database, storage: ImageStorage, batch: Batch) -> Iterator[bytes]:
    """The ZIP's bytes, in chunks, for a batch whose key was checked."""
    return iter(stream_zip(_members(db, storage, batch)))


def _members(db: Database, storage: ImageStorage, batch: Batch) -> Iterator[Member]:
    now = utcnow()
    manifest: list[str] = []  # one short line per task: text only, never an image
    after = -1
    while True:
        page = archive_page(db, batch_id=batch.id, after_index=after, limit=PAGE)
        if not page:
            break
        for entry in page:
            files: list[str] = []
            for k, fmt, storage_key in entry.images:
                data = storage.get(storage_key)
                if data is None:  # expired and deleted since the page was read
                    continue
                name = image_name(entry.index, k, fmt)
                files.append(name)
                method = NO_COMPRESSION_64(len(data), zlib.crc32(data))
                yield name, now, _FILE_MODE, method, (data,)
                del data
            manifest.append(json.dumps(_manifest_line(entry, files), ensure_ascii=False))
        after = page[-1].index
    yield MANIFEST, now, _FILE_MODE, ZIP_64, _encoded(manifest)


def _encoded(lines: list[str]) -> Iterator[bytes]:
    for line in lines:
        yield (line + "\n").encode()


def _manifest_line(entry: ArchiveEntry, files: list[str]) -> dict[str, Any]:
    return {
        "index": entry.index,
        "task_id": entry.task_id,
        "status": entry.state.wire_status,
        "prompt": entry.prompt,
        "size": str(Size(entry.width, entry.height)),
        # Its first image's seed; before it has images, the seed it asked for, if any.
        "seed": entry.seeds[0] if entry.state is TaskState.COMPLETED or entry.seed_given else None,
        "files": files,
        "error": entry.error,
    }
