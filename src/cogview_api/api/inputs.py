"""Request-body checks shared by every surface (native, OpenAI, Zhipu)."""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Annotated, Any

from fastapi import Request
from pydantic import AfterValidator, GetCoreSchemaHandler
from pydantic_core import CoreSchema, core_schema

from cogview_api.domain import (
    MAX_PROMPT_CHARS,
    MODEL_NAMES,
    NATIVE_QUALITIES,
    DeliveryState,
    OutputFormat,
    Quality,
    Stage,
    WebhookEvent,
)
from cogview_api.errors import InvalidRequest


def parse_json_object(request: Request, body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or InvalidRequest saying what is wrong with it."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise InvalidRequest("Content-Type must be application/json.")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"Request body is not valid JSON: {exc}.") from exc
    except ValueError as exc:  # an integer past Python's 4,300 digits: no field takes one
        raise InvalidRequest("Request body has a number of too many digits.") from exc
    except RecursionError as exc:
        raise InvalidRequest("Request body is nested too deeply.") from exc
    if not isinstance(data, dict):
        raise InvalidRequest("Request body must be a JSON object.")
    return data


def check_model(value: str) -> str:
    if value not in MODEL_NAMES:
        raise ValueError("model must be one of " + ", ".join(MODEL_NAMES))
    return value


def clean_prompt(value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError("prompt must not be empty")
    if len(value) > MAX_PROMPT_CHARS:
        raise ValueError(f"prompt must be at most {MAX_PROMPT_CHARS} characters")
    return value


ModelName = Annotated[str, AfterValidator(check_model)]
Prompt = Annotated[str, AfterValidator(clean_prompt)]


class OneOf:
    """A field whose values are a domain `StrEnum`'s, validated as a `Literal` of them would be:
    with Literal's error message, also in strict models (which otherwise take only members from
    Python input), and described inline (`{"enum": [...], "type": "string"}`) in the JSON
    schema. So the list of values is the enum's, not a copy.

    On a field typed by the enum itself the value becomes the member. Response fields are typed
    `str` (a member is one): FastAPI would otherwise add the enum to /openapi.json's components
    as a schema nothing refers to."""

    def __init__(self, enum: type[StrEnum], only: tuple[StrEnum, ...] | None = None) -> None:
        self.enum = enum
        self.members = only if only is not None else tuple(enum)

    def __get_pydantic_core_schema__(
        self, source: type[object], handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        values = core_schema.literal_schema([member.value for member in self.members])
        if source is self.enum:
            return core_schema.no_info_after_validator_function(self.enum, values)
        return values


# Request fields: the domain's members once validated.
QualityName = Annotated[Quality, OneOf(Quality, NATIVE_QUALITIES)]
OutputFormatName = Annotated[OutputFormat, OneOf(OutputFormat)]
# Response fields: the wire strings of the domain's members.
StageName = Annotated[str, OneOf(Stage)]
WebhookEventName = Annotated[str, OneOf(WebhookEvent)]
DeliveryStateName = Annotated[str, OneOf(DeliveryState)]
