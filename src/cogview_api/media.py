"""Image media types: the content type of each output format, as stored and as served.

A leaf: the worker stores the bytes under this type and `/images/...` answers with it, and
neither imports the other for it.
"""

from __future__ import annotations

from cogview_api.domain import OutputFormat

CONTENT_TYPES: dict[OutputFormat, str] = {
    OutputFormat.PNG: "image/png",
    OutputFormat.JPEG: "image/jpeg",
    OutputFormat.WEBP: "image/webp",
}
