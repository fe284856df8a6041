#!/usr/bin/env bash
# CI only: a Docker engine and the images docker-compose.yml names, on a Debian machine that reaches Debian's
# and PyPI's mirrors but no container registry (tests/test_compose_real.py runs the stack with them).
#
#   deploy/ci/docker-engine.sh start    # install docker.io, docker-compose, debootstrap if missing; start dockerd
#                                       # (no systemd) unless an engine already answers
#   deploy/ci/docker-engine.sh images   # build what cannot be pulled, skip what is cached (see below)
#   deploy/ci/docker-engine.sh stop     # stop the dockerd that `start` started, nothing else
#
# Images, each skipped when its tag carries the hash of the recipe that built it (a rerun on the same machine
# costs seconds):
#   dscguard-ci/debian:bookworm    debootstrap's minbase, imported; trusts the host's extra CA certificates
#                                  (the network here intercepts TLS). Test-only: the product never sees it.
#   dscguard-ci/python:3.11        Debian's python3.11 with venv: the product image's BASE_IMAGE in CI
#   redis:7.4-alpine, prom/prometheus:v2.55.1
#                                  Debian's redis-server (7.0) and prometheus (2.42), tagged under the names
#                                  docker-compose.yml uses; an image of that name that is not ours is left alone
#   dscguard:cpu                   deploy/Dockerfile, offline: from a wheelhouse of pip's (cached in
#                                  $DSCGUARD_CI_CACHE/wheelhouse, hard-linked into deploy/wheelhouse/)
# grafana/grafana cannot be built from Debian's packages: the compose test leaves Grafana out and says so.
set -euo pipefail
cd "$(dirname "$0")/../.."

