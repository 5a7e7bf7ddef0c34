"""Request-body checks shared by every surface (native, OpenAI, Zhipu)."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import Request
from pydantic import AfterValidator

from cogview_api.domain import MAX_PROMPT_CHARS, MODEL_NAMES
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
