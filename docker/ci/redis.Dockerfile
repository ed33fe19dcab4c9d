# Redis for `make compose-test`, where Docker Hub's redis image cannot be pulled: Debian's
# Redis on the CI's Debian base, run like the official image (as the redis user, in /data,
# where docker-compose.yml mounts redisdata and the append-only file is written).
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends redis-server redis-tools \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /data \
 && chown redis:redis /data
WORKDIR /data
USER redis
EXPOSE 6379
CMD ["redis-server"]
