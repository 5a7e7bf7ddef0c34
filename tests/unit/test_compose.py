"""compose.yml and the Dockerfile against the code they deploy. No Docker engine runs here, so
these checks keep the files from drifting: every COGVIEW_* variable is a setting, every command
parses with the CLI, every worker has a GPU of its own, and the health checks hit real routes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from cogview_api import cli
from cogview_api.api.routes import health
from cogview_api.config import Settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose.yml").read_text())
    return data


def services(compose: dict[str, Any], image: str) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose["services"].items() if s.get("image") == image}


def workers(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return services(compose, "cogview-api-worker:local")


def setting_names() -> set[str]:
    return {f"COGVIEW_{name.upper()}" for name in Settings.model_fields}


def test_every_cogview_variable_is_a_setting(compose: dict[str, Any]) -> None:
    used = {
        name
        for service in compose["services"].values()
        for name in service.get("environment", {})
        if name.startswith("COGVIEW_")
    }
    used |= set(re.findall(r"\b(COGVIEW_[A-Z0-9_]+)=", (ROOT / "Dockerfile").read_text()))
    assert used, "no COGVIEW_* variables found"
    assert used - setting_names() == set()


def test_the_settings_of_each_service_validate(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With compose's defaults filled in, each service's environment is a valid Settings."""
    for service in services(compose, "cogview-api:local") | workers(compose):
        env = compose["services"][service]["environment"]
        for name in list(Settings.model_fields):
            monkeypatch.delenv(f"COGVIEW_{name.upper()}", raising=False)
        for name, value in env.items():
            # ${VAR:-default} -> default, as compose does when VAR is unset.
            monkeypatch.setenv(name, re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", str(value)))
        settings = Settings()
        assert settings.database_url.startswith("postgresql://cogview:")
        assert settings.storage_url == "s3://cogview/images"
        assert settings.s3_endpoint_url == "http://minio:9000"


def test_every_command_parses_with_the_cli(compose: dict[str, Any]) -> None:
    commands = {
        name: s["command"]
        for name, s in compose["services"].items()
        if s.get("image", "").startswith("cogview-api")
    }
    assert commands["migrate"] == ["migrate"]
    for name, command in commands.items():
        args = cli._parser().parse_args(command)
        if name == "api":
            assert args.command == "serve" and args.workers == 0  # API only: never loads torch
        if name in workers(compose):
            assert args.command == "worker" and args.device == "cuda:0"
    dockerfile = (ROOT / "Dockerfile").read_text()
    for cmd in re.findall(r"^CMD (\[.*\])$", dockerfile, flags=re.M):
        cli._parser().parse_args(yaml.safe_load(cmd))  # JSON arrays are YAML too


def test_one_worker_per_gpu_each_with_its_own_device(compose: dict[str, Any]) -> None:
    found = workers(compose)
    assert len(found) >= 1
    ids = []
    for service in found.values():
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        (device_id,) = device["device_ids"]
        ids.append(device_id)
        assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert len(set(ids)) == len(ids), f"two workers share a GPU: {ids}"


def test_replicas_wait_for_the_schema_and_checks_hit_real_routes(compose: dict[str, Any]) -> None:
    svc = compose["services"]
    assert svc["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert svc["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert svc["api"]["deploy"]["replicas"] >= 2
    routes = {getattr(r, "path", None) for r in health.router.routes}
    checks = {"api": "/healthz", "lb": "/readyz"}
    for name, path in checks.items():
        test = " ".join(svc[name]["healthcheck"]["test"])
        assert path in test and path in routes
    port = svc["api"]["environment"]["COGVIEW_PORT"]
    nginx = compose["configs"]["nginx-conf"]["content"]
    assert f"server api:{port} resolve;" in nginx
    assert svc["postgres"]["image"] == "postgres:16"
    for name, service in svc.items():
        for dep in service.get("depends_on", {}):
            assert dep in svc, f"{name} depends on unknown service {dep}"
