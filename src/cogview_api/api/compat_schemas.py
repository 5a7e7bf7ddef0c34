"""Wire schemas of the OpenAI- and Zhipu-compatible surfaces, named by role. Each request
schema turns into the same domain `GenerationRequest` as the native one."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from cogview_api.api.inputs import ModelName, OutputFormatName, Prompt, QualityName
from cogview_api.domain import (
    MAX_IMAGES_PER_REQUEST,
    MAX_PREVIEWS,
    MAX_USER_ID_CHARS,
    MODEL_NAMES,
    GenerationRequest,
    OutputFormat,
    Quality,
    Size,
    parse_size,
)
from cogview_api.errors import InvalidRequest

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

_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def _check_request_id(value: str) -> str:
    if not _REQUEST_ID_RE.fullmatch(value):
        raise ValueError("request_id must be 1 to 64 letters, digits or the characters - _ . :")
    return value


RequestId = Annotated[str, AfterValidator(_check_request_id)]


def _one_user(primary: tuple[str, str | None], alias: tuple[str, str | None]) -> str | None:
    """The end-user id of a body that may name it twice (a current field and an older one):
    either, or both when they agree; two different ids are a 400 on the current field."""
    (name, value), (alias_name, alias_value) = primary, alias
    if value is not None and alias_value is not None and value != alias_value:
        raise InvalidRequest(
            f"'{name}' and '{alias_name}' name different end users: send one of them.",
            param=name,
        )
    return value if value is not None else alias_value


# OpenAI's quality words onto ours: gpt-image's high/medium/low and auto, dall-e's hd/standard.
OPENAI_QUALITY = {
    "auto": Quality.HD,
    "high": Quality.HD,
    "hd": Quality.HD,
    "medium": Quality.STANDARD,
    "low": Quality.LOW,
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
    output_compression: int | None = Field(
        default=None,
        ge=0,
        le=100,
        description="JPEG/WebP quality 0..100 (100: the most detail). Default 92. "
        "Not with `png`, which is lossless.",
    )
    background: Literal["transparent", "opaque", "auto"] | None = Field(
        default=None,
        description="`opaque` or `auto` (= opaque). `transparent` is refused: CogView4 "
        "draws no alpha channel.",
    )
    moderation: Literal["low", "auto"] | None = Field(
        default=None,
        description="Accepted and has no effect: this server runs no moderation of its own.",
    )
    safety_identifier: UserTag | None = Field(
        default=None, description="Your end-user's id, stored as the task's `user_id`."
    )
    user: UserTag | None = Field(
        default=None, description="OpenAI's older name of `safety_identifier`."
    )
    stream: bool | None = Field(
        default=None,
        description="`true`: answer with OpenAI's image event stream (`text/event-stream`): "
        "`image_generation.partial_image` events, then one `image_generation.completed` "
        "event per image.",
    )
    partial_images: int | None = Field(
        default=None,
        ge=0,
        le=MAX_PREVIEWS,
        description="With `stream`: partial images (real previews of the first image as it "
        "forms, WebP) to stream before the result, 0..3; default 0. Free.",
    )

    def to_domain(self) -> GenerationRequest:
        if self.partial_images and not self.stream:
            raise InvalidRequest(
                "partial_images is for streaming: send it with stream: true, or leave it out.",
                param="partial_images",
            )
        if self.background == "transparent":
            raise InvalidRequest(
                "background 'transparent' is not supported: CogView4 draws opaque images. "
                "Use 'opaque' or 'auto'.",
                param="background",
            )
        output_format = self.output_format or OutputFormat.PNG
        if self.output_compression is not None and output_format is OutputFormat.PNG:
            raise InvalidRequest(
                "output_compression applies to jpeg and webp only; png is lossless.",
                param="output_compression",
            )
        return GenerationRequest(
            model=self.model or MODEL_NAMES[0],
            prompt=self.prompt,
            size=_size(self.size),
            quality=OPENAI_QUALITY[self.quality or "auto"],
            n=self.n or 1,
            output_format=output_format,
            output_compression=self.output_compression,
            user_id=_one_user(("safety_identifier", self.safety_identifier), ("user", self.user)),
            previews=(self.partial_images or 0) if self.stream else 0,
        )

    @property
    def answered_quality(self) -> str:
        """The `quality` of the answer: the word asked for, `auto` resolved (to `high`)."""
        return "high" if self.quality in (None, "auto") else self.quality


class OpenAIImage(BaseModel):
    """One of `data`: `url` or `b64_json`, never both (the other is left out of the JSON)."""

    url: str | None = None
    b64_json: str | None = None


class OpenAIUsage(BaseModel):
    """What a generation cost: images made and credits charged (not OpenAI's tokens: this
    server counts images and credits)."""

    images: int = Field(description="Images generated by this request.")
    credits: int = Field(description="Credits charged for them (4 per image by default).")


class OpenAIImagesResponse(BaseModel):
    """Server -> client: the answer of POST /v1/images/generations."""

    created: int
    data: list[OpenAIImage]
    background: Literal["opaque"] = "opaque"
    output_format: str = Field(description="`png`, `jpeg` or `webp`.")
    quality: str = Field(description="The quality asked for; `auto` answers `high`.")
    size: str = Field(description="`WxH` of the images, e.g. `1024x1024`.")
    usage: OpenAIUsage


class OpenAIModel(BaseModel):
    """One model this server serves, in OpenAI's shape."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time of the model's release.")
    owned_by: str


