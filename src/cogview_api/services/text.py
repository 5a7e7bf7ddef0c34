"""Text a database cannot hold, refused before it reaches one, the same on every backend."""

from __future__ import annotations

from cogview_api.errors import InvalidRequest


def refuse_unstorable_text(**fields: str | None) -> None:
    """InvalidRequest naming the first field with a NUL character (PostgreSQL cannot store one
    in text) or a lone surrogate (no UTF-8 encoding exists for it)."""
    for name, value in fields.items():
        if value is None:
            continue
        if "\x00" in value:
            raise InvalidRequest(f"'{name}' must not contain NUL (0x00) characters.", param=name)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidRequest(f"'{name}' is not valid Unicode text.", param=name) from exc
