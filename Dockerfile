# syntax=docker/dockerfile:1.7
#
# MAD Serve images. Two targets, both installing exactly as the README and CI do
# (`pip install -c constraints.txt ...`, the same pinned set), but non-editable and
# without the dev extra:
#
#   docker build -t mad-serve:gpu .                 # default: CUDA 13 + cuDNN 9, onnxruntime-gpu, TensorRT
#   docker build -t mad-serve:cpu --target cpu .    # python:3.11-slim, onnxruntime (CPU)
#
# onnxruntime-gpu and TensorRT cannot be installed on the CI machines, so they are not in
# constraints.txt; deploy/constraints-gpu.txt pins them (and torch's CUDA wheels) for the
# GPU image. tests/test_deploy_docker.py keeps these install lines and the Makefile's in step.
# See docs/deploy.md.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# CUDA 13.0 matches the cu130 torch wheel, onnxruntime-gpu 1.31 and TensorRT 10 (cu13).
# Needs NVIDIA driver >= 580 on the host; A100 (sm80) and H100 (sm90) are supported.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu22.04

############################################################################ CPU target
FROM ${PYTHON_IMAGE} AS cpu-builder
# Optional: an extra index for torch, e.g. https://download.pytorch.org/whl/cpu, to get the
# CPU-only torch 2.14.1+cpu wheel (several GB smaller; satisfies the torch==2.14.1 pin).
# Empty (the default) installs from PyPI exactly like CI.
ARG TORCH_INDEX_URL=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
RUN python3.11 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY mad/ mad/
COPY model/ model/
COPY runtime/ runtime/
COPY export/ export/
COPY service/ service/
RUN /opt/venv/bin/pip install -q --upgrade pip \
 && /opt/venv/bin/pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
        -c constraints.txt ".[onnx]" \
 && /opt/venv/bin/pip check \
 && /opt/venv/bin/mad --help >/dev/null

FROM ${PYTHON_IMAGE} AS cpu
ARG MAD_UID=10001
RUN groupadd --system --gid ${MAD_UID} mad \
 && useradd --system --uid ${MAD_UID} --gid mad --home-dir /home/mad --create-home mad \
 && mkdir -p /models /cache \
 && chown -R mad:mad /cache
COPY --from=cpu-builder /opt/venv /opt/venv
# The bundled checkpoint (read-only, owned by root). User checkpoints go in /models.
COPY checkpoints/mad-tiny /opt/mad/checkpoints/mad-tiny
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/mad \
    XDG_CACHE_HOME=/cache \
    TORCHINDUCTOR_CACHE_DIR=/cache/inductor \
    MAD_CHECKPOINT=/opt/mad/checkpoints/mad-tiny \
    MAD_BACKEND=torch \
    MAD_DEVICE=cpu \
    MAD_PRECISION=fp32 \
    MAD_HOST=0.0.0.0 \
    MAD_PORT=8000 \
    MAD_WORKERS=1 \
    MAD_CACHE_DIR=/cache \
    MAD_LOG_LEVEL=info
VOLUME ["/models", "/cache"]
USER mad:mad
WORKDIR /home/mad
EXPOSE 8000
# Ready, not just alive: /readyz answers 503 until the model is warmed up and while draining.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('MAD_PORT', '8000'), timeout=4)"
STOPSIGNAL SIGTERM
ENTRYPOINT ["mad", "serve"]

############################################################################ GPU target
# Python 3.11 (what constraints.txt is resolved for) from the deadsnakes PPA; the PPA is
# added in a throwaway stage so software-properties-common stays out of the image.
FROM ${CUDA_IMAGE} AS deadsnakes
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        software-properties-common gpg-agent \
 && add-apt-repository -y ppa:deadsnakes/ppa

FROM ${CUDA_IMAGE} AS gpu-base
COPY --from=deadsnakes /etc/apt/sources.list.d/ /etc/apt/sources.list.d/
COPY --from=deadsnakes /etc/apt/trusted.gpg.d/ /etc/apt/trusted.gpg.d/
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates python3.11 python3.11-venv \
 && rm -rf /var/lib/apt/lists/*

FROM gpu-base AS gpu-builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
RUN python3.11 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY deploy/constraints-gpu.txt deploy/constraints-gpu.txt
COPY mad/ mad/
COPY model/ model/
COPY runtime/ runtime/
COPY export/ export/
COPY service/ service/
RUN /opt/venv/bin/pip install -q --upgrade pip \
 && /opt/venv/bin/pip install -c constraints.txt -c deploy/constraints-gpu.txt ".[gpu,tensorrt]" \
 && /opt/venv/bin/pip check

FROM gpu-base AS gpu
ARG MAD_UID=10001
RUN groupadd --system --gid ${MAD_UID} mad \
 && useradd --system --uid ${MAD_UID} --gid mad --home-dir /home/mad --create-home mad \
 && mkdir -p /models /cache \
 && chown -R mad:mad /cache
COPY --from=gpu-builder /opt/venv /opt/venv
COPY checkpoints/mad-tiny /opt/mad/checkpoints/mad-tiny
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/mad \
    XDG_CACHE_HOME=/cache \
    TORCHINDUCTOR_CACHE_DIR=/cache/inductor \
    TRITON_CACHE_DIR=/cache/triton \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    MAD_CHECKPOINT=/opt/mad/checkpoints/mad-tiny \
    MAD_BACKEND=torch \
    MAD_DEVICE=cuda \
    MAD_PRECISION=bf16 \
    MAD_HOST=0.0.0.0 \
    MAD_PORT=8000 \
    MAD_WORKERS=1 \
    MAD_CACHE_DIR=/cache \
    MAD_LOG_LEVEL=info
VOLUME ["/models", "/cache"]
USER mad:mad
WORKDIR /home/mad
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('MAD_PORT', '8000'), timeout=4)"
STOPSIGNAL SIGTERM
ENTRYPOINT ["mad", "serve"]
