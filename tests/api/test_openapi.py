"""/openapi.json describes every operation with examples that match what the server sends,
and /docs renders it from files this server serves itself: no CDN, nothing leaves the origin."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema_rs
import pytest
from playwright.sync_api import expect, sync_playwright

from cogview_api.api.errors import surface_of
from tests.conftest import make_settings
from tests.e2e.test_page import CHROMIUM, CHROMIUM_ARGS
from tests.support import InProcessApi, auth, in_process_api

METHODS = {"get", "put", "post", "delete", "patch"}
# The keys of each surface's error object (docs/api.md "Errors").
ERROR_KEYS = {
    "native": {"code", "message", "type", "param"},
    "openai": {"message", "type", "param", "code"},
    "zhipu": {"code", "message"},
}
ASSET_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png"}


@pytest.fixture(scope="module")
def docs_api(tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path) -> Iterator[InProcessApi]:
    tmp = tmp_path_factory.mktemp("docs")
    # With the admin API on, so its routes are held to the same standard as the others.
    settings = make_settings(tmp, tiny_cache, admin_token="a" * 32)
    with in_process_api(settings) as running:
        yield running


@pytest.fixture(scope="module")
def spec(docs_api: InProcessApi) -> dict[str, Any]:
    r = docs_api.client.get("/openapi.json")
    assert r.status_code == 200
    data: dict[str, Any] = r.json()
    return data


def operations(spec: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if method in METHODS:
                yield method, path, op


def validator(spec: dict[str, Any], schema: dict[str, Any]) -> Any:
    """A JSON Schema validator for a schema of the spec, its `$ref`s resolved in the spec."""
    return jsonschema_rs.Draft202012Validator({**schema, "components": spec["components"]})


def media_examples(media: dict[str, Any]) -> list[Any]:
    if "example" in media:
        return [media["example"]]
    return [e["value"] for e in media.get("examples", {}).values()]


def test_every_operation_is_described(spec: dict[str, Any]) -> None:
    found = {(m, p) for m, p, _ in operations(spec)}
    assert {
        ("post", "/api/v1/images/generations"),
        ("get", "/api/v1/tasks/{task_id}"),
        ("post", "/api/v1/tasks/{task_id}/cancel"),
        ("get", "/api/v1/tasks/{task_id}/events"),
        ("get", "/api/v1/tasks"),
        ("get", "/api/v1/account"),
        ("get", "/api/v1/usage"),
        ("get", "/api/v1/ledger"),
        ("post", "/admin/v1/keys"),
        ("get", "/admin/v1/keys"),
        ("get", "/admin/v1/keys/{key_id}"),
        ("post", "/admin/v1/keys/{key_id}/revoke"),
        ("post", "/admin/v1/keys/{key_id}/webhook-secret"),
        ("post", "/admin/v1/keys/{key_id}/credits/grant"),
        ("post", "/admin/v1/keys/{key_id}/credits/adjust"),
        ("get", "/admin/v1/keys/{key_id}/ledger"),
        ("get", "/admin/v1/keys/{key_id}/limits"),
        ("put", "/admin/v1/keys/{key_id}/limits"),
        ("get", "/admin/v1/usage"),
        ("get", "/admin/v1/ledger/export"),
        ("get", "/admin/v1/audit"),
        ("post", "/v1/images/generations"),
        ("post", "/api/paas/v4/images/generations"),
        ("get", "/images/{name}"),
        ("get", "/healthz"),
        ("get", "/readyz"),
    } <= found
    for method, path, op in operations(spec):
        assert op.get("summary"), (method, path)
        assert "422" not in op["responses"], f"{method} {path}: invalid input is 400, never 422"


def test_every_reference_resolves_from_the_document_root(spec: dict[str, Any]) -> None:
    """A `$ref` is a pointer from the root of /openapi.json: one to a pydantic model's own
    `#/$defs/...` left inside a route's body points at nothing (the Zhipu body's
    `sensitive_word_check` did), and code generators and schemathesis skip or fail on it."""

    def refs(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                yield node["$ref"]
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    found = list(refs(spec))
    assert len(found) > 10
    for ref in found:
        assert ref.startswith("#/"), ref
        node: Any = spec
        for part in ref[2:].split("/"):
            assert isinstance(node, dict) and part in node, f"{ref} does not resolve"
            node = node[part]


def test_every_request_body_has_examples_that_the_schema_accepts(spec: dict[str, Any]) -> None:
    bodies = 0
    for method, path, op in operations(spec):
        if "requestBody" not in op:
            continue
        bodies += 1
        media = op["requestBody"]["content"]["application/json"]
        found = media_examples(media)
        assert found, f"{method} {path}: no request example"
        check = validator(spec, media["schema"])
        for example in found:
            assert check.is_valid(example), (method, path, example)
    assert bodies >= 3


def test_every_answer_has_an_example_in_its_documented_shape(spec: dict[str, Any]) -> None:
    for method, path, op in operations(spec):
        for status, response in op["responses"].items():
            for media_type, media in response.get("content", {}).items():
                if media.get("schema", {}).get("format") == "binary":
                    continue  # image bytes: no example to show
                found = media_examples(media)
                assert found, f"{method} {path} {status} {media_type}: no example"
                if media_type == "application/json":
                    check = validator(spec, media["schema"])
                    for example in found:
                        assert check.is_valid(example), (method, path, status, example)
        assert "200" in op["responses"], (method, path)


def test_every_error_is_documented_in_the_envelope_of_its_surface(spec: dict[str, Any]) -> None:
    for method, path, op in operations(spec):
        surface = surface_of(path)
        errors = {int(s): r for s, r in op["responses"].items() if int(s) >= 400}
        assert 500 in errors, f"{method} {path}: a bug's 500 is not documented"
        if op.get("security"):
            assert {401, 403} <= errors.keys(), (method, path)
        if method == "post":
            assert {400, 413} & errors.keys(), (method, path)
        for status, response in errors.items():
            (example,) = media_examples(response["content"]["application/json"])
            keys = example["error"].keys() - {"errors"}  # a refused batch's bad lines
            assert keys == ERROR_KEYS[surface], (method, path, status)
            if "errors" in example["error"]:
                assert (method, path, status) == ("post", "/api/v1/batches", 400)
            if surface == "native":
                assert example["error"]["code"] == status


def test_the_links_lead_from_a_created_task_or_batch_to_its_operations(
    spec: dict[str, Any], docs_api: InProcessApi
) -> None:
    """Each link of a creating answer names an operation that exists and takes that
    parameter, and followed on a real answer (its request example, sent), reaches the task or
    batch it was created for."""
    by_id = {op["operationId"]: (method, path) for method, path, op in operations(spec)}
    key = docs_api.make_key(credits=100)
    followed = 0
    for method, path, op in operations(spec):
        links = op["responses"]["200"].get("links", {})
        if not links:
            continue
        (body, *_) = media_examples(op["requestBody"]["content"]["application/json"])
        answer = docs_api.client.request(method, path, json=body, headers=auth(key))
        assert answer.status_code == 200, answer.text
        for link in links.values():
            target_method, target_path = by_id[link["operationId"]]
            for name, expression in link["parameters"].items():
                assert "{" + name + "}" in target_path, (link, target_path)
                pointer = expression.removeprefix("$response.body#/").split("/")
                value: Any = answer.json()
                for part in pointer:
                    value = value[part]
                target_path = target_path.replace("{" + name + "}", value)
            with docs_api.client.stream(target_method, target_path, headers=auth(key)) as r:
                assert r.status_code in (200, 409), (target_method, target_path, r.status_code)
            followed += 1
    assert followed >= 8


@pytest.mark.parametrize("path", ["/api/v1/tasks", "/api/v1/batches/{batch_id}/tasks"])
def test_the_status_filter_pattern_says_what_the_server_accepts(
    spec: dict[str, Any], docs_api: InProcessApi, path: str
) -> None:
    """The described pattern and the server agree on every value tried: any case of the four
    statuses, and nothing else (schemathesis generates from the pattern)."""
    (param,) = [p for p in spec["paths"][path]["get"]["parameters"] if p["name"] == "status"]
    pattern = re.compile(param["schema"]["pattern"])
    key = docs_api.make_key(credits=10)
    batch = docs_api.client.post(
        "/api/v1/batches",
        json={"requests": [{"model": "cogview-4", "prompt": "a fox"}]},
        headers=auth(key),
    )
    url = path.replace("{batch_id}", batch.json()["data"]["batch_id"])
    values = ["COMPLETED", "completed", "In_Progress", "failed", "CANCELLED", "cancelled "]
    values += ["done", "IN PROGRESS", "QUEUED", "", "completedx"]
    for value in values:
        r = docs_api.client.get(url, params={"status": value}, headers=auth(key))
        assert r.status_code in (200, 400), (value, r.text)
        assert (r.status_code == 200) == bool(pattern.search(value)), (value, r.text)


def test_a_missing_key_is_answered_exactly_as_documented(
    spec: dict[str, Any], docs_api: InProcessApi
) -> None:
    """The documented 401 example is the real answer, on every surface."""
    for method, path, op in operations(spec):
        if not op.get("security"):
            continue
        url = path.replace("{task_id}", "Vb3kq9XzR2mLw8TcN1pYdA_cv4")
        r = docs_api.client.request(method.upper(), url, json={} if method == "post" else None)
        (example,) = media_examples(op["responses"]["401"]["content"]["application/json"])
        assert (r.status_code, r.json()) == (401, example), (method, path)


def test_the_request_examples_are_accepted_by_the_server(
    spec: dict[str, Any], docs_api: InProcessApi
) -> None:
    key = docs_api.make_key(credits=100)
    op = spec["paths"]["/api/v1/images/generations"]["post"]
    for example in media_examples(op["requestBody"]["content"]["application/json"]):
        r = docs_api.client.post("/api/v1/images/generations", json=example, headers=auth(key))
        assert r.status_code == 200, r.text


def test_the_admin_api_has_its_own_tag_and_token_and_its_examples_work(
    spec: dict[str, Any], docs_api: InProcessApi
) -> None:
    admin_ops = [(m, p, op) for m, p, op in operations(spec) if p.startswith("/admin/")]
    assert len(admin_ops) == 13
    for method, path, op in admin_ops:
        assert op["tags"] == ["admin"], (method, path)
        assert op["security"] == [{"adminToken": []}], (method, path)
    assert "admin" in {t["name"] for t in spec["tags"]}
    assert spec["components"]["securitySchemes"]["adminToken"]["scheme"] == "bearer"
    admin = auth("a" * 32)
    made = docs_api.client.post(
        "/admin/v1/keys", json={"name": "docs", "credits": 100}, headers=admin
    )
    key_id = made.json()["data"]["id"]
    for method, path in (
        ("post", "/admin/v1/keys"),
        ("post", "/admin/v1/keys/{key_id}/credits/grant"),
        ("post", "/admin/v1/keys/{key_id}/credits/adjust"),
        ("put", "/admin/v1/keys/{key_id}/limits"),
    ):
        op = spec["paths"][path][method]
        for example in media_examples(op["requestBody"]["content"]["application/json"]):
            url = path.replace("{key_id}", key_id)
            r = docs_api.client.request(method.upper(), url, json=example, headers=admin)
            assert r.status_code == 200, (path, r.text)


def test_routes_that_need_a_key_say_so(spec: dict[str, Any]) -> None:
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    secured = {p for _, p, op in operations(spec) if op.get("security")}
    assert "/api/v1/images/generations" in secured and "/v1/images/generations" in secured
    assert not {"/healthz", "/readyz", "/images/{name}", "/api/v1/info"} & secured


def test_docs_page_loads_only_from_this_server(docs_api: InProcessApi) -> None:
    r = docs_api.client.get("/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", r.text)
    refs += re.findall(r"""url:\s*['"]([^'"]+)['"]""", r.text)
    assert len(refs) >= 4, refs  # script, stylesheet, icon, the schema
    assert not re.search(r"https?://|//cdn", r.text), "the page names another origin"
    for ref in refs:
        parts = urlsplit(ref)
        assert not parts.scheme and not parts.netloc and ref.startswith("/"), ref
        asset = docs_api.client.get(ref)
        assert asset.status_code == 200, ref
        suffix = Path(parts.path).suffix
        expected = ASSET_TYPES.get(suffix, "application/json")
        assert expected in asset.headers["content-type"], (ref, asset.headers["content-type"])
    assert any(ref.endswith("swagger-ui-bundle.js") for ref in refs)
    assert len(docs_api.client.get(next(r for r in refs if r.endswith(".js"))).content) > 100_000


def test_docs_page_renders_in_a_browser_without_leaving_the_origin(
    docs_api: InProcessApi,
) -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not installed")
    requested: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("request", lambda req: requested.append(req.url))
            page.goto(docs_api.base_url + "/docs")
            operations = page.locator(".opblock-summary-path")
            expect(operations.first).to_be_visible(timeout=20_000)
            shown = set(operations.all_inner_texts())
        finally:
            browser.close()
    assert errors == []
    assert {"/api/v1/images/generations", "/v1/images/generations", "/healthz"} <= {
        s.replace("\u200b", "") for s in shown
    }
    foreign = [u for u in requested if not u.startswith(docs_api.base_url + "/")]
    assert foreign == [] and any(u.endswith("/openapi.json") for u in requested), requested
