"""Example requests and answers shown in /openapi.json and /docs (Swagger UI's "Try it out"
starts from the request examples). tests/api/test_openapi.py checks each one against the wire
schema it illustrates, so they cannot drift from what the server really sends."""

from __future__ import annotations

from typing import Any

TASK_ID = "Vb3kq9XzR2mLw8TcN1pYdA_cv4"
IMAGE_URL = "https://cogview.example.com/images/4mX0cB9tQhLw2vRzPjK7eN1sYgUa3dFo.png"
CREATED = "2026-11-24T05:00:00Z"

# -- requests --------------------------------------------------------------------------------

NATIVE_REQUESTS: dict[str, dict[str, Any]] = {
    "hosted": {
        "summary": "The hosted API's example",
        "value": {
            "model": "cogview-4",
            "prompt": "A futuristic robot assistant helping in a modern kitchen, clean design",
            "size": "1024*1024",
            "quality": "hd",
        },
    },
    "extensions": {
        "summary": "With this server's extensions",
        "value": {
            "model": "cogview-4",
            "prompt": "A lighthouse on a cliff at dusk, oil painting",
            "negative_prompt": "text, watermark",
            "size": "1344*768",
            "quality": "standard",
            "n": 2,
            "seed": 42,
            "output_format": "webp",
            "user_id": "customer-1234",
        },
    },
}

OPENAI_REQUESTS: dict[str, dict[str, Any]] = {
    "url": {
        "summary": "An image URL",
        "value": {"model": "cogview-4", "prompt": "A red fox in fresh snow", "size": "1024x1024"},
    },
    "b64_json": {
        "summary": "The image bytes, base64",
        "value": {
            "model": "cogview-4",
            "prompt": "A red fox in fresh snow",
            "size": "768x1344",
            "quality": "standard",
            "response_format": "b64_json",
        },
    },
    "current": {
        "summary": "The current images.generate fields",
        "value": {
            "model": "cogview-4",
            "prompt": "A red fox in fresh snow",
            "size": "1024x1024",
            "quality": "medium",
            "output_format": "jpeg",
            "output_compression": 80,
            "background": "opaque",
            "moderation": "auto",
            "safety_identifier": "customer-1234",
        },
    },
}

ZHIPU_REQUESTS: dict[str, dict[str, Any]] = {
    "basic": {
        "summary": "Zhipu's SDK example",
        "value": {"model": "cogview-4", "prompt": "A red fox in fresh snow", "quality": "hd"},
    },
    "all": {
        "summary": "Zhipu's own fields",
        "value": {
            "model": "cogview-4",
            "prompt": "A red fox in fresh snow",
            "size": "1344x768",
            "n": 1,
            "request_id": "order-1234-img-1",
            "user_id": "customer-1234",
            "watermark_enabled": False,
            "sensitive_word_check": {"type": "ALL", "status": "DISABLE"},
        },
    },
}

# -- answers ---------------------------------------------------------------------------------


def success(data: Any) -> dict[str, Any]:
    return {"code": 200, "message": "success", "data": data}


TASK_CREATED = {
    "task_id": TASK_ID,
    "status": "IN_PROGRESS",
    "created_at": CREATED,
    "credits_charged": 4,
    "queue_position": 1,
}

TASK_REQUEST = {
    "prompt": "A futuristic robot assistant helping in a modern kitchen, clean design",
    "negative_prompt": "",
    "size": "1024*1024",
    "quality": "hd",
    "n": 1,
    "seed": None,
    "output_format": "png",
    "user_id": None,
}

TASK_COMPLETED = {
    "task_id": TASK_ID,
    "model": "cogview-4",
    "status": "COMPLETED",
    "created_at": CREATED,
    "started_at": "2026-11-24T05:00:01Z",
    "completed_at": "2026-11-24T05:00:31Z",
    "expires_at": "2026-12-01T05:00:31Z",
    "request": TASK_REQUEST,
    "progress": {"stage": "done", "percent": 100, "step": 50, "total_steps": 50},
    "images": [
        {"url": IMAGE_URL, "width": 1024, "height": 1024, "seed": 1850393437, "format": "png"}
    ],
    "credits": {"charged": 4, "refunded": 0},
    "error": None,
}

TASK_RUNNING = {
    **TASK_COMPLETED,
    "status": "IN_PROGRESS",
    "completed_at": None,
    "expires_at": None,
    "progress": {"stage": "denoising", "percent": 38, "step": 20, "total_steps": 50},
    "images": [],
}

