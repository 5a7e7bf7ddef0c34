"""Image encoding: the engine hands PIL images, storage takes bytes."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from cogview_api.domain import OutputFormat

if TYPE_CHECKING:
    from PIL.Image import Image


def encode_image(image: Image, fmt: OutputFormat) -> bytes:
    buf = io.BytesIO()
    if fmt == OutputFormat.PNG:
        image.save(buf, format="PNG")
    elif fmt == OutputFormat.JPEG:
        image.convert("RGB").save(buf, format="JPEG", quality=92)
    elif fmt == OutputFormat.WEBP:
        image.save(buf, format="WEBP", quality=92)
    else:
        raise ValueError(f"unknown output format {fmt!r}")
    return buf.getvalue()
