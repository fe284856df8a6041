# CI only (deploy/ci/docker-engine.sh): tagged redis:7.4-alpine, as docker-compose.yml names it, where that
# image cannot be pulled. Debian's Redis 7.0: what the stack uses (streams, consumer groups, AOF) is in 7.0.
# The official image is built with protected mode off (other containers connect to it without a password, on
# the compose network only); a server started with arguments alone would refuse them, so the entrypoint adds
# --protected-mode no as that build's default.
FROM dscguard-ci/debian:bookworm
RUN apt-get update && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data && chown redis:redis /data \
    && printf '#!/bin/sh\nif [ "$1" = redis-server ]; then shift; exec redis-server --protected-mode no "$@"; fi\nexec "$@"\n' \
        > /usr/local/bin/redis-entrypoint \
    && chmod 755 /usr/local/bin/redis-entrypoint
WORKDIR /data
VOLUME /data
USER redis
EXPOSE 6379
ENTRYPOINT ["/usr/local/bin/redis-entrypoint"]
CMD ["redis-server"]
