# syntax=docker/dockerfile:1
# Two images from one file (docs/deploy.md; compose.yml builds both):
#
#   docker build --target api    -t cogview-api:local .         API replicas and `migrate`
#   docker build --target worker -t cogview-api-worker:local .  one container per GPU
#
# Both install the package with pip. torch is a dependency of the package, but the API process
# never imports it, so the API image takes the small CPU wheel; the worker image takes PyPI's
# Linux x86_64 wheel, which is the CUDA build (the CUDA libraries come as nvidia-* wheels, so
# the host needs only the NVIDIA driver and the NVIDIA Container Toolkit). torch goes in first
# so that `pip install .` finds it satisfied and keeps that build.
# Not built where it was written (no Docker engine there): see docs/deploy.md.

ARG TORCH_VERSION=2.13.0

FROM python:3.12-slim AS base
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 10001 cogview \
    && mkdir -p /cache \
    && chown cogview /cache
WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src

FROM base AS api
ARG TORCH_VERSION
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}" \
    && pip install .
USER cogview
ENV COGVIEW_HOST=0.0.0.0 \
    COGVIEW_PORT=8000 \
    COGVIEW_WORKERS=0
EXPOSE 8000
ENTRYPOINT ["cogview-api"]
CMD ["serve", "--workers", "0"]

FROM base AS worker
ARG TORCH_VERSION
RUN pip install "torch==${TORCH_VERSION}" \
    && pip install .
USER cogview
ENV HF_HOME=/cache/huggingface \
    COGVIEW_CACHE_DIR=/cache/cogview
ENTRYPOINT ["cogview-api"]
CMD ["worker", "--device", "cuda:0"]