TASK_CANCELLED = {
    **TASK_RUNNING,
    "status": "CANCELLED",
    "completed_at": "2026-11-24T05:00:12Z",
    "credits": {"charged": 4, "refunded": 4},
    "error": {"code": 499, "type": "cancelled", "message": "Cancelled by the client."},
}

SUBMIT_ANSWERS = {
    "created": {"summary": "Task created (or replayed)", "value": success(TASK_CREATED)},
    "finished": {
        "summary": "Finished within `Prefer: wait`",
        "value": success(TASK_COMPLETED),
    },
}
TASK_ANSWER = success(TASK_COMPLETED)
CANCEL_ANSWER = success(TASK_CANCELLED)
LIST_ANSWER = success(
    {"tasks": [TASK_RUNNING], "next_cursor": "dDoxMjM", "has_more": True},
)
ACCOUNT_ANSWER = success(
    {
        "key_id": "k_8f2c41d0a9",
        "name": "production",
        "balance": 996,
        "images_generated": 1,
        "credits_spent": 4,
    }
)
EVENTS_ANSWER = (
    f'event: task\ndata: {{"task_id":"{TASK_ID}","status":"IN_PROGRESS",...}}\n\n'
    ": keep-alive\n\n"
    f'event: task\ndata: {{"task_id":"{TASK_ID}","status":"COMPLETED",...}}\n\n'
)
OPENAI_STREAM_ANSWER = (
    'event: image_generation.partial_image\ndata: {"type":"image_generation.partial_image",'
    '"b64_json":"UklGR...","partial_image_index":0,"output_format":"webp",'
    '"created_at":1795496440,"background":"opaque","quality":"high","size":"1024x1024"}\n\n'
    'event: image_generation.completed\ndata: {"type":"image_generation.completed",'
    '"b64_json":"iVBOR...","output_format":"png","created_at":1795496452,"usage":{"images":1,'
    '"credits":4,"input_tokens":0,"input_tokens_details":{"image_tokens":0,"text_tokens":0},'
    '"output_tokens":0,"total_tokens":0},"background":"opaque","quality":"high",'
    '"size":"1024x1024"}\n\n'
)
OPENAI_ANSWER = {
    "created": 1795496431,
    "data": [{"url": IMAGE_URL}],
    "background": "opaque",
    "output_format": "png",
    "quality": "high",
    "size": "1024x1024",
    "usage": {"images": 1, "credits": 4},
}
ZHIPU_ANSWER = {"id": "order-1234-img-1", "created": 1795496431, "data": [{"url": IMAGE_URL}]}
OPENAI_MODEL = {
    "id": "cogview-4",
    "object": "model",
    "created": 1741046400,
    "owned_by": "zhipuai",
}
OPENAI_MODELS = {
    "object": "list",
    "data": [OPENAI_MODEL, {**OPENAI_MODEL, "id": "cogview-4-250304"}],
}
HEALTHZ_ANSWER = {"status": "ok"}
READYZ_ANSWER = {"status": "ready", "workers": 1}

# -- usage and ledger (native and admin) -----------------------------------------------------

KEY_ID = "key_8f2c41d0a9b3e7c5"
_FIGURES = {"tasks": 3, "images": 4, "credits_charged": 20, "credits_refunded": 4, "credits": 16}
USAGE_REPORT = {
    "from": "2026-11-01",
    "to": "2026-11-30",
    "key_id": KEY_ID,
    "totals": _FIGURES,
    "days": [{"date": "2026-11-24", **_FIGURES}],
    "rows": [
        {
            "date": "2026-11-24",
            "key_id": KEY_ID,
            "quality": "hd",
            "surface": "native",
            "tasks": 2,
            "images": 3,
            "credits_charged": 16,
            "credits_refunded": 4,
            "credits": 12,
        },
        {
            "date": "2026-11-24",
            "key_id": KEY_ID,
            "quality": "standard",
            "surface": "openai",
            "tasks": 1,
            "images": 1,
            "credits_charged": 4,
            "credits_refunded": 0,
            "credits": 4,
        },
    ],
}
USAGE_ANSWER = success(USAGE_REPORT)
LEDGER_RESERVE = {
    "id": 1042,
    "created_at": CREATED,
    "key_id": KEY_ID,
    "kind": "reserve",
    "amount": -4,
    "task_id": TASK_ID,
    "quality": "hd",
    "surface": "native",
    "note": None,
}
LEDGER_GRANT = {
    "id": 1001,
    "created_at": "2026-11-20T09:30:00Z",
    "key_id": KEY_ID,
    "kind": "grant",
    "amount": 1000,
    "task_id": None,
    "quality": None,
    "surface": None,
    "note": "invoice 2026-117",
}
LEDGER_ANSWER = success(
    {"entries": [LEDGER_RESERVE, LEDGER_GRANT], "next_cursor": "bDoxMDAx", "has_more": True}
)

