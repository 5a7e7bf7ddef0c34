"""Image encoding: the engine hands PIL images, storage takes bytes."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from cogview_api.domain import DEFAULT_COMPRESSION, OutputFormat

if TYPE_CHECKING:
    from PIL.Image import Image


def encode_image(image: Image, fmt: OutputFormat, compression: int | None = None) -> bytes:
    """The image in `fmt`. `compression` (0..100, None: DEFAULT_COMPRESSION) is the JPEG or
    WebP encoder's quality, as OpenAI's `output_compression` means it: 100 keeps the most
    detail, 0 makes the smallest file. PNG is lossless and takes none."""
    quality = DEFAULT_COMPRESSION if compression is None else compression
    buf = io.BytesIO()
    if fmt == OutputFormat.PNG:
        image.save(buf, format="PNG")
    elif fmt == OutputFormat.JPEG:
        image.convert("RGB").save(buf, format="JPEG", quality=quality)
    elif fmt == OutputFormat.WEBP:
        image.save(buf, format="WEBP", quality=quality)
    else:
        raise ValueError(f"unknown output format {fmt!r}")
    return buf.getvalue()
