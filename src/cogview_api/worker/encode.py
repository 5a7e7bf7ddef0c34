"""Image encoding: the engine hands PIL images, storage takes bytes."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL.Image import Image


def encode_image(image: Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG")
    elif fmt == "jpeg":
        image.convert("RGB").save(buf, format="JPEG", quality=92)
    elif fmt == "webp":
        image.save(buf, format="WEBP", quality=92)
    else:
        raise ValueError(f"unknown output format {fmt!r}")
    return buf.getvalue()
