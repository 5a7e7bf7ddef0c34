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
}

ZHIPU_REQUESTS: dict[str, dict[str, Any]] = {
    "basic": {
        "summary": "Zhipu's SDK example",
        "value": {"model": "cogview-4", "prompt": "A red fox in fresh snow", "quality": "hd"},
    }
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
OPENAI_ANSWER = {"created": 1795496431, "data": [{"url": IMAGE_URL}]}
ZHIPU_ANSWER = {"created": 1795496431, "data": [{"url": IMAGE_URL}]}
HEALTHZ_ANSWER = {"status": "ok"}
READYZ_ANSWER = {"status": "ready", "workers": 1}
