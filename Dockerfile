# syntax=docker/dockerfile:1.7
# Two images from one file:
#   docker build --target worker -t pipeq-worker .   pipeq worker on a CUDA base (torch + pipeline)
#   docker build --target api    -t pipeq-api .      no torch: pipeq api, flower, webhooks worker
# Both run as the unprivileged user `pipeq` (uid 10001, numeric in USER so that Kubernetes'
# runAsNonRoot can check it) from a virtualenv in /opt/venv, copied out of a build stage so that
# pip caches and sources stay behind. The worker's Hugging Face downloads go to HF_HOME=/models, a
# volume: a new container reuses the weights instead of fetching them again.
#
# Reproducible: base images by digest (refresh: `docker buildx imagetools inspect IMAGE:TAG`), and
# every Python package at the version requirements/*.txt lock (requirements/lock.sh writes them),
# installed without resolving (`--no-deps`) and then checked whole (`pip check`).

# torch's CUDA wheels bring their own CUDA and cuDNN libraries (nvidia-* wheels), so the worker
# needs from its base only Ubuntu, the driver hooks and NVIDIA_* variables of nvidia/cuda; the
# -cudnn-runtime flavour would add about 3 GB of second copies. Keep the CUDA version of the base
# and of TORCH_INDEX in step: the host driver must support it.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu22.04@sha256:001469ea0f3dec85a1ca929aeea3b58ae369d4c11228b10aec1f642bb6ca7a6f
ARG PYTHON_IMAGE=python:3.11-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7

# ---- pipeq-worker-ping: the health check of every Celery worker container ---------------------
# Healthy when a worker of this container answers a Celery ping through the broker: the process is
# alive, its models are loaded (a GPU worker consumes only once they are warm, hence its long start
# period) and it reaches the broker. The glob keeps other containers' workers from answering.
FROM scratch AS ping
COPY --chmod=755 <<'EOF' /usr/local/bin/pipeq-worker-ping
#!/opt/venv/bin/python
import socket
import sys

from pipeq.config.celery import make_celery
from pipeq.config.settings import Settings

settings = Settings()
if settings.broker_url is None:
    sys.exit("PIPEQ_BROKER_URL is unset: the embedded broker takes no remote ping")
replies = make_celery(settings).control.ping(
    timeout=10.0, limit=1, pattern=f"*@{socket.gethostname()}", matcher="glob"
)
sys.exit(0 if replies else "no pipeq worker of this container answered a ping")
EOF

# ---- worker -------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS cuda-python
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3.11 \
 && rm -rf /var/lib/apt/lists/*

FROM cuda-python AS worker-build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3.11-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the CUDA index that matches the base (with the CUDA libraries of that build);
# the lock leaves torch and those libraries out.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --upgrade pip \
 && pip install --index-url "$TORCH_INDEX" "torch==$TORCH_VERSION"
WORKDIR /src
COPY requirements/worker.txt requirements/
RUN --mount=type=cache,target=/root/.cache/pip pip install --no-deps -r requirements/worker.txt
COPY pyproject.toml README.md ./
COPY config config
COPY core core
COPY producer producer
COPY worker worker
COPY cli cli
RUN pip install --no-deps . && pip check

FROM cuda-python AS worker
# ffmpeg decodes the audio formats libsndfile cannot (worker/decode.py); tesseract-ocr reads
# documents sent without word_boxes (document QA).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ffmpeg tesseract-ocr \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 pipeq \
 && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin pipeq \
 && install -d -o pipeq -g pipeq /models /demo
COPY --from=worker-build /opt/venv /opt/venv
# The real models' registry (docker-compose.yml serves the demo models unless told this one).
COPY config/models.yaml /etc/pipeq/models.yaml
ENV PATH=/opt/venv/bin:$PATH \
    HF_HOME=/models \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
COPY --from=ping /usr/local/bin/pipeq-worker-ping /usr/local/bin/
USER 10001:10001
WORKDIR /home/pipeq
VOLUME /models /demo
HEALTHCHECK --interval=30s --timeout=20s --start-period=10m --retries=3 \
    CMD ["pipeq-worker-ping"]
# One worker process per visible GPU (CUDA_VISIBLE_DEVICES pinned), or one CPU worker if none.
CMD ["pipeq", "worker", "--gpus", "auto"]

# ---- api ----------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS api-build
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# `monitor` is Flower (`pipeq flower`): requirements/api.txt locks the package with it.
COPY requirements/api.txt requirements/
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --upgrade pip \
 && pip install --no-deps -r requirements/api.txt
COPY pyproject.toml README.md ./
COPY config config
COPY core core
COPY producer producer
# worker/ as plain sources: `pipeq webhooks worker` (worker/callbacks.py) runs from this image;
# the GPU modules (and torch) are never imported.
COPY worker worker
COPY cli cli
RUN pip install --no-deps . && pip check

FROM ${PYTHON_IMAGE} AS api
RUN groupadd --gid 10001 pipeq \
 && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin pipeq
COPY --from=api-build /opt/venv /opt/venv
COPY --from=ping /usr/local/bin/pipeq-worker-ping /usr/local/bin/
COPY config/models.yaml /etc/pipeq/models.yaml
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /home/pipeq
EXPOSE 8000
# /healthz answers 200 only when the job store answers (producer/api.py); no curl in slim images.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["pipeq", "api", "--host", "0.0.0.0", "--port", "8000"]