class OpenAIModelList(BaseModel):
    """Server -> client: the answer of GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[OpenAIModel]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorBody(BaseModel):
    """Every error on /v1/..."""

    error: OpenAIErrorDetail


class ZhipuSensitiveWordCheck(BaseModel):
    """Zhipu's `sensitive_word_check` object."""

    model_config = STRICT

    type: Literal["ALL"] = "ALL"
    status: Literal["ENABLE", "DISABLE"] = "ENABLE"


class ZhipuImageCreate(CompatImageCreate):
    """Client -> server: the body of POST /api/paas/v4/images/generations (Zhipu BigModel)."""

    model_config = STRICT

    model: ModelName
    prompt: Prompt
    quality: QualityName | None = Field(
        default=None, description="Default `standard`, as on Zhipu's platform."
    )
    size: SizeText | None = Field(default=None, description="`WxH`, default `1024x1024`.")
    n: int | None = Field(
        default=None, ge=1, le=MAX_IMAGES_PER_REQUEST, description="Images, 1..4; default 1."
    )
    user_id: UserTag | None = Field(default=None, description="Your end-user's id, stored.")
    user: UserTag | None = Field(
        default=None, description="Another name of `user_id` (LiteLLM sends it)."
    )
    request_id: RequestId | None = Field(
        default=None,
        description="Your id of this request, 1..64 of `A-Za-z0-9_.:-`: the answer's `id`. "
        "Not a retry key (that is the Idempotency-Key header).",
    )
    watermark_enabled: bool | None = Field(
        default=None,
        description="Accepted and has no effect: this server never adds a watermark.",
    )
    sensitive_word_check: ZhipuSensitiveWordCheck | None = Field(
        default=None,
        description="Accepted and has no effect: this server runs no word filter.",
    )

    def to_domain(self) -> GenerationRequest:
        return GenerationRequest(
            model=self.model,
            prompt=self.prompt,
            size=_size(self.size),
            quality=self.quality or Quality.STANDARD,
            n=self.n or 1,
            user_id=_one_user(("user_id", self.user_id), ("user", self.user)),
        )


class ZhipuImage(BaseModel):
    url: str


class ZhipuImagesResponse(BaseModel):
    """Server -> client: the answer of POST /api/paas/v4/images/generations."""

    id: str | None = Field(default=None, description="The request's `request_id`, when sent.")
    created: int
    data: list[ZhipuImage]


class ZhipuErrorDetail(BaseModel):
    code: str = Field(description="Zhipu's business code, e.g. `1214` (bad field).")
    message: str


class ZhipuErrorBody(BaseModel):
    """Every error on /api/paas/..."""

    error: ZhipuErrorDetail
