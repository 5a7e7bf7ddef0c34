"""Image media types: the content type of each output format, as stored and as served.

A leaf: the worker stores the bytes under this type and `/images/...` answers with it, and
neither imports the other for it.
"""

from __future__ import annotations

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
