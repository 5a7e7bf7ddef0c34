"""Dependencies of the routes, as `Annotated` aliases so signatures read like declarations.

Every one is `async` and touches no database: FastAPI runs a plain `def` dependency on the
thread pool, one hop each, and a request should make at most one (its route's). The key behind
a bearer secret is checked by the service, in the same transaction as the data it reads.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query, Request

from cogview_api.api.present import ImageLinks
from cogview_api.api.serving import GenerationServing, bearer_secret
from cogview_api.config import Settings
from cogview_api.errors import AuthenticationFailed
from cogview_api.services.backends import Backends
from cogview_api.services.generation import STATUS_FILTERS


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_backends(request: Request) -> Backends:
    backends: Backends = request.app.state.backends
    return backends


async def get_serving(request: Request) -> GenerationServing:
    serving: GenerationServing = request.app.state.serving
    return serving


async def get_secret(request: Request) -> str:
    """The bearer secret, or 401 before anything else is looked at (the body included)."""
    secret = bearer_secret(request)
    if secret is None:
        raise AuthenticationFailed()
    return secret


async def image_links(request: Request) -> ImageLinks:
    serving: GenerationServing = request.app.state.serving
    return serving.links(request)


SettingsDep = Annotated[Settings, Depends(get_settings)]
# The database and the image storage, as one handle from the services (the API never imports
# the store or the storage): its parts go to the service functions.
BackendsDep = Annotated[Backends, Depends(get_backends)]
ServingDep = Annotated[GenerationServing, Depends(get_serving)]
# A bearer secret that is present; whose key it is, the service checks in its transaction.
Secret = Annotated[str, Depends(get_secret)]
# Routes call it `base`: where their image URLs point (this server, or presigned in the bucket).
BaseUrl = Annotated[ImageLinks, Depends(image_links)]

# A usage report's day range (native and admin), as the client wrote it: the service reads it
# (YYYY-MM-DD only, with its own messages).
From = Annotated[
    str | None,
    Query(
        alias="from",
        description="First UTC day, YYYY-MM-DD (default: 29 days before `to`).",
        json_schema_extra={"format": "date"},
    ),
]
To = Annotated[
    str | None,
    Query(
        alias="to",
        description="Last UTC day, YYYY-MM-DD, inclusive (default: today).",
        json_schema_extra={"format": "date"},
    ),
]


def _any_case(word: str) -> str:
    return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in word)


# A task status filter (task lists), matched in any case: described by a pattern, since an
# enum cannot say "any case"; made from, and checked with this API's messages by, the
# service's own table of statuses.
StatusFilter = Annotated[
    str | None,
    Query(
        description="`IN_PROGRESS`, `COMPLETED`, `FAILED` or `CANCELLED` (any case).",
        json_schema_extra={"pattern": "^(" + "|".join(_any_case(s) for s in STATUS_FILTERS) + ")$"},
    ),
]
