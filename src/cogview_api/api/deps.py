"""Dependencies of the routes, as `Annotated` aliases so signatures read like declarations."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from cogview_api.api.present import ImageLinks
from cogview_api.config import Settings
from cogview_api.domain import ApiKey
from cogview_api.services import keys as key_service
from cogview_api.storage import ImageStorage
from cogview_api.store.db import Database


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_db(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


def get_storage(request: Request) -> ImageStorage:
    storage: ImageStorage = request.app.state.storage
    return storage


def bearer_secret(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None


async def get_current_key(request: Request) -> ApiKey:
    db = get_db(request)
    return await run_in_threadpool(key_service.authenticate, db, bearer_secret(request))


def base_url(request: Request) -> str:
    settings = get_settings(request)
    if settings.public_url:
        return settings.public_url.rstrip("/")
    return str(request.base_url).rstrip("/")


def image_links(request: Request) -> ImageLinks:
    return ImageLinks(base=base_url(request), presign=request.app.state.presign)


SettingsDep = Annotated[Settings, Depends(get_settings)]
DbDep = Annotated[Database, Depends(get_db)]
StorageDep = Annotated[ImageStorage, Depends(get_storage)]
CurrentKey = Annotated[ApiKey, Depends(get_current_key)]
# Routes call it `base`: where their image URLs point (this server, or presigned in the bucket).
BaseUrl = Annotated[ImageLinks, Depends(image_links)]
