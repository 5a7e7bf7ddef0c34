#!/usr/bin/env bash
# The GPU run of issue 4, end to end: full-size CogView4-6B with random bf16 weights, 1024*1024,
# hd (50 steps), stock diffusers against our engine at batch 1, 2 and 4, JSON out.
#
#   bench/gpu_run.sh prepare     # where PyPI is reachable: the wheels a GPU image may lack, in .whl/
#   bench/gpu_run.sh [ARGS...]   # on the GPU machine; ARGS go to bench/engine.py (e.g. --repeats 5)
#
# Python: $PYTHON, else `python3`, when it has a CUDA torch (the lent H100/H200 image's python3
# has torch 2.11+cu130, transformers, tokenizers, safetensors, numpy, pillow, but no diffusers or
# pydantic, and no network). Without a CUDA torch it makes .venv-gpu with one from PyPI (needs
# the network; PyPI's Linux torch wheels are CUDA builds). Wheels in .whl/ (made by `prepare`,
# carried to the machine) are installed into /tmp/cogview-site first; without them, missing
# packages are fetched from PyPI. The project itself runs from src/ (no install).
#
# The JSON goes to $OUT when that is set (the lent machine's folder that comes back), else to
# bench/results/, named engine-full-random-<device>[-$TAG].json, and is rewritten after every
# round. TAG names a variant, e.g. TAG=offload bench/gpu_run.sh --stock-batch none \
#   --set text_encoder=offload
# measures a memory mode (ours alone: such modes move or replace weights stock shares).
set -euo pipefail
cd "$(dirname "$0")/.."

# diffusers' importlib-metadata requirement is for Python < 3.8 only: not carried.
WHEELS=(diffusers==0.42.1 pydantic==2.14.3 pydantic-core==2.50.4
        pydantic-settings==2.16.3 python-dotenv==1.2.4 typing-inspection==0.4.5
        annotated-types==0.8.0 typing-extensions)

if [[ "${1:-}" == prepare ]]; then
    # manylinux x86-64 wheels for CPython 3.12, the GPU image's Python.
    plats=()
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
             manylinux2014_x86_64 manylinux1_x86_64; do plats+=(--platform "$p"); done
    rm -rf .whl && mkdir -p .whl
    "${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${plats[@]}" -d .whl "${WHEELS[@]}"
    ls -l .whl
    exit 0
fi

# ALLOW_CPU=1 (a smoke test of this script, with e.g. --model tiny --device cpu) skips the GPU
# check; WHEEL_DIR names another folder of wheels than .whl.
PY=${PYTHON:-python3}
WHEEL_DIR=${WHEEL_DIR:-.whl}
if [[ "${ALLOW_CPU:-}" != 1 ]] \
    && ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null
then
    echo "no CUDA torch in $PY: making .venv-gpu with torch from PyPI" >&2
    python3 -m venv .venv-gpu
    PY=.venv-gpu/bin/python
    "$PY" -m pip install -q torch==2.13.0 transformers tokenizers safetensors numpy pillow
    "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "torch sees no GPU")'
fi

SITE=/tmp/cogview-site
if compgen -G "$WHEEL_DIR/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$WHEEL_DIR"/*.whl
else
    "$PY" -c 'import diffusers, pydantic_settings' 2>/dev/null \
        || "$PY" -m pip install -q --target "$SITE" "${WHEELS[@]}"
fi
export PYTHONPATH="src:$SITE${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

# Preflight, seconds instead of minutes into a 31 GB build: every package imports, and
# torch.compile works on this GPU (Triton needs a C compiler and Python's headers; without
# them the engine would fall back to eager, which the JSON's config.compiled would then say).
"$PY" -c 'import diffusers, pydantic, pydantic_settings, accelerate, cogview_api.config
import cogview_api.engine.cogview4_fast' || { echo "preflight: a package is missing (see above)" >&2; exit 1; }
if [[ "${ALLOW_CPU:-}" != 1 ]]; then
    "$PY" -c 'import torch; f = torch.compile(lambda x: x * 2 + 1)
print("preflight: torch.compile on CUDA works:", f(torch.ones(4, device="cuda")).tolist())' \
        || echo "preflight: torch.compile FAILED on this GPU; ours will run eagerly" >&2
fi

device=$("$PY" -c 'import torch as t; print(t.cuda.get_device_name() if t.cuda.is_available() else "cpu")')
slug=$(echo "$device" | tr '[:upper:]' '[:lower:]' | sed -e 's/^nvidia //' -e 's/[^a-z0-9]\+/-/g')
slug=$slug${TAG:+-$TAG}
dir=${OUT:-bench/results}
mkdir -p "$dir"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
    --format=csv >"$dir/nvidia-smi-$slug.csv" 2>/dev/null || true
set -o pipefail
"$PY" bench/engine.py --model full-random --size 1024x1024 --quality hd --batch 1,2,4 \
    --stock-batch 1 --warmup 1 --repeats 2 --cache-dir /tmp/cogview-cache \
    --json "$dir/engine-full-random-$slug.json" "$@" 2>&1 | tee "$dir/engine-full-random-$slug.log"
