"""The package's dependencies as declared (pyproject.toml, read back from the installed
distribution's metadata) against what the code needs: the diffusers pin admits the release the
fast engine was proven on and no later minor, and the API process runs without the `engine`
extra (no torch, no diffusers), refusing a model start without it in one sentence."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
ENGINE_MODULES = ("torch", "diffusers", "transformers", "accelerate")


def requirements(extra: str | None) -> dict[str, Requirement]:
    """The distribution's requirements that apply with `extra` (None: the base set)."""
    found = {}
    for line in importlib.metadata.requires("cogview-api") or []:
        req = Requirement(line)
        if req.marker is None:
            applies = extra is None
        else:
            applies = extra is not None and req.marker.evaluate({"extra": extra})
        if applies:
            found[req.name.lower()] = req
    return found


def test_the_diffusers_pin_admits_the_installed_minor_and_no_later_one() -> None:
    req = requirements("engine")["diffusers"]
    installed = Version(importlib.metadata.version("diffusers"))
    assert req.specifier.contains(installed), f"{req} excludes the installed {installed}"
    major, minor = installed.release[:2]
    assert not req.specifier.contains(f"{major}.{minor + 1}.0"), f"{req} admits the next minor"
    assert not req.specifier.contains(f"{major}.{minor - 1}.0"), f"{req} admits an older minor"


def test_the_base_install_has_no_engine_package() -> None:
    base = requirements(None)
    engine = requirements("engine")
    heavy = {"torch", "diffusers", "transformers", "tokenizers", "safetensors", "accelerate"}
    assert heavy & base.keys() == set(), "the API-only install would pull the engine"
    assert heavy <= engine.keys()


def test_constraints_pin_every_installed_requirement_exactly() -> None:
    """constraints.txt (what scripts/test.sh and the Dockerfile install with) pins each declared
    requirement, and torch is left to the install command."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    assert "torch" not in pins
    declared = set()
    for extra in (None, "engine", "int8", "test", "dev"):
        declared |= {n.replace("_", "-") for n in requirements(extra)}
    declared -= {"torch", "cogview-api"}
    assert declared - pins.keys() == set(), "constraints.txt misses a declared requirement"
    for name in declared:
        assert all(c.isdigit() or c in ".postdevrcab" for c in pins[name]), (name, pins[name])


def run_python(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COGVIEW_")}
    env.update(
        COGVIEW_DATABASE_URL=f"sqlite:///{tmp_path}/cogview.db",
        COGVIEW_STORAGE_URL=f"file://{tmp_path}/images",
        COGVIEW_CACHE_DIR=str(tmp_path / "cache"),
        COGVIEW_LOG_LEVEL="warning",
    )
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )


def test_the_api_and_the_echo_engine_never_import_torch(tmp_path: Path) -> None:
    """What `serve --workers 0` and the test-echo worker load: the app factory, the server
    module, the app built and answering, the echo engine loaded."""
    result = run_python(
        f"""
        import sys

        from fastapi.testclient import TestClient

        from cogview_api import server
        from cogview_api.api.app import create_app
        from cogview_api.config import Settings
        from cogview_api.services.backends import Backends
        from cogview_api.store.db import Database

        # TestClient's requests say Host: testserver.
        settings = Settings(model="test-echo", workers=0, trusted_hosts="testserver")
        db = Database(settings.database_url)
        db.migrate()
        app = create_app(settings, backends=Backends.open(settings, db=db))
        with TestClient(app) as client:
            assert client.get("/healthz").status_code == 200
            assert client.get("/openapi.json").status_code == 200
        (engine,) = server.load_engines(settings, 1)
        assert type(engine).__name__ == "EchoEngine"
        loaded = sorted(m for m in {ENGINE_MODULES!r} if m in sys.modules)
        print("loaded:", loaded)
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "loaded: []" in result.stdout, result.stdout


def test_a_model_start_without_the_engine_extra_says_what_to_install(tmp_path: Path) -> None:
    """`serve --model tiny` where torch and diffusers cannot be imported (None in sys.modules
    makes `import torch` raise ModuleNotFoundError, as on an install without the extra)."""
    result = run_python(
        f"""
        import sys

        for name in {ENGINE_MODULES!r}:
            sys.modules[name] = None

        from cogview_api import cli

        sys.exit(cli.main(["serve", "--model", "tiny", "--workers", "1", "--port", "0"]))
        """,
        tmp_path,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("cogview-api: the model 'tiny' needs torch")
    assert 'pip install "cogview-api[engine]"' in lines[0]
