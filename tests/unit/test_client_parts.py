"""The users' client's pure parts: the event-stream decoder, the retry rule, error mapping, the
batch command's input files and its derived Idempotency-Key, and the generate command's file
names. (The client against a real server: tests/e2e/test_client.py, test_user_cli.py.)"""

from __future__ import annotations

import email.utils
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from cogview_api.client import GenerationRequest, ServerError, ServiceUnavailable, Task
from cogview_api.client import _base as base
from cogview_api.client.batch_command import idempotency_key, read_input
from cogview_api.client.commands import UsageError, image_paths


def decode(lines: list[str]) -> list[tuple[str, str]]:
    decoder = base.SSEDecoder()
    return [e for line in lines if (e := decoder.feed(line)) is not None]


def test_sse_frames_comments_and_multiline_data() -> None:
    stream = [": keep-alive", "", "event: task", 'data: {"a":', "data: 1}", "id: 7", ""]
    stream += ["data:plain", "", "", "event: batch", "retry: 10"]  # the last frame unfinished
    assert decode(stream) == [("task", '{"a":\n1}'), ("message", "plain")]
    assert base.decode_frame(("task", '{"a": 1}'), "task") == {"a": 1}
    assert base.decode_frame(("batch", '{"a": 1}'), "task") is None
    assert base.decode_frame(("task", "not json"), "task") is None


def test_retry_after_and_the_retry_rule() -> None:
    assert base.parse_retry_after("3") == 3.0
    soon = email.utils.format_datetime(datetime.fromtimestamp(time.time() + 30, UTC), usegmt=True)
    assert 25 < (base.parse_retry_after(soon) or 0) <= 30
    assert base.parse_retry_after("soon") is None and base.parse_retry_after(None) is None
    policy = base.RetryPolicy(max_retries=2, max_retry_after=60)
    assert policy.delay(0, retry_after=5) == 5
    assert policy.delay(0, retry_after=120) is None  # longer than we wait: raised at once
    assert policy.delay(2) is None
    assert 0 < (policy.delay(1) or 0) <= 1.25
    # A request without an Idempotency-Key is sent again only when nothing was done.
    assert base.may_retry_status(503, safe=False) and not base.may_retry_status(502, safe=False)
    assert base.may_retry_status(502, safe=True) and not base.may_retry_status(500, safe=True)
    dropped = httpx.RemoteProtocolError("Server disconnected")
    assert base.may_retry_transport(dropped, safe=True)
    assert not base.may_retry_transport(dropped, safe=False)
    assert base.may_retry_transport(httpx.ConnectError("refused"), safe=False)


def test_errors_from_answers_that_are_not_ours() -> None:
    request = httpx.Request("GET", "http://x/api/v1/tasks")
    html = httpx.Response(502, text="<html>bad gateway</html>", request=request)
    error = base.api_error(html, has_key=True)
    assert isinstance(error, ServerError) and error.status == 502
    assert error.message == "HTTP 502 Bad Gateway"
    busy = httpx.Response(
        503,
        json={"error": {"code": 503, "message": "Queue full", "type": "service_unavailable"}},
        headers={"Retry-After": "2"},
        request=request,
    )
    error = base.api_error(busy, has_key=True)
    assert isinstance(error, ServiceUnavailable) and error.retry_after == 2.0
    unauthorised = httpx.Response(401, json={"error": {"message": "Invalid API key"}})
    assert "COGVIEW_API_KEY" in base.api_error(unauthorised, has_key=False).message


def test_only_the_fields_given_are_sent() -> None:
    assert GenerationRequest(prompt="a cat", n=2).body() == {
        "prompt": "a cat",
        "model": "cogview-4",
        "n": 2,
    }
    assert base.generation_body({"prompt": "raw", "model": "x"}, {}) == {
        "prompt": "raw",
        "model": "x",
    }
    with pytest.raises(TypeError):
        base.generation_body(GenerationRequest(prompt="a"), {"n": 2})


