# The stand-in for worker.Dockerfile's CUDA_IMAGE in `make compose-test` (a CPU worker):
# the CI's Debian Python base, with that Python also where uv keeps the Pythons it
# manages (/opt/python), because `uv python install 3.11` downloads one from GitHub, which
# the CI cannot reach. uv then finds 3.11 installed and makes /opt/venv from it, and the
# final stage's copy of /opt/python resolves to the same interpreter.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN version=$(python3.11 -c 'import platform; print(platform.python_version())') \
 && home=/opt/python/cpython-${version}-linux-x86_64-gnu \
 && mkdir -p "$home/bin" "$home/lib/python3.11" \
 && ln -s /usr/bin/python3.11 "$home/bin/python3.11" \
 && ln -s python3.11 "$home/bin/python3" \
 && ln -s python3.11 "$home/bin/python" \
 && cp /usr/lib/python3.11/_sysconfigdata__x86_64-linux-gnu.py "$home/lib/python3.11/"
