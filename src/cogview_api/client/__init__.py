"""The Python client of a cogview-api server: `Client` (sync) and `AsyncClient` (asyncio), on
httpx. It speaks HTTP only and imports nothing of the server, so `pip install cogview-api`
without the `engine` extra (no torch) is enough to use it.

    from cogview_api.client import Client

    with Client("http://127.0.0.1:8000", api_key="cv4_...") as client:
        task = client.generate("a lighthouse at dawn", size="512*512", quality="standard")
        client.download(task.images[0], "lighthouse.png")

Guide with runnable examples: docs/client.md.
"""

from cogview_api.client._async import AsyncClient
from cogview_api.client._errors import (
    APIError,
    AuthenticationError,
    BadRequest,
    CogviewError,
    Conflict,
    ConnectionError,
    InsufficientCredits,
    NotFound,
    PermissionDenied,
    RateLimited,
    RequestTooLarge,
    ServerError,
    ServiceUnavailable,
    TaskFailed,
    TimeoutError,
)
from cogview_api.client._models import (
    Account,
    Batch,
    BatchCounts,
    BatchImages,
    BatchPage,
    Credits,
    ErrorInfo,
    GenerationRequest,
    Image,
    Preview,
    Progress,
    ServerInfo,
    Submitted,
    Task,
    TaskPage,
    TaskRequest,
)
from cogview_api.client._sync import Client

__all__ = [
    "APIError",
    "Account",
    "AsyncClient",
    "AuthenticationError",
    "BadRequest",
    "Batch",
    "BatchCounts",
    "BatchImages",
    "BatchPage",
    "Client",
    "CogviewError",
    "Conflict",
    "ConnectionError",
    "Credits",
    "ErrorInfo",
    "GenerationRequest",
    "Image",
    "InsufficientCredits",
    "NotFound",
    "PermissionDenied",
    "Preview",
    "Progress",
    "RateLimited",
    "RequestTooLarge",
    "ServerError",
    "ServerInfo",
    "ServiceUnavailable",
    "Submitted",
    "Task",
    "TaskFailed",
    "TaskPage",
    "TaskRequest",
    "TimeoutError",
]
