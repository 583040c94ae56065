# MAD Serve images. Two targets on one Debian bookworm + Python 3.11 base, both installing
# the way the README and CI do (`pip install -c constraints.txt ...`, the same pinned set),
# non-editable and without the dev extra:
#
#   docker build -t mad-serve:gpu .                 # default: CUDA 13 wheels, onnxruntime-gpu, TensorRT 10
#   docker build -t mad-serve:cpu --target cpu .    # onnxruntime (CPU)
#
# No CUDA base image: torch's CUDA 13 build from the package index brings the CUDA runtime,
# cuDNN, cuBLAS and NCCL as pip wheels, onnxruntime-gpu uses those, and TensorRT comes as
# pip wheels too; the host's NVIDIA driver comes in through the NVIDIA Container Toolkit at
# run time. `make docker-test` builds both targets and runs the CPU one (docs/deploy.md).

# Any Debian-based Python 3.11 (what constraints.txt is resolved for) with `python3.11`,
# `groupadd` and `useradd`; scripts/docker-base bootstraps one where no registry is reachable.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ARG MAD_UID=10001
RUN groupadd --system --gid ${MAD_UID} mad \
 && useradd --system --uid ${MAD_UID} --gid mad --home-dir /home/mad --create-home mad \
 && mkdir -p /models /cache \
 && chown mad:mad /models /cache
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

######################################################################## shared dependencies
# torch and the project's other runtime dependencies, pinned, in a layer that both images
# share and that only changes with the dependency list or constraints.txt (not with the
# code or the rest of pyproject.toml).
FROM base AS requirements
COPY pyproject.toml /src/
RUN python3.11 -c "import tomllib; \
        print(*tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
    >/requirements.txt

FROM base AS deps
# Optional, CPU image only: an extra index for torch, e.g. https://download.pytorch.org/whl/cpu,
# to get the CPU-only torch 2.14.1+cpu wheel (several GB smaller; satisfies the torch==2.14.1
# pin). Empty (the default) installs from the package index exactly like CI.
ARG TORCH_INDEX_URL=""
WORKDIR /src
COPY --from=requirements /requirements.txt requirements.txt
COPY constraints.txt ./
RUN python3.11 -m venv /opt/venv \
 && /opt/venv/bin/pip install -q --upgrade pip \
 && /opt/venv/bin/pip install --progress-bar off ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
        -c constraints.txt -r requirements.txt

############################################################################ CPU target
FROM deps AS cpu
COPY pyproject.toml README.md ./
COPY mad/ mad/
COPY model/ model/
COPY runtime/ runtime/
COPY export/ export/
COPY service/ service/
RUN /opt/venv/bin/pip install -q -c constraints.txt ".[onnx,openvino]" \
 && /opt/venv/bin/pip check \
 && /opt/venv/bin/mad --help >/dev/null \
 && rm -rf /src
# The bundled checkpoint (read-only, owned by root). User checkpoints go in /models.
COPY checkpoints/mad-tiny /opt/mad/checkpoints/mad-tiny
ENV PATH=/opt/venv/bin:$PATH \
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
FROM deps AS gpu
# TensorRT's libraries come from NVIDIA's pip index only (see deploy/constraints-gpu.txt);
# where it cannot be reached, `--build-arg GPU_EXTRAS=gpu` builds the image without TensorRT.
ARG GPU_EXTRAS=gpu,tensorrt
COPY deploy/constraints-gpu.txt deploy/constraints-gpu.txt
COPY pyproject.toml README.md ./
COPY mad/ mad/
COPY model/ model/
COPY runtime/ runtime/
COPY export/ export/
COPY service/ service/
RUN /opt/venv/bin/pip install -q -c constraints.txt -c deploy/constraints-gpu.txt ".[${GPU_EXTRAS}]" \
 && /opt/venv/bin/pip check \
 && /opt/venv/bin/mad --help >/dev/null \
 && rm -rf /src
COPY checkpoints/mad-tiny /opt/mad/checkpoints/mad-tiny
ENV PATH=/opt/venv/bin:$PATH \
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
