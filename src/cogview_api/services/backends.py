"""The database and the image storage that the use cases run on, as one handle.

The composition roots (server.py, the app factory for `--http-processes`) open it; the API holds
it and hands its parts to the services, and never imports the store or the storage itself (the
api-data contract in .importlinter).
"""

from __future__ import annotations

from dataclasses import dataclass

from cogview_api.config import Settings
from cogview_api.storage import ImageStorage, open_storage
from cogview_api.store.db import Database


@dataclass(frozen=True)
class Backends:
    db: Database
    storage: ImageStorage

    @classmethod
    def open(
        cls,
        settings: Settings,
        *,
        db: Database | None = None,
        storage: ImageStorage | None = None,
    ) -> Backends:
        """The settings' database and storage; `db` and `storage`, when given, are used as they
        are (the server shares its own with its workers)."""
        return cls(
            db=db or Database(settings.database_url),
            storage=storage
            or open_storage(
                settings.storage_url,
                s3_endpoint_url=settings.s3_endpoint_url,
                s3_public_endpoint_url=settings.s3_public_endpoint_url,
            ),
        )