CACHE=${DSCGUARD_CI_CACHE:-/var/cache/dscguard-ci}
STATE=${DSCGUARD_CI_STATE:-/run/dscguard-ci-engine}
MIRROR=${DSCGUARD_CI_DEBIAN_MIRROR:-http://deb.debian.org/debian}
CI=deploy/ci
sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
log() { echo "docker-engine: $*" >&2; }

engine_answers() { timeout 10 docker info >/dev/null 2>&1; }

start() {
  local missing=()
  command -v dockerd >/dev/null || missing+=(docker.io)
  command -v docker-compose >/dev/null || missing+=(docker-compose)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  if engine_answers; then
    log "an engine already answers: using it (and leaving it running)"
    return 0
  fi
  $sudo mkdir -p "$STATE"
  log "starting dockerd (log: $STATE/dockerd.log)"
  # setsid: its own session, so that nothing sent to CI's process group reaches it; `stop` ends it by its pid
  $sudo setsid dockerd --pidfile "$STATE/dockerd.pid" >"$STATE/dockerd.log" 2>&1 < /dev/null &
  for _ in $(seq 60); do
    engine_answers && { log "dockerd $(cat "$STATE/dockerd.pid") answers"; return 0; }
    sleep 1
  done
  log "dockerd did not answer within 60 s; its log:"; tail -20 "$STATE/dockerd.log" >&2
  stop
  return 1
}

stop() {
  [ -f "$STATE/dockerd.pid" ] || { log "no dockerd of ours to stop"; return 0; }
  local pid; pid=$(cat "$STATE/dockerd.pid")
  if kill -0 "$pid" 2>/dev/null; then
    log "stopping dockerd $pid"
    $sudo kill -TERM "$pid"
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -0 "$pid" 2>/dev/null && { log "dockerd $pid still running after 30 s: SIGKILL"; $sudo kill -KILL "$pid"; }
  fi
  $sudo rm -f "$STATE/dockerd.pid"
}

# recipe_hash FILE...: what an image is rebuilt on
recipe_hash() { cat "$@" | sha256sum | cut -c1-16; }
image_label() { docker image inspect -f '{{ index .Config.Labels "dscguard.ci.recipe" }}' "$1" 2>/dev/null || true; }
fresh() {  # fresh TAG HASH: the tag exists and was built from this recipe
  [ "$(image_label "$1")" = "$2" ]
}
foreign() {  # an image of that name exists and is not one of ours (a real pull): keep it
  docker image inspect "$1" >/dev/null 2>&1 && [ -z "$(image_label "$1")" ]
}

debian_base() {
  local tag=dscguard-ci/debian:bookworm
  local extra_cas=(/usr/local/share/ca-certificates/*.crt)
  [ -e "${extra_cas[0]}" ] || extra_cas=()
  local hash; hash=$(recipe_hash <(declare -f debian_base) ${extra_cas[@]+"${extra_cas[@]}"})
  fresh "$tag" "$hash" && { log "$tag: cached"; return 0; }
  local root; root=$(mktemp -d /var/tmp/dscguard-rootfs.XXXXXX)
  log "$tag: debootstrap --variant=minbase bookworm from $MIRROR"
  nice $sudo debootstrap --variant=minbase --include=ca-certificates bookworm "$root" "$MIRROR" >"$root.log" 2>&1 \
    || { tail -20 "$root.log" >&2; $sudo rm -rf "$root" "$root.log"; return 1; }
  # what Docker's own Debian images do: no service starts inside a build, no apt caches or docs kept
  printf '#!/bin/sh\nexit 101\n' | $sudo tee "$root/usr/sbin/policy-rc.d" >/dev/null
  $sudo chmod 755 "$root/usr/sbin/policy-rc.d"
  printf 'path-exclude /usr/share/doc/*\npath-exclude /usr/share/man/*\npath-exclude /usr/share/locale/*\n' \
    | $sudo tee "$root/etc/dpkg/dpkg.cfg.d/docker-slim" >/dev/null
  printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' \
    | $sudo tee "$root/etc/apt/apt.conf.d/docker-slim" >/dev/null
  printf 'deb %s bookworm main\ndeb %s bookworm-updates main\n' "$MIRROR" "$MIRROR" \
    | $sudo tee "$root/etc/apt/sources.list" >/dev/null
  if ((${#extra_cas[@]})); then
    log "$tag: trusting ${extra_cas[*]}"
    $sudo cp "${extra_cas[@]}" "$root/usr/local/share/ca-certificates/"
    $sudo chroot "$root" update-ca-certificates >/dev/null
  fi
  $sudo rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/usr/share/doc/* "$root"/usr/share/man/*
  $sudo tar -C "$root" --numeric-owner -c . \
    | docker import --change "LABEL dscguard.ci.recipe=$hash" --change 'CMD ["/bin/bash"]' - "$tag" >/dev/null
  $sudo rm -rf "$root" "$root.log"
  log "$tag: imported"
}

# build_ci TAG DOCKERFILE: a test-only image from deploy/ci (its own small context)
build_ci() {
  local tag=$1 dockerfile=$2
  local hash; hash=$(recipe_hash "$dockerfile" <(image_label dscguard-ci/debian:bookworm))
  fresh "$tag" "$hash" && { log "$tag: cached"; return 0; }
  foreign "$tag" && { log "$tag: a real image of that name is here: kept"; return 0; }
  log "$tag: building from $dockerfile"
  nice docker build -q --label "dscguard.ci.recipe=$hash" -f "$dockerfile" -t "$tag" "$CI" >/dev/null
}

# The wheels of the product image: pip (with this machine's configuration: its local wheel cache and mirrors)
# downloads torch, torchvision and everything pyproject.toml needs at the versions constraints.txt pins.
wheelhouse() {
  local hash; hash=$(recipe_hash pyproject.toml constraints.txt <(declare -f wheelhouse))
  local dir="$CACHE/wheelhouse"
  if [ "$(cat "$dir/.recipe" 2>/dev/null)" != "$hash" ]; then
    log "wheelhouse: pip download into $dir"
    # a fresh folder: wheels of an older recipe would linger in the build context
    $sudo rm -rf "$dir" && $sudo mkdir -p "$dir"
    local requirements; requirements=$(mktemp)
    python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
      >"$requirements"
    printf 'torch==2.14.1\ntorchvision==0.29.1\nsetuptools>=68\n' >>"$requirements"
    nice $sudo python3 -m pip download -q --only-binary=:all: -d "$dir" -r "$requirements" -c constraints.txt \
      >"$requirements.log" 2>&1 || { tail -20 "$requirements.log" >&2; return 1; }
    # then the image's own interpreter tops it up: markers are judged by the Python that installs (Debian's
    # 3.11.2 needs async-timeout for redis, this host's newer 3.11 does not); what is here already is not fetched
    # again, the rest comes from PyPI through the base image's CA certificates
    docker run --rm --network bridge -v "$dir:/wheelhouse" -v "$requirements:/build/requirements.txt:ro" \
      -v "$PWD/constraints.txt:/build/constraints.txt:ro" dscguard-ci/python:3.11 sh -c \
      'python3 -m venv /tmp/venv && /tmp/venv/bin/pip download -q --only-binary=:all: --find-links /wheelhouse \
         -d /wheelhouse -r /build/requirements.txt -c /build/constraints.txt' \
      >>"$requirements.log" 2>&1 || { tail -20 "$requirements.log" >&2; return 1; }
    rm -f "$requirements" "$requirements.log"
    echo "$hash" | $sudo tee "$dir/.recipe" >/dev/null
  fi
  # the build context's wheelhouse: hard links (no copy) of the cache, the same filesystem where possible
  find deploy/wheelhouse -maxdepth 1 -name '*.whl' -delete
  cp -l "$dir"/*.whl deploy/wheelhouse/ 2>/dev/null || cp "$dir"/*.whl deploy/wheelhouse/
  log "wheelhouse: $(find deploy/wheelhouse -name '*.whl' | wc -l) wheels, $(du -shL deploy/wheelhouse | cut -f1)"
}

product() {
  local previous; previous=$(docker image inspect -f '{{.Id}}' dscguard:cpu 2>/dev/null || true)
  wheelhouse
  log "dscguard:cpu: docker build (BASE_IMAGE=dscguard-ci/python:3.11, WHEELHOUSE=deploy/wheelhouse, offline)"
  local built=0 output; output=$(mktemp)
  nice docker build -f deploy/Dockerfile -t dscguard:cpu \
    --build-arg BASE_IMAGE=dscguard-ci/python:3.11 --build-arg WHEELHOUSE=deploy/wheelhouse . >"$output" 2>&1 \
    || built=$?
  find deploy/wheelhouse -maxdepth 1 -name '*.whl' -delete
  if [ "$built" -ne 0 ]; then
    tail -30 "$output" >&2; rm -f "$output"
    # an image of older code must not stand in for this checkout's: without the tag the compose test skips
    docker rmi dscguard:cpu >/dev/null 2>&1 || true
    log "dscguard:cpu: docker build failed"; return "$built"
  fi
  # The dependencies stage stays as build cache (the next build reuses it), untagged: once the dependencies change,
  # the stage it replaced (about 9 GB: the wheelhouse and the venv) is removed here, not left to pile up
  local stage; stage=$(awk '/^Step [0-9]+\/[0-9]+ : FROM / && !/ AS dependencies/ {print id; exit}
                            /^ ---> [0-9a-f]+$/ {id = $2}' "$output")
  rm -f "$output"
  local kept="$CACHE/dependencies-stage" replaced; replaced=$(cat "$kept" 2>/dev/null || true)
  if [ -n "$stage" ]; then
    [ -z "$replaced" ] || [ "$replaced" = "$stage" ] || docker rmi "$replaced" >/dev/null 2>&1 || true
    echo "$stage" | $sudo tee "$kept" >/dev/null
  fi
  # the image this build replaced, unless a container still uses it (its layers shared with the new one stay)
  local current; current=$(docker image inspect -f '{{.Id}}' dscguard:cpu)
  [ -z "$previous" ] || [ "$previous" = "$current" ] || docker rmi "$previous" >/dev/null 2>&1 || true
  log "dscguard:cpu: $(docker image inspect -f '{{.Size}}' dscguard:cpu | awk '{printf "%.2f GB", $1 / 1e9}')"
}

images() {
  engine_answers || { log "no engine answers: run '$0 start' first"; return 1; }
  debian_base
  build_ci dscguard-ci/python:3.11 "$CI/python.Dockerfile"
  build_ci redis:7.4-alpine "$CI/redis.Dockerfile"
  build_ci prom/prometheus:v2.55.1 "$CI/prometheus.Dockerfile"
  product
}

case "${1:-}" in
  start) start ;;
  images) images ;;
  stop) stop ;;
  *) echo "usage: $0 start|images|stop" >&2; exit 2 ;;
esac
