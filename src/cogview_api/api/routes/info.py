"""`GET /api/v1/info`: what this server offers (models, prices, sizes, limits), public.

The try-it page reads its price, model note and size rules from here rather than hard-coding
them, and a client can check a request before sending it. Nothing here is secret: it is what
docs/api.md says, with this server's settings filled in.
"""

from __future__ import annotations

from fastapi import APIRouter

from cogview_api import __version__
from cogview_api.api import examples
from cogview_api.api.deps import SettingsDep
from cogview_api.api.openapi import error_responses, json_200
from cogview_api.api.schemas import Envelope, ServerInfoPublic, SizeRules
from cogview_api.config import TINY_MODEL, Settings
from cogview_api.domain import (
    MAX_IMAGES_PER_REQUEST,
    MAX_PIXELS,
    MAX_PROMPT_CHARS,
    MAX_SIDE,
    MIN_SIDE,
    MODEL_NAMES,
    NATIVE_QUALITIES,
    PRESET_SIZES,
    SIDE_STEP,
    Quality,
)

router = APIRouter(prefix="/api/v1", tags=["native"])

# What a user trying this server should know about its images, by engine.
ENGINE_NOTES = {
    TINY_MODEL: "This server runs --model tiny: random weights, so its images are noise. That is "
    "expected: it is for tests and trying the API, not for art.",
    "test-echo": "This server runs the test-echo engine: its images are flat stand-ins made "
    "without a model, for tests only.",
}


def server_info(settings: Settings) -> ServerInfoPublic:
    return ServerInfoPublic(
        version=__version__,
        models=list(MODEL_NAMES),
        engine=settings.model,
        note=ENGINE_NOTES.get(settings.model),
        credits_per_image={q.value: settings.price_for(q) for q in NATIVE_QUALITIES},
        default_quality=Quality.HD.value,
        sizes=SizeRules(
            presets=[f"{w}*{h}" for w, h in PRESET_SIZES],
            min_side=MIN_SIDE,
            max_side=MAX_SIDE,
            side_multiple_of=SIDE_STEP,
            max_pixels=MAX_PIXELS,
        ),
        max_prompt_chars=MAX_PROMPT_CHARS,
        max_images_per_request=MAX_IMAGES_PER_REQUEST,
    )


@router.get(
    "/info",
    response_model=Envelope[ServerInfoPublic],
    responses={200: json_200(examples.INFO_ANSWER), **error_responses("native", 500)},
    summary="What this server offers (no key needed)",
    description="The models, the price per image by quality, the engine and its note (set "
    "when its images are not real CogView 4 output), the size presets and custom-size rules, "
    "and the request limits. Public: no `Authorization` needed.",
)
async def get_info(settings: SettingsDep) -> Envelope[ServerInfoPublic]:
    return Envelope[ServerInfoPublic](data=server_info(settings))
