"""The OpenAPI description (/openapi.json) and the Swagger UI page that renders it (/docs).

/docs is served entirely by this app: the page from FastAPI's `get_swagger_ui_html`, and
Swagger UI's script, stylesheet and icon from the `swagger-ui-py` package's copy of the
`swagger-ui-dist` files, under /docs/assets/. Nothing is loaded from a CDN, so the page works
on a machine with no internet and leaks nothing about who reads it.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from cogview_api.api import examples
from cogview_api.api.compat_schemas import OpenAIErrorBody, ZhipuErrorBody
from cogview_api.api.errors import ENVELOPES, Surface
from cogview_api.api.idempotency import OPENAPI_ANSWER_HEADER, OPENAPI_PARAMETER
from cogview_api.api.schemas import ErrorBody

DOCS_PATH = "/docs"
ASSETS_PATH = "/docs/assets"
BEARER = "bearerAuth"
ADMIN_BEARER = "adminToken"
ADMIN_TAG = "admin"
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
# FastAPI encodes the schema with exclude_none, which also drops every null *inside* examples
# (and the answers have nulls: `"error": null`, `"param": null`). So examples travel as JSON
# text under these keys, and `describe` puts them back as `example` / `examples`.
_EXAMPLE_JSON = "x-example-json"
_EXAMPLES_JSON = "x-examples-json"

ERROR_BODIES: dict[Surface, type[BaseModel]] = {
    "native": ErrorBody,
    "openai": OpenAIErrorBody,
    "zhipu": ZhipuErrorBody,
}

# Per status: when this server answers it, and a sample (type, message, param) for the example,
# in the wire types of errors.py.
ERROR_DOCS: dict[int, tuple[str, tuple[str, str, str | None]]] = {
    400: (
        "Bad JSON, a bad or unknown field or header (`param` names it).",
        ("invalid_request", "Invalid 'size': width and height must be divisible by 16.", "size"),
    ),
    401: (
        "Missing or unknown API key.",
        ("authentication_error", "Invalid API key", None),
    ),
    402: (
        "The balance is below the price of the request.",
        (
            "insufficient_credits",
            "Insufficient credits: this request costs 8 credits and the key's balance is 4.",
            None,
        ),
    ),
    403: (
        "The API key was revoked.",
        ("permission_denied", "This API key has been revoked.", None),
    ),
    404: (
        "No such task (or it belongs to another key) or image.",
        ("not_found", f"No task with id '{examples.TASK_ID}'.", None),
    ),
    409: (
        "Conflict with the state of the task or of the Idempotency-Key.",
        (
            "conflict",
            "The task is already COMPLETED; only a task in progress can be cancelled.",
            None,
        ),
    ),
    413: (
        "The body is over 64 KiB.",
        ("request_too_large", "Request body is larger than 65536 bytes.", None),
    ),
    429: (
        "This key is over its submit rate (COGVIEW_SUBMIT_RATE, COGVIEW_SUBMIT_BURST) or already "
        "has its most tasks waiting (COGVIEW_MAX_WAITING_PER_KEY); nothing was charged. See "
        "`Retry-After` and the `RateLimit` headers.",
        (
            "rate_limit_exceeded",
            "This key may submit 10 times a second, 50 at most at once; submit again in 1 s.",
            None,
        ),
    ),
    500: (
        "A bug, or (synchronous routes) the task failed; its credits were refunded.",
        ("server_error", "Internal server error (request id 5f0c2a9e1b7d4c3a).", None),
    ),
    503: (
        "The queue is full, the database or the image store is unreachable, or no worker is "
        "ready; see `Retry-After`.",
        ("service_unavailable", "The queue is full; try again shortly.", None),
    ),
    504: (
        "(Synchronous routes) the task did not finish in time; it goes on, still charged.",
        ("timeout", f"Task {examples.TASK_ID} did not finish within 280 s.", None),
    ),
}


# The IETF RateLimit header fields (draft-ietf-httpapi-ratelimit-headers-11) of a submit's
# answer, taken or refused (api/errors.py `ratelimit_headers`).
RATELIMIT_HEADERS = {
    "RateLimit-Policy": {
        "description": "The key's limits, a Structured Field list: `submits` (`q` submits at "
        "once, earned back over `w` seconds) and `waiting` (`q` tasks waiting at once).",
        "schema": {"type": "string", "example": '"submits";q=50;w=5, "waiting";q=100'},
    },
    "RateLimit": {
        "description": "What is left of each: `r` submits (tasks) now, `t` seconds until the "
        "whole burst is back.",
        "schema": {"type": "string", "example": '"submits";r=49;t=1, "waiting";r=99'},
    },
}
RETRY_AFTER_HEADER = {
    "Retry-After": {
        "description": "Seconds to wait before trying again.",
        "schema": {"type": "integer", "minimum": 1},
    }
}


def example_media(example: Any = None, *, named: dict[str, Any] | None = None) -> dict[str, Any]:
    """The example part of a media type object: one `example`, or `named` examples
    (`{name: {"summary", "value"}}`, which Swagger UI offers in a menu)."""
    if named is not None:
        return {_EXAMPLES_JSON: json.dumps(named)}
    return {_EXAMPLE_JSON: json.dumps(example)}


def json_200(example: Any = None, *, named: dict[str, Any] | None = None) -> dict[str, Any]:
    """A `responses={200: ...}` entry carrying an example (or named examples) of the answer."""
    return {"content": {"application/json": example_media(example, named=named)}}


def error_responses(
    surface: Surface,
    *statuses: int,
    messages: dict[int, str] | None = None,
    params: dict[int, str | None] | None = None,
) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for the error statuses a route answers: the surface's envelope as
    schema, with an example built by the same function that builds the real answers (its
    message and `param` replaced where `messages` and `params` say)."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        description, (type_, message, param) = ERROR_DOCS[status]
        message = (messages or {}).get(status, message)
        param = (params or {}).get(status, param)
        example = ENVELOPES[surface](status, type_, message, param)
        out[status] = {
            "model": ERROR_BODIES[surface],
            "description": description,
            "content": {"application/json": example_media(example)},
        }
        if status == 429:
            out[status]["headers"] = {**RETRY_AFTER_HEADER, **RATELIMIT_HEADERS}
    return out


def sync_generation_docs(
    surface: Surface,
    *,
    body: type[BaseModel],
    request_examples: dict[str, Any],
    answer_example: Any,
) -> dict[str, Any]:
    """`responses=` and `openapi_extra=` of a synchronous compat route (OpenAI, Zhipu): its
    body schema and examples, the Idempotency-Key header, the answer, and the errors it can
    give in its surface's envelope (409 when the task was cancelled while the request waited,
    504 when it did not finish in time)."""
    responses: dict[int | str, dict[str, Any]] = {
        200: {
            **json_200(answer_example),
            "headers": {**OPENAPI_ANSWER_HEADER, **RATELIMIT_HEADERS},
        },
        **error_responses(
            surface,
            *(400, 401, 402, 403, 409, 413, 429, 500, 503, 504),
            messages={409: f"Task {examples.TASK_ID} was cancelled: Cancelled by the client."},
        ),
    }
    return {
        "responses": responses,
        "openapi_extra": {
            "parameters": [OPENAPI_PARAMETER],
            "requestBody": json_request_body(body, request_examples),
        },
    }


def json_request_body(body: type[BaseModel], named_examples: dict[str, Any]) -> dict[str, Any]:
    """The `requestBody` of a route that reads its JSON body itself (the serving object reads
    it after the key's check, from the raw bytes the Idempotency-Key hash needs), described
    from the same pydantic model that validates it, with its named examples."""
    media = {
        "schema": inline_refs(body.model_json_schema()),
        **example_media(named=named_examples),
    }
    return {"required": True, "content": {"application/json": media}}


def inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with each `{"$ref": "#/$defs/X"}` replaced by X itself and `$defs` dropped.
    pydantic points nested models at `#/$defs/...` of the model's own schema, which placed
    inside /openapi.json resolves from the document's root, where nothing is: code generators
    and schemathesis could not read `sensitive_word_check` of the Zhipu body. Used for every
    body a route describes itself (json_request_body, the batch route's). (No body model here
    refers to itself, so the substitution ends.)"""
    defs = schema.get("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                rest = {k: v for k, v in node.items() if k != "$ref"}
                return {**inline(defs[ref.removeprefix("#/$defs/")]), **inline(rest)}
            return {k: inline(v) for k, v in node.items() if k != "$defs"}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    result: dict[str, Any] = inline(schema)
    return result


def install_docs(app: FastAPI) -> None:
    """/openapi.json as `describe` builds it, and /docs with its assets from this app."""
    app.openapi = lambda: _cached_schema(app)  # type: ignore[method-assign]
    app.mount(ASSETS_PATH, StaticFiles(directory=swagger_ui_dir()), name="docs-assets")

    @app.get(DOCS_PATH, include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{app.title} - API reference",
            swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_PATH}/favicon-32x32.png",
            # Swagger UI would otherwise send the schema to validator.swagger.io for a badge.
            swagger_ui_parameters={"validatorUrl": None, "persistAuthorization": True},
        )


def swagger_ui_dir() -> Path:
    """Where `swagger-ui-py` keeps the swagger-ui-dist files, found without importing it (its
    package imports handlers for a dozen web frameworks)."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the swagger-ui-py package is missing: pip install swagger-ui-py")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


def _cached_schema(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is None:
        app.openapi_schema = describe(app)
    return app.openapi_schema


def describe(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, corrected where it would describe what this server does not do:
    validation errors are 400 in our envelope, never FastAPI's 422. And the operations that
    can answer 401 are the ones that need an API key: they get bearer auth, so Swagger UI's
    Authorize button applies to them."""
    schema = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
    )
    for operation in _operations(schema):
        operation["responses"].pop("422", None)
        if "401" in operation["responses"]:
            admin = ADMIN_TAG in operation.get("tags", ())
            operation["security"] = [{ADMIN_BEARER if admin else BEARER: []}]
        media_types = [
            *operation.get("requestBody", {}).get("content", {}).values(),
            *(m for r in operation["responses"].values() for m in r.get("content", {}).values()),
        ]
        for media in media_types:
            if _EXAMPLE_JSON in media:
                media["example"] = json.loads(media.pop(_EXAMPLE_JSON))
            if _EXAMPLES_JSON in media:
                media["examples"] = json.loads(media.pop(_EXAMPLES_JSON))
    components = schema.setdefault("components", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.get("schemas", {}).pop(unused, None)
    components["securitySchemes"] = {
        BEARER: {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key from `cogview-api keys create`: `Bearer cv4_...`.",
        }
    }
    if any(t.get("name") == ADMIN_TAG for t in schema.get("tags", ())) or any(
        ADMIN_TAG in op.get("tags", ()) for op in _operations(schema)
    ):
        components["securitySchemes"][ADMIN_BEARER] = {
            "type": "http",
            "scheme": "bearer",
            "description": "The operator's COGVIEW_ADMIN_TOKEN (admin routes only).",
        }
        schema["tags"] = [
            *schema.get("tags", ()),
            {
                "name": ADMIN_TAG,
                "description": "The operator's API (on while COGVIEW_ADMIN_TOKEN is set): keys, "
                "credits, usage reports, the ledger export and the audit log. Every call is "
                "recorded in the audit log under the token's name (COGVIEW_ADMIN_TOKEN_NAME).",
            },
        ]
    _add_links(schema)
    return schema


# The operations a created task or batch's id feeds, and where the id is in the creating
# answer: OpenAPI links, which clients' generators and schemathesis' stateful phase follow.
_LINKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "post /api/v1/images/generations": (
        "task_id",
        (
            "get /api/v1/tasks/{task_id}",
            "post /api/v1/tasks/{task_id}/cancel",
            "get /api/v1/tasks/{task_id}/events",
        ),
    ),
    "post /api/v1/batches": (
        "batch_id",
        (
            "get /api/v1/batches/{batch_id}",
            "get /api/v1/batches/{batch_id}/tasks",
            "post /api/v1/batches/{batch_id}/cancel",
            "get /api/v1/batches/{batch_id}/events",
            "get /api/v1/batches/{batch_id}/archive",
        ),
    ),
}


def _add_links(schema: dict[str, Any]) -> None:
    """Each creating operation's 200 links to the operations its id feeds (`_LINKS`), by
    their operationIds, with the id read from `data` of the answer."""
    paths = schema.get("paths", {})

    def operation(key: str) -> dict[str, Any] | None:
        method, path = key.split(" ", 1)
        found: dict[str, Any] | None = paths.get(path, {}).get(method)
        return found

    for source, (param, targets) in _LINKS.items():
        created = operation(source)
        if created is None or "200" not in created["responses"]:
            continue
        links = created["responses"]["200"].setdefault("links", {})
        for target in targets:
            op = operation(target)
            if op is not None:
                links[op["operationId"]] = {
                    "operationId": op["operationId"],
                    "parameters": {param: f"$response.body#/data/{param}"},
                    "description": f"The created {param.removesuffix('_id')}'s `{param}`.",
                }


def _operations(schema: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for item in schema.get("paths", {}).values():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                yield operation
