# syntax=docker/dockerfile:1
# The worker image: CUDA torch on the CUDA runtime base, for `swav-service worker`.
#
#   docker build -f docker/worker.Dockerfile -t swav-service-worker .    # from the repository root
#
# The base has no Python 3.11 package, so the builder installs a standalone CPython 3.11
# under /opt/python with uv, makes /opt/venv from it, and then installs exactly as
# api.Dockerfile does: torch and torchvision with pyproject.toml's bounds from the CUDA
# wheel index, then the project (editable, as `make setup`). The final stage copies
# /opt/python, /opt/venv and /app onto a fresh base: no uv, pip cache or build layers.
#
# The default wheels are CUDA 13.0 (driver >= 580). For an older driver pick an older
# runtime base and the matching wheel index, e.g. for CUDA 12.8:
#   --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.9
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130

FROM ${UV_IMAGE} AS uv

FROM ${CUDA_IMAGE} AS builder
ARG TORCH_INDEX_URL
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN uv python install 3.11 \
 && uv venv --seed --python 3.11 /opt/venv \
 && /opt/venv/bin/pip install --upgrade pip
RUN /opt/venv/bin/pip install --index-url "${TORCH_INDEX_URL}" \
        "torch>=2.10,<2.15" "torchvision>=0.25,<0.30"
WORKDIR /app
# The project as the build context holds it; .dockerignore keeps tests, virtualenvs and
# local state out.
COPY . .
# Editable, as in `make setup`, with hash-based .pyc files: see api.Dockerfile.
RUN SOURCE_DATE_EPOCH=315532800 /opt/venv/bin/pip install -e .

FROM ${CUDA_IMAGE}
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin swav \
 && mkdir -p /data/artifacts \
 && chown -R swav:swav /data
COPY --from=builder /opt/python /opt/python
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /app /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SWAV_DATA_DIR=/data
WORKDIR /app
USER swav
CMD ["swav-service", "worker", "--queues", "train"]
