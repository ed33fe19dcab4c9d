# The stand-in for worker.Dockerfile's UV_IMAGE (ghcr.io/astral-sh/uv) in
# `make compose-test`: the same two files at the root, from PyPI's uv wheel of the same
# minor version, unpacked into this build's context by the driver.
FROM scratch
COPY uv uvx /
