#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian/Ubuntu machine, run the static checks
# (ruff, mypy, import-linter), then the tests.
# Used as-is by CI (.ci/run). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages, installed only if missing: chromium for the browser test (never a
# downloaded browser), PostgreSQL's server binaries, from which the tests start a throwaway
# cluster of their own (the package's default cluster is not used), and a C++ compiler with
# Python's headers, with which torch.compile's inductor builds its CPU kernels (the compiled
# engine test), and the Prometheus server with its promtool (the metrics test scrapes real
# processes with it, and promtool checks the shipped config and alert rules).
PACKAGES=()
command -v chromium >/dev/null 2>&1 || PACKAGES+=(chromium)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || PACKAGES+=(postgresql)
command -v g++ >/dev/null 2>&1 || PACKAGES+=(g++)
[ -x /usr/bin/prometheus ] && [ -x /usr/bin/promtool ] || PACKAGES+=(prometheus)
# Node.js and npm: tests/e2e/test_other_clients.py runs the official OpenAI Node SDK (npm
# `openai`, pinned there, installed by the test into the test cache).
command -v node >/dev/null 2>&1 || PACKAGES+=(nodejs)
command -v npm >/dev/null 2>&1 || PACKAGES+=(npm)
python3 -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    || PACKAGES+=(python3-dev)
if [ "${#PACKAGES[@]}" -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${PACKAGES[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
# torch==2.13.0 named in the same command, so pip keeps the CPU build that this machine has
# (and CI's) instead of pulling the CUDA wheels; elsewhere see the README's install section.
# Every other package at the version in constraints.txt, the same set the Dockerfile installs.
.venv/bin/pip install -q "torch==2.13.0" -e ".[engine,test,dev]" -c constraints.txt

# Static checks first, so CI fails on them: lint, formatting, types (pyproject's [tool.mypy]),
# and the layering contracts in .importlinter (a new upward import fails here).
.venv/bin/ruff check src tests bench
.venv/bin/ruff format --check src tests bench
.venv/bin/mypy --strict src
.venv/bin/lint-imports --no-cache

# The PostgreSQL variants of the store tests fail, not skip, when the server is missing.
export COGVIEW_TEST_REQUIRE_PG=1
# In parallel (pytest-xdist): one test process per core, at most 4, each with its own
# PostgreSQL cluster and servers; a module's tests stay together in one process (loadfile), so
# a module's server is started once. `-n 0` after the command runs everything in this process.
WORKERS=$(nproc); [ "$WORKERS" -le 4 ] || WORKERS=4
exec .venv/bin/pytest -q -n "$WORKERS" --dist loadfile "$@"