def test_batch_inputs(tmp_path: Path) -> None:
    txt = tmp_path / "p.txt"
    txt.write_text("# my prompts\n\na cat\n  a dog  \n")
    lines = read_input(txt, {"size": "512*512"})
    assert [(line.where, line.body) for line in lines] == [
        ("p.txt line 3", {"model": "cogview-4", "size": "512*512", "prompt": "a cat"}),
        ("p.txt line 4", {"model": "cogview-4", "size": "512*512", "prompt": "a dog"}),
    ]
    csv = tmp_path / "p.csv"
    csv.write_text('prompt,n,format,seed\n"a cat, sitting",2,jpeg,\na dog,,,7\n')
    assert [line.body for line in read_input(csv, {"n": 1})] == [
        {"model": "cogview-4", "n": 2, "prompt": "a cat, sitting", "output_format": "jpeg"},
        {"model": "cogview-4", "n": 1, "prompt": "a dog", "seed": 7},
    ]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(
        '{"prompt": "a cat", "quality": "standard"}\n\n{"prompt": "x", "model": "m"}\n'
    )
    assert [line.body for line in read_input(jsonl, {})] == [
        {"model": "cogview-4", "prompt": "a cat", "quality": "standard"},
        {"model": "m", "prompt": "x"},
    ]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("p.csv", "prompt,n\na cat,two\n", "p.csv line 2: n must be a whole number"),
        ("p.csv", "text\na cat\n", "`prompt`"),
        ("p.csv", "prompt,qualty\na,hd\n", "unknown column 'qualty'"),
        ("p.jsonl", '{"prompt": "a"}\n[1]\n', "p.jsonl line 2: not a JSON object"),
        ("p.jsonl", "{oops\n", "p.jsonl line 1: not JSON"),
        ("p.txt", "\n# only a comment\n", "no prompts"),
        ("p.json", "{}", ".txt, .csv or .jsonl"),
    ],
)
def test_bad_batch_inputs(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        read_input(path, {})


def test_batch_key_follows_the_requests_and_the_folder(tmp_path: Path) -> None:
    key = idempotency_key("abc", tmp_path / "out")
    assert key == idempotency_key("abc", tmp_path / "out") and len(key) <= 255
    assert key != idempotency_key("abd", tmp_path / "out")
    assert key != idempotency_key("abc", tmp_path / "other")


def task_with(images: int, fmt: str = "png") -> Task:
    image = {"url": "http://x/i", "width": 512, "height": 512, "seed": 1, "format": fmt}
    return Task.model_validate(
        {
            "task_id": "abc_cv4",
            "model": "cogview-4",
            "status": "COMPLETED",
            "created_at": "2026-12-01T00:00:00Z",
            "request": {
                "prompt": "p",
                "size": "512*512",
                "quality": "hd",
                "n": images,
                "output_format": fmt,
            },
            "progress": {"stage": "done", "percent": 100},
            "images": [image] * images,
            "credits": {"charged": 4, "refunded": 0},
        }
    )


def test_generate_file_names() -> None:
    assert image_paths("fox.png", task_with(1)) == [Path("fox.png")]
    assert image_paths("out/fox.png", task_with(2)) == [
        Path("out/fox-1.png"),
        Path("out/fox-2.png"),
    ]
    assert image_paths(None, task_with(1, "jpeg")) == [Path("abc_cv4.jpg")]
    assert image_paths("fox", task_with(1, "webp")) == [Path("fox.webp")]


def test_previews_are_sent_when_asked_and_read_back_from_the_task() -> None:
    assert GenerationRequest(prompt="a cat", previews=2).body()["previews"] == 2
    task = {
        "task_id": "t_cv4",
        "model": "cogview-4",
        "status": "IN_PROGRESS",
        "created_at": "2026-12-02T08:00:00Z",
        "request": {"prompt": "a cat", "size": "512*512", "quality": "hd", "n": 1,
                    "output_format": "png"},
        "progress": {"stage": "denoising", "percent": 40},
        "credits": {"charged": 4, "refunded": 0},
        "previews": [{"index": 0, "step": 12, "url": "http://h/images/t.webp"}],
    }  # fmt: skip
    (preview,) = Task.model_validate(task).previews or []
    assert (preview.index, preview.step, preview.url) == (0, 12, "http://h/images/t.webp")
    del task["previews"]
    assert Task.model_validate(task).previews is None  # a task that asked for none
