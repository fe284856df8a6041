# CI only (deploy/ci/docker-engine.sh): the product image's BASE_IMAGE where python:3.11-slim cannot be pulled.
# Debian's Python 3.11 with venv, on the debootstrap base.
FROM dscguard-ci/debian:bookworm
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
CMD ["python3"]
