"""Wire schemas of the OpenAI- and Zhipu-compatible surfaces, named by role. Each request
schema turns into the same domain `GenerationRequest` as the native one."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from cogview_api.api.inputs import ModelName, OutputFormatName, Prompt, QualityName
from cogview_api.domain import (
    MAX_IMAGES_PER_REQUEST,
    MAX_USER_ID_CHARS,
    MODEL_NAMES,
    GenerationRequest,
    OutputFormat,
    Quality,
    Size,
    parse_size,
)

DEFAULT_SIZE = Size(1024, 1024)


def _check_size(value: str) -> str:
    parse_size(value)
    return value


def _check_openai_size(value: str) -> str:
    return value if value == "auto" else _check_size(value)


def _size(value: str | None) -> Size:
    return DEFAULT_SIZE if value in (None, "auto") else parse_size(value)


SizeText = Annotated[str, AfterValidator(_check_size)]
OpenAISizeText = Annotated[str, AfterValidator(_check_openai_size)]
UserTag = Annotated[str, Field(max_length=MAX_USER_ID_CHARS)]

# OpenAI's quality words onto ours: gpt-image's high/medium/low and auto, dall-e's hd/standard.
OPENAI_QUALITY = {
    "auto": Quality.HD,
    "high": Quality.HD,
    "hd": Quality.HD,
    "medium": Quality.STANDARD,
    "low": Quality.STANDARD,
    "standard": Quality.STANDARD,
}

STRICT = ConfigDict(extra="forbid", strict=True)


class CompatImageCreate(BaseModel):
    """A synchronous compat surface's request body: whatever its fields, it names one
    generation in our domain terms."""

    def to_domain(self) -> GenerationRequest:
        raise NotImplementedError


class OpenAIImageCreate(CompatImageCreate):
    """Client -> server: the body of POST /v1/images/generations (OpenAI Images API).
    `null` means "the default", as it does for OpenAI."""

    model_config = STRICT

    model: ModelName | None = Field(default=None, description="Default `cogview-4`.")
    prompt: Prompt
    n: int | None = Field(default=None, ge=1, le=MAX_IMAGES_PER_REQUEST)
    size: OpenAISizeText | None = Field(default=None, description="`WxH`; `auto` = `1024x1024`.")
    quality: Literal["auto", "high", "hd", "medium", "low", "standard"] | None = None
    response_format: Literal["url", "b64_json"] | None = None
    output_format: OutputFormatName | None = None
    user: UserTag | None = None

    def to_domain(self) -> GenerationRequest:
        return GenerationRequest(
            model=self.model or MODEL_NAMES[0],
            prompt=self.prompt,
            size=_size(self.size),
            quality=OPENAI_QUALITY[self.quality or "auto"],
            n=self.n or 1,
            output_format=self.output_format or OutputFormat.PNG,
            user_id=self.user,
        )


class OpenAIImage(BaseModel):
    """One of `data`: `url` or `b64_json`, never both (the other is left out of the JSON)."""

    url: str | None = None
    b64_json: str | None = None


class OpenAIImagesResponse(BaseModel):
    """Server -> client: the answer of POST /v1/images/generations."""

    created: int
    data: list[OpenAIImage]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorBody(BaseModel):
    """Every error on /v1/..."""

    error: OpenAIErrorDetail


class ZhipuImageCreate(CompatImageCreate):
    """Client -> server: the body of POST /api/paas/v4/images/generations (Zhipu BigModel)."""

    model_config = STRICT

    model: ModelName
    prompt: Prompt
    quality: QualityName | None = Field(
        default=None, description="Default `standard`, as on Zhipu's platform."
    )
    size: SizeText | None = Field(default=None, description="`WxH`, default `1024x1024`.")
    user_id: UserTag | None = None

    def to_domain(self) -> GenerationRequest:
        return GenerationRequest(
            model=self.model,
            prompt=self.prompt,
            size=_size(self.size),
            quality=self.quality or Quality.STANDARD,
            n=1,
            user_id=self.user_id,
        )


class ZhipuImage(BaseModel):
    url: str


class ZhipuImagesResponse(BaseModel):
    """Server -> client: the answer of POST /api/paas/v4/images/generations."""

    created: int
    data: list[ZhipuImage]


class ZhipuErrorDetail(BaseModel):
    code: str = Field(description="Zhipu's business code, e.g. `1214` (bad field).")
    message: str


class ZhipuErrorBody(BaseModel):
    """Every error on /api/paas/..."""

    error: ZhipuErrorDetail
