"""The admin API, `/admin/v1`: keys, credits, usage, the ledger export and the audit log.

Mounted only while COGVIEW_ADMIN_TOKEN is set; every route needs that token as the bearer,
compared in constant time. Each call leaves an audit row naming the token
(COGVIEW_ADMIN_TOKEN_NAME). Bodies are read after the token's check, so a caller without it
learns nothing about what a route accepts.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse

from cogview_api.api import examples
from cogview_api.api.admin_schemas import (
    AuditEntryPublic,
    AuditPage,
    CreditChange,
    CreditMoved,
    KeyAdmin,
    KeyCreate,
    KeyCreated,
    KeyLimitsChange,
    KeyLimitsPublic,
    KeyList,
    WebhookSecretRotated,
)
from cogview_api.api.deps import BackendsDep, From, SettingsDep, To
from cogview_api.api.errors import invalid_from_validation
from cogview_api.api.inputs import parse_json_object
from cogview_api.api.openapi import (
    error_responses,
    example_media,
    json_200,
    json_request_body,
)
from cogview_api.api.present_usage import ledger_entry_public, ledger_page, usage_public
from cogview_api.api.schemas import Envelope, LedgerPage, UsageReportPublic
from cogview_api.api.serving import bearer_secret
from cogview_api.clock import utcnow
from cogview_api.domain import ApiKey
from cogview_api.errors import AuthenticationFailed, InvalidRequest, PermissionDenied
from cogview_api.services import audit
from cogview_api.services import keys as key_service
from cogview_api.services import limits as limit_service
from cogview_api.services import usage as usage_service
from cogview_api.services.backends import Backends

TAG = "admin"
INVALID_TOKEN = "Invalid admin token."
NOT_ADMIN = "An API key has no admin rights; the admin API takes COGVIEW_ADMIN_TOKEN."


async def admin_actor(request: Request, settings: SettingsDep, backends: BackendsDep) -> str:
    """The admin token's name, if the bearer is the admin token; 401 otherwise (403 for an
    API key, which is known but has no admin rights)."""
    token = settings.admin_token
    given = bearer_secret(request)
    if token is not None and given is not None:
        # Digests of equal length, so not even the token's length shows in the timing.
        if hmac.compare_digest(_digest(given), _digest(token)):
            return settings.admin_token_name
        if await run_in_threadpool(key_service.is_api_key, backends.db, given):
            raise PermissionDenied(NOT_ADMIN)
    raise AuthenticationFailed(INVALID_TOKEN)


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


Actor = Annotated[str, Depends(admin_actor)]
router = APIRouter(prefix="/admin/v1", tags=[TAG])

ERROR_MESSAGES = {
    401: INVALID_TOKEN,
    403: NOT_ADMIN,
    404: f"No key with id '{examples.KEY_ID}'.",
}


def errors(
    *statuses: int, bad: tuple[str, str] = ("limit", "limit must be between 1 and 100")
) -> dict[int | str, Any]:
    """The error answers of an admin route; `bad`: the `param` and message of its 400's
    example."""
    messages = {**ERROR_MESSAGES, 400: bad[1]}
    return error_responses(
        "native", 401, 403, *statuses, 500, 503, messages=messages, params={400: bad[0]}
    )


BAD_CREDITS = "Invalid 'credits': Input should be greater than or equal to 0."
BELOW_ZERO = (
    "Insufficient credits: the key has fewer than 40, and an adjustment never takes a balance "
    "below zero."
)

Body = TypeVar("Body", bound=BaseModel)


async def read_body(request: Request, schema: type[Body]) -> Body:
    data = parse_json_object(request, await request.body())
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise invalid_from_validation(exc) from exc


def key_admin(key: ApiKey) -> KeyAdmin:
    return KeyAdmin(
        id=key.id,
        name=key.name,
        prefix=key.prefix,
        balance=key.balance,
        created_at=key.created_at,
        revoked_at=key.revoked_at,
        revoked=key.revoked_at is not None,
        images_generated=key.images_generated,
        credits_spent=key.credits_spent,
    )


@router.post(
    "/keys",
    response_model=Envelope[KeyCreated],
    responses={
        200: json_200(examples.KEY_CREATED_ANSWER),
        **errors(400, 413, bad=("credits", BAD_CREDITS)),
    },
    openapi_extra={"requestBody": json_request_body(KeyCreate, examples.KEY_CREATE_REQUESTS)},
    summary="Create a key (its secrets are shown this once)",
)
async def create_key(request: Request, actor: Actor, backends: BackendsDep) -> Any:
    body = await read_body(request, KeyCreate)

    def create() -> tuple[ApiKey, str, str]:
        key, secret = key_service.create_key(
            backends.db, name=body.name, credits=body.credits, actor=actor
        )
        return key, secret, key_service.webhook_secret(backends.db, key.id)

    key, secret, signing = await run_in_threadpool(create)
    data = KeyCreated(**key_admin(key).model_dump(), key=secret, webhook_secret=signing)
    return Envelope[KeyCreated](data=data)


@router.get(
    "/keys",
    response_model=Envelope[KeyList],
    responses={200: json_200(examples.KEYS_ANSWER), **errors()},
    summary="List keys, oldest first",
)
async def list_keys(actor: Actor, backends: BackendsDep) -> Any:
    keys = await run_in_threadpool(lambda: key_service.list_keys(backends.db, actor=actor))
    return Envelope[KeyList](data=KeyList(keys=[key_admin(k) for k in keys]))


@router.get(
    "/keys/{key_id}",
    response_model=Envelope[KeyAdmin],
    responses={200: json_200(examples.KEY_ANSWER), **errors(404)},
    summary="Get a key",
)
async def get_key(key_id: str, actor: Actor, backends: BackendsDep) -> Any:
    key = await run_in_threadpool(lambda: key_service.get_key(backends.db, key_id, actor=actor))
    return Envelope[KeyAdmin](data=key_admin(key))


@router.post(
    "/keys/{key_id}/revoke",
    response_model=Envelope[KeyAdmin],
    responses={200: json_200(examples.KEY_REVOKED_ANSWER), **errors(404, 413)},
    summary="Revoke a key (its waiting and running tasks are cancelled and refunded)",
)
async def revoke_key(key_id: str, actor: Actor, backends: BackendsDep) -> Any:
    key = await run_in_threadpool(lambda: key_service.revoke_key(backends.db, key_id, actor=actor))
    return Envelope[KeyAdmin](data=key_admin(key))


@router.post(
    "/keys/{key_id}/webhook-secret",
    response_model=Envelope[WebhookSecretRotated],
    responses={200: json_200(examples.WEBHOOK_SECRET_ANSWER), **errors(404, 413)},
    summary="Rotate a key's webhook signing secret (the new one is shown this once)",
)
async def rotate_webhook_secret(key_id: str, actor: Actor, backends: BackendsDep) -> Any:
    secret = await run_in_threadpool(
        lambda: key_service.rotate_webhook_secret(backends.db, key_id, actor=actor)
    )
    return Envelope[WebhookSecretRotated](
        data=WebhookSecretRotated(key_id=key_id, webhook_secret=secret)
    )


BAD_BURST = f"The burst must be from 1 to {limit_service.MAX_SUBMIT_BURST} submits."
NO_LIMITS = "Give submit_rate, submit_burst, max_waiting, max_streams or max_waits, or reset: true."


def limits_public(limits: limit_service.KeyLimits) -> KeyLimitsPublic:
    return KeyLimitsPublic(
        key_id=limits.key_id,
        submit_rate=limits.submit_rate,
        submit_burst=limits.submit_burst,
        max_waiting=limits.max_waiting,
        max_streams=limits.max_streams,
        max_waits=limits.max_waits,
        own=sorted(limits.own),
    )


@router.get(
    "/keys/{key_id}/limits",
    response_model=Envelope[KeyLimitsPublic],
    responses={200: json_200(examples.KEY_LIMITS_ANSWER), **errors(404)},
    summary="A key's limits in effect (its own, or the server's settings)",
)
async def get_key_limits(
    key_id: str, actor: Actor, backends: BackendsDep, settings: SettingsDep
) -> Any:
    limits = await run_in_threadpool(
        lambda: limit_service.key_limits(backends.db, settings, key_id, actor=actor)
    )
    return Envelope[KeyLimitsPublic](data=limits_public(limits))


@router.put(
    "/keys/{key_id}/limits",
    response_model=Envelope[KeyLimitsPublic],
    responses={
        200: json_200(examples.KEY_LIMITS_ANSWER),
        **errors(400, 404, 413, bad=("submit_burst", BAD_BURST)),
    },
    openapi_extra={"requestBody": json_request_body(KeyLimitsChange, examples.KEY_LIMITS_REQUESTS)},
    summary="Set a key's own limits, or reset them to the settings' (from its next submit)",
)
async def put_key_limits(
    key_id: str, request: Request, actor: Actor, backends: BackendsDep, settings: SettingsDep
) -> Any:
    body = await read_body(request, KeyLimitsChange)
    values = (
        body.submit_rate,
        body.submit_burst,
        body.max_waiting,
        body.max_streams,
        body.max_waits,
    )
    if not body.reset and all(v is None for v in values):
        raise InvalidRequest(NO_LIMITS)
    limits = await run_in_threadpool(
        lambda: limit_service.set_key_limits(
            backends.db,
            settings,
            key_id,
            submit_rate=body.submit_rate,
            submit_burst=body.submit_burst,
            max_waiting=body.max_waiting,
            max_streams=body.max_streams,
            max_waits=body.max_waits,
            reset=body.reset,
            actor=actor,
        )
    )
    return Envelope[KeyLimitsPublic](data=limits_public(limits))


async def _move(
    request: Request, key_id: str, actor: str, backends: Backends, kind: key_service.CreditKind
) -> Envelope[CreditMoved]:
    body = await read_body(request, CreditChange)
    moved = await run_in_threadpool(
        lambda: key_service.move_credits(
            backends.db, key_id=key_id, amount=body.amount, kind=kind, note=body.note, actor=actor
        )
    )
    data = CreditMoved(key=key_admin(moved.key), entry=ledger_entry_public(moved.entry))
    return Envelope[CreditMoved](data=data)


@router.post(
    "/keys/{key_id}/credits/grant",
    response_model=Envelope[CreditMoved],
    responses={
        200: json_200(examples.CREDITS_ANSWER),
        **errors(400, 404, 413, bad=("amount", "amount of a grant must be positive")),
    },
    openapi_extra={"requestBody": json_request_body(CreditChange, examples.GRANT_REQUESTS)},
    summary="Grant credits (a `grant` ledger row; amount > 0)",
)
async def grant_credits(key_id: str, request: Request, actor: Actor, backends: BackendsDep) -> Any:
    return await _move(request, key_id, actor, backends, "grant")


@router.post(
    "/keys/{key_id}/credits/adjust",
    response_model=Envelope[CreditMoved],
    responses={
        200: json_200(examples.CREDITS_ANSWER),
        **errors(400, 404, 413, bad=("amount", BELOW_ZERO)),
    },
    openapi_extra={"requestBody": json_request_body(CreditChange, examples.ADJUST_REQUESTS)},
    summary="Adjust credits (an `adjust` ledger row; never below zero)",
)
async def adjust_credits(key_id: str, request: Request, actor: Actor, backends: BackendsDep) -> Any:
    return await _move(request, key_id, actor, backends, "adjust")


Limit = Annotated[int, Query(json_schema_extra={"minimum": 1, "maximum": 100})]
Cursor = Annotated[str | None, Query()]


# Dates are read by the service (YYYY-MM-DD only, with its own messages).
@router.get(
    "/keys/{key_id}/ledger",
    response_model=Envelope[LedgerPage],
    responses={200: json_200(examples.LEDGER_ANSWER), **errors(400, 404)},
    summary="A key's ledger, newest first",
)
async def key_ledger(
    key_id: str, actor: Actor, backends: BackendsDep, limit: Limit = 20, cursor: Cursor = None
) -> Any:
    rows, next_cursor = await run_in_threadpool(
        lambda: usage_service.ledger_of(
            backends.db, actor=actor, key_id=key_id, limit=limit, cursor=cursor
        )
    )
    return Envelope[LedgerPage](data=ledger_page(rows, next_cursor))


@router.get(
    "/usage",
    response_model=Envelope[UsageReportPublic],
    responses={
        200: json_200(examples.USAGE_ANSWER),
        **errors(400, 404, bad=("from", "from must not be after to")),
    },
    summary="Usage per key and day, by quality and surface",
)
async def usage(
    actor: Actor,
    backends: BackendsDep,
    start: From = None,
    end: To = None,
    key_id: Annotated[str | None, Query(description="Only this key's usage.")] = None,
) -> Any:
    report = await run_in_threadpool(
        lambda: usage_service.usage_report(
            backends.db, actor=actor, start=start, end=end, key_id=key_id
        )
    )
    return Envelope[UsageReportPublic](data=usage_public(report))


EXPORT_TYPES = {"csv": "text/csv; charset=utf-8", "jsonl": "application/x-ndjson"}


@router.get(
    "/ledger/export",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The ledger, oldest first, streamed: CSV with a header line, or "
            "JSON Lines (one entry per line).",
            "content": {
                "text/csv": {"schema": {"type": "string"}, **example_media(examples.LEDGER_CSV)},
                "application/x-ndjson": {
                    "schema": {"type": "string"},
                    **example_media(examples.LEDGER_JSONL),
                },
            },
        },
        **errors(400, 404, bad=("format", "format must be csv or jsonl")),
    },
    summary="Export the ledger (CSV or JSON Lines, streamed)",
)
async def export_ledger(
    actor: Actor,
    backends: BackendsDep,
    format: Annotated[str, Query(description="`csv` or `jsonl`.")] = "csv",  # noqa: A002
    key_id: Annotated[str | None, Query(description="Only this key's entries.")] = None,
    start: Annotated[
        str | None, Query(alias="from", description="First UTC day (default: all).")
    ] = None,
    end: Annotated[str | None, Query(alias="to", description="Last UTC day, inclusive.")] = None,
) -> StreamingResponse:
    lines = await run_in_threadpool(
        lambda: usage_service.export_ledger(
            backends.db,
            actor=actor,
            fmt=format,
            key_id=key_id,
            start=start,
            end=end,
        )
    )
    name = f"cogview-ledger-{utcnow():%Y%m%d-%H%M%S}.{format}"
    return StreamingResponse(
        lines,
        media_type=EXPORT_TYPES[format],
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


@router.get(
    "/audit",
    response_model=Envelope[AuditPage],
    responses={200: json_200(examples.AUDIT_ANSWER), **errors(400)},
    summary="The audit log of admin actions, newest first",
)
async def audit_log(
    actor: Actor,
    backends: BackendsDep,
    limit: Limit = 20,
    cursor: Cursor = None,
    key_id: Annotated[str | None, Query(description="Only actions on this key.")] = None,
) -> Any:
    entries, next_cursor = await run_in_threadpool(
        lambda: audit.audit_page(
            backends.db, actor=actor, limit=limit, cursor=cursor, key_id=key_id
        )
    )
    data = AuditPage(
        entries=[
            AuditEntryPublic(
                id=e.id, at=e.at, actor=e.actor, action=e.action, key_id=e.key_id, detail=e.detail
            )
            for e in entries
        ],
        next_cursor=next_cursor,
        has_more=next_cursor is not None,
    )
    return Envelope[AuditPage](data=data)