# -- admin API -------------------------------------------------------------------------------

KEY_ADMIN = {
    "id": KEY_ID,
    "name": "production",
    "prefix": "cv4_Q2x9fL",
    "balance": 996,
    "created_at": "2026-11-20T09:30:00Z",
    "revoked_at": None,
    "revoked": False,
    "images_generated": 1,
    "credits_spent": 4,
}
KEY_CREATE_REQUESTS = {
    "with_credits": {
        "summary": "A key with 1000 credits",
        "value": {"name": "production", "credits": 1000},
    },
    "empty": {"summary": "A key with no credits yet", "value": {"name": "staging"}},
}
KEY_CREATED_ANSWER = success(
    {
        **KEY_ADMIN,
        "balance": 1000,
        "images_generated": 0,
        "credits_spent": 0,
        "key": "cv4_Q2x9fLrT0aWk3yZbN8cVd1eXh5jMp7sUq4oIg6lKfA",
        "webhook_secret": "whsec_MfKQ9DXkL8QJdWc2oQ8hb9HQ3N1bIoyb",
    }
)
KEY_ANSWER = success(KEY_ADMIN)
KEY_REVOKED_ANSWER = success({**KEY_ADMIN, "revoked_at": "2026-11-25T12:00:00Z", "revoked": True})
KEYS_ANSWER = success({"keys": [KEY_ADMIN]})
WEBHOOK_SECRET_ANSWER = success(
    {"key_id": KEY_ID, "webhook_secret": "whsec_3b8QwPz0NqLk5VrYx2Tc7Hf9Jd4Gs6Am"}
)
GRANT_REQUESTS = {
    "grant": {"summary": "Add credits", "value": {"amount": 1000, "note": "invoice 2026-117"}},
}
ADJUST_REQUESTS = {
    "down": {
        "summary": "Take credits back",
        "value": {"amount": -40, "note": "duplicate grant of 2026-11-20"},
    },
    "up": {"summary": "Correct upwards", "value": {"amount": 8, "note": "goodwill"}},
}
CREDITS_ANSWER = success(
    {"key": {**KEY_ADMIN, "balance": 1996}, "entry": {**LEDGER_GRANT, "id": 1043}}
)
AUDIT_ANSWER = success(
    {
        "entries": [
            {
                "id": 77,
                "at": "2026-11-25T12:00:00Z",
                "actor": "ops",
                "action": "credits.grant",
                "key_id": KEY_ID,
                "detail": {"amount": 1000, "note": "invoice 2026-117"},
            }
        ],
        "next_cursor": None,
        "has_more": False,
    }
)
LEDGER_CSV = (
    "id,created_at,key_id,kind,amount,task_id,quality,surface,note\r\n"
    f"1001,2026-11-20T09:30:00Z,{KEY_ID},grant,1000,,,,invoice 2026-117\r\n"
    f"1042,{CREATED},{KEY_ID},reserve,-4,{TASK_ID},hd,native,\r\n"
)
LEDGER_JSONL = (
    '{"id":1001,"created_at":"2026-11-20T09:30:00Z","key_id":"' + KEY_ID + '","kind":"grant",'
    '"amount":1000,"task_id":null,"quality":null,"surface":null,"note":"invoice 2026-117"}\n'
)
KEY_LIMITS_REQUESTS = {
    "override": {
        "summary": "Its own rate and burst (max_waiting stays as it is)",
        "value": {"submit_rate": 2, "submit_burst": 5},
    },
    "no_rate": {"summary": "No submit rate limit for this key", "value": {"submit_rate": 0}},
    "follow_caps": {
        "summary": "Its own caps on open event streams and waiting `Prefer: wait` submits",
        "value": {"max_streams": 5, "max_waits": 2},
    },
    "reset": {"summary": "Back to the server's settings", "value": {"reset": True}},
}
KEY_LIMITS = {
    "key_id": KEY_ID,
    "submit_rate": 2.0,
    "submit_burst": 5,
    "max_waiting": 100,
    "max_streams": 20,
    "max_waits": 20,
    "own": ["submit_burst", "submit_rate"],
}
KEY_LIMITS_ANSWER = success(KEY_LIMITS)
INFO_ANSWER = success(
    {
        "version": "0.1.0",
        "models": ["cogview-4", "cogview-4-250304"],
        "engine": "THUDM/CogView4-6B",
        "note": None,
        "credits_per_image": {"standard": 4, "hd": 4},
        "default_quality": "hd",
        "sizes": {
            "presets": [
                "1024*1024",
                "768*1344",
                "864*1152",
                "1344*768",
                "1152*864",
                "1440*720",
                "720*1440",
            ],
            "min_side": 512,
            "max_side": 2048,
            "side_multiple_of": 16,
            "max_pixels": 2097152,
        },
        "max_prompt_chars": 1000,
        "max_images_per_request": 4,
    }
)


