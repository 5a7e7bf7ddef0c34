"""Schemathesis against /openapi.json: for every operation, requests generated from its
description, valid ones and (where there is input to break) invalid ones, with a funded key.
No answer may be a 5xx, every answer must match the description (documented status, content
type, headers, body schema), invalid input must be refused, and every 4xx must be in the
error envelope of its surface (docs/api.md).

Two of schemathesis' checks are left out, with reasons: `positive_data_acceptance`, because
some rules are not expressible in JSON Schema (a size's pixel count, a prompt of 1000
characters after trimming), so a schema-valid request can rightly be a 400; and
`ignored_auth`, because the key is fixed here (the key's own checks are in test_openapi.py).

Bounded and reproducible: 25 examples per operation and mode, derandomized."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.checks import ignored_auth, positive_data_acceptance
from schemathesis.core.result import Ok

from cogview_api.api.errors import surface_of
from cogview_api.engine import EngineJob, PreviewFn, ProgressFn
from tests.api.test_openapi import ERROR_KEYS
from tests.conftest import make_settings
from tests.support import FlakyEngine, InProcessApi, auth, background_worker, in_process_api


class GrayEngine(FlakyEngine):
    """FlakyEngine that never fails: here a failed task would be a (correct) 500 of the
    synchronous routes, which this test must not mistake for a bug."""

    def generate(
        self, jobs: Sequence[EngineJob], progress: ProgressFn, preview: PreviewFn | None = None
    ) -> list[list[Image.Image]]:
        return super().generate([replace(job, prompt="gray") for job in jobs], progress, preview)


ADMIN_TOKEN = "fuzz-admin-" + "0" * 32


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path) -> Iterator[InProcessApi]:
    """The API with a worker (so the OpenAI and Zhipu routes and /readyz answer 200), and the
    admin API on."""
    tmp = tmp_path_factory.mktemp("schemathesis")
    with (
        in_process_api(
            make_settings(tmp, tiny_cache, sync_wait_seconds=30, admin_token=ADMIN_TOKEN)
        ) as api,
        background_worker(api, GrayEngine()),
    ):
        yield api


@pytest.fixture(scope="module")
def fuzz_key(fuzzed: InProcessApi) -> str:
    return fuzzed.make_key(credits=10**12)


def error_in_its_surface_envelope(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every 4xx is `{"error": {...}}` with the keys of the path's surface."""
    if not 400 <= response.status_code < 500:
        return None
    body = response.json()
    surface = surface_of(case.path)
    assert set(body) == {"error"}, body
    keys = set(body["error"]) - {"errors"}  # a refused batch lists its bad lines
    assert keys == ERROR_KEYS[surface], (surface, body)
    if "errors" in body["error"]:
        assert (case.method, case.path) == ("POST", "/api/v1/batches"), body
    assert body["error"]["message"], body
    if surface == "native":
        assert body["error"]["code"] == response.status_code, body
    return True


def negatable(operation: Any) -> bool:
    """Whether negative mode has anything to break: a body, a query, or a header other than the
    API key (which stays valid: the key's own tests are in test_openapi.py)."""
    headers = [h for h in operation.headers if h.name.lower() != "authorization"]
    return bool(len(operation.body) or len(operation.query) or headers)


@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda m: m.value)
def test_every_operation_keeps_its_description(
    fuzzed: InProcessApi, fuzz_key: str, mode: GenerationMode
) -> None:
    schema = schemathesis.openapi.from_url(fuzzed.base_url + "/openapi.json")
    results = list(schema.get_all_operations())
    assert all(isinstance(result, Ok) for result in results), results  # the schema is valid
    operations = [result.ok() for result in results if isinstance(result, Ok)]
    assert len(operations) >= 11
    for operation in operations:
        if mode is GenerationMode.NEGATIVE and not negatable(operation):
            continue

        bearer = ADMIN_TOKEN if operation.path.startswith("/admin/") else fuzz_key

        @given(case=operation.as_strategy(mode, headers=auth(bearer)))
        @settings(
            max_examples=25,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def keeps_its_description(case: Any) -> None:
            # `Prefer: wait=N` would hold a request up to a minute for nothing checked here.
            if case.headers:
                case.headers.pop("Prefer", None)
            case.call_and_validate(
                base_url=fuzzed.base_url,
                additional_checks=[error_in_its_surface_envelope],
                excluded_checks=[positive_data_acceptance, ignored_auth],
                timeout=60,  # schemathesis' default 10 s is tight for the synchronous routes
            )

        try:
            keeps_its_description()
        except Exception as exc:
            raise AssertionError(f"{operation.label} ({mode.value}): {exc}") from exc
