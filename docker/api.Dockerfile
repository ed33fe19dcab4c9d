# syntax=docker/dockerfile:1
# The API image; it also runs `swav-service migrate`. CPU torch on python:3.11-slim: the API
# trains nothing, and its /v1/embeddings forward runs on the CPU (build it from
# worker.Dockerfile instead to give the API a GPU).
#
#   docker build -f docker/api.Dockerfile -t swav-service-api .    # from the repository root
#
# The builder makes /opt/venv the way `make setup` makes .venv (an editable install of the
# project, whose pyproject.toml brings every dependency), except that torch and torchvision
# come first from the CPU wheel index, with pyproject.toml's bounds, so that the project
# install keeps them. tests/e2e/test_deploy.py checks that both Dockerfiles keep to this.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

FROM ${PYTHON_IMAGE} AS builder
ARG TORCH_INDEX_URL
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --upgrade pip
RUN /opt/venv/bin/pip install --index-url "${TORCH_INDEX_URL}" \
        "torch>=2.10,<2.15" "torchvision>=0.25,<0.30"
WORKDIR /app
# The project as the build context holds it; .dockerignore keeps tests, virtualenvs and
# local state out.
COPY . .
# Editable, as in `make setup`: `swav-service migrate` reads alembic.ini and migrations/ next
# to the api package (api/cli.py), which a wheel install into site-packages would leave out.
# SOURCE_DATE_EPOCH makes pip write hash-based .pyc files instead of ones stamped with the
# install time, so a change to the code alone leaves /opt/venv the same bytes and the final
# stage's multi-gigabyte copy of it stays cached (README or pyproject.toml changes still
# alter the project's metadata there).
RUN SOURCE_DATE_EPOCH=315532800 /opt/venv/bin/pip install -e .

FROM ${PYTHON_IMAGE}
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin swav \
 && mkdir -p /data/artifacts \
 && chown -R swav:swav /data
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /app /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SWAV_DATA_DIR=/data
WORKDIR /app
USER swav
EXPOSE 8000
CMD ["swav-service", "api", "--host", "0.0.0.0", "--port", "8000"]