# -- batches ---------------------------------------------------------------------------------

BATCH_ID = "batch_Qm3vT8wLx1RkZp0cJ7nYbA"
BATCH_REQUESTS: dict[str, dict[str, Any]] = {
    "json": {
        "summary": "Two requests, with metadata",
        "value": {
            "requests": [
                {"model": "cogview-4", "prompt": "A red fox in the snow", "size": "512*512"},
                {
                    "model": "cogview-4",
                    "prompt": "A lighthouse on a cliff at dusk, oil painting",
                    "quality": "standard",
                    "n": 2,
                },
            ],
            "metadata": {"campaign": "winter"},
        },
    },
}
BATCH_JSONL = (
    '{"model": "cogview-4", "prompt": "A red fox in the snow", "size": "512*512"}\n'
    '{"model": "cogview-4", "prompt": "A lighthouse at dusk", "quality": "standard", "n": 2}\n'
)
BATCH_IN_PROGRESS = {
    "batch_id": BATCH_ID,
    "object": "batch",
    "status": "IN_PROGRESS",
    "total": 2,
    "counts": {"queued": 1, "running": 1, "completed": 0, "failed": 0, "cancelled": 0},
    "images": {"done": 0, "total": 3},
    "credits": {"charged": 12, "refunded": 0},
    "created_at": CREATED,
    "finished_at": None,
    "callback_url": None,
    "metadata": {"campaign": "winter"},
}
BATCH_COMPLETED = {
    **BATCH_IN_PROGRESS,
    "status": "COMPLETED",
    "counts": {"queued": 0, "running": 0, "completed": 2, "failed": 0, "cancelled": 0},
    "images": {"done": 3, "total": 3},
    "finished_at": "2026-11-24T05:01:10Z",
}
BATCH_CANCELLED = {
    **BATCH_IN_PROGRESS,
    "status": "CANCELLED",
    "counts": {"queued": 0, "running": 0, "completed": 1, "failed": 0, "cancelled": 1},
    "images": {"done": 1, "total": 3},
    "credits": {"charged": 12, "refunded": 8},
    "finished_at": "2026-11-24T05:00:40Z",
}
BATCH_CREATED_ANSWER = success(BATCH_IN_PROGRESS)
BATCH_ANSWER = success(BATCH_COMPLETED)
BATCH_CANCEL_ANSWER = success(BATCH_CANCELLED)
BATCH_LIST_ANSWER = success(
    {"batches": [BATCH_COMPLETED], "next_cursor": "Yjo0Mg", "has_more": True}
)
BATCH_TASKS_ANSWER = success(
    {
        "tasks": [{**TASK_COMPLETED, "batch_id": BATCH_ID, "batch_index": 0}],
        "next_cursor": "YnQ6MA",
        "has_more": True,
    }
)
BATCH_EVENTS_ANSWER = (
    f'event: batch\ndata: {{"batch_id":"{BATCH_ID}","status":"IN_PROGRESS",...}}\n\n'
    ": keep-alive\n\n"
    f'event: batch\ndata: {{"batch_id":"{BATCH_ID}","status":"COMPLETED",...}}\n\n'
)
BATCH_LINE_ERRORS = {
    "error": {
        "code": 400,
        "message": "Line 9999: Invalid 'size': size must be W*H; the batch was not created.",
        "type": "invalid_request",
        "param": "requests",
        "errors": [{"index": 9999, "param": "size", "message": "Invalid 'size': ..."}],
    }
}
