"""The Standard Webhooks signature scheme (https://www.standardwebhooks.com), as Svix uses it.

A secret is `whsec_` + base64 of 24 random bytes; the HMAC key is those bytes. Each attempt is
signed over `{webhook-id}.{webhook-timestamp}.{body}` and sent as `v1,` + base64(HMAC-SHA256).
The id stays the same across the retries of one delivery (receivers de-duplicate on it); the
timestamp is the attempt's own, so receivers can refuse old replays.

Ten lines of hmac rather than the `standardwebhooks` package: it is all the scheme needs, and
the tests check it against the spec's published test vector. A leaf (stdlib only): the store
mints secrets and message ids with it, the dispatcher signs with it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 24


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def new_message_id() -> str:
    """The `webhook-id` of one delivery: unique, and the same for all of its attempts."""
    return "msg_" + secrets.token_urlsafe(18)


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value for one attempt."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def headers(secret: str, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, message_id, timestamp, body),
    }
