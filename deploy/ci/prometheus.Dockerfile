# CI only (deploy/ci/docker-engine.sh): tagged prom/prometheus:v2.55.1, as docker-compose.yml names it, where
# that image cannot be pulled. Debian's Prometheus 2.42, with the image's entrypoint, user and data directory,
# and wget for the compose healthcheck (the real image has busybox's).
FROM dscguard-ci/debian:bookworm
RUN apt-get update && apt-get install -y --no-install-recommends prometheus wget \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /prometheus && chown nobody:nogroup /prometheus
WORKDIR /prometheus
VOLUME /prometheus
USER nobody
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
