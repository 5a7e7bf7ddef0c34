#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian/Ubuntu machine, then run them.
# Used as-is by CI (.ci/run). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

# The browser test drives Debian's chromium; never a downloaded browser.
if ! command -v chromium >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
# torch==2.13.0 first, so pip keeps the CPU build instead of pulling the CUDA wheels.
.venv/bin/pip install -q "torch==2.13.0" -e ".[test]"
exec .venv/bin/pytest -q "$@"
