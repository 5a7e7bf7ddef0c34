# syntax=docker/dockerfile:1
# Two images from one file (docs/deploy.md; compose.yml builds both):
#
#   docker build --target api    -t cogview-api:local .         API replicas and `migrate`
#   docker build --target worker -t cogview-api-worker:local .  one container per GPU
#
# Both install the package with pip, every dependency at the version in constraints.txt (the
# set scripts/test.sh and CI test), on the Python those were tested on (3.11). The API image
# installs the package alone: the API process never imports torch, and without the `engine`
# extra there is none in the image. The worker image adds the `engine` extra over PyPI's Linux
# x86_64 torch wheel, which is the CUDA build (the CUDA libraries come as nvidia-* wheels, so
# the host needs only the NVIDIA driver and the NVIDIA Container Toolkit); torch is named in
# the same command so that pip takes that version. `--build-arg WORKER_EXTRAS=engine,int8`
# adds torchao for COGVIEW_TEXT_ENCODER=int8.
# Not built where it was written (no Docker engine there): see docs/deploy.md.

ARG TORCH_VERSION=2.13.0

FROM python:3.11-slim AS base
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 10001 cogview \
    && mkdir -p /cache \
    && chown cogview /cache
WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY src ./src

FROM base AS api
RUN pip install -c constraints.txt .
USER cogview
ENV COGVIEW_HOST=0.0.0.0 \
    COGVIEW_PORT=8000 \
    COGVIEW_WORKERS=0
EXPOSE 8000
ENTRYPOINT ["cogview-api"]
CMD ["serve", "--workers", "0"]

FROM base AS worker
ARG TORCH_VERSION
ARG WORKER_EXTRAS=engine
RUN pip install -c constraints.txt "torch==${TORCH_VERSION}" ".[${WORKER_EXTRAS}]"
USER cogview
ENV HF_HOME=/cache/huggingface \
    COGVIEW_CACHE_DIR=/cache/cogview
ENTRYPOINT ["cogview-api"]
CMD ["worker", "--device", "cuda:0"]
