#!/usr/bin/env bash
# Serve a bundle (worker + API on 127.0.0.1) and attack it over HTTP with `dscguard attack`, then stop both.
#
#   examples/serve_and_attack.sh BUNDLE DATA PORT REPORT_DIR
#
# Redis must be running on 127.0.0.1:6379. DSCGUARD_STRATEGY=st (or dsc) serves the bundle behind another defense
# than the one it names. Each run takes a fresh namespace and checkpoint directory, so runs never mix.
set -u
bundle=$1 data=$2 port=$3 out=$4
run=$(mktemp -d "${TMPDIR:-/tmp}/dscguard-example.XXXXXX")
export DSCGUARD_API_KEY="example-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export DSCGUARD_ADMIN_TOKEN="example-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export DSCGUARD_NAMESPACE="example-$(basename "$run")" DSCGUARD_CHECKPOINT_DIR="$run/checkpoints"
export DSCGUARD_WORKER_METRICS_PORT=0 DSCGUARD_TORCH_THREADS=1  # a core for the API and the attacker
dscguard worker --bundle "$bundle" --log-level warning > "$run/worker.log" 2>&1 & worker=$!
dscguard serve --port "$port" --log-level warning > "$run/api.log" 2>&1 & api=$!
trap 'kill $worker $api 2>/dev/null; wait $worker $api 2>/dev/null' EXIT
for _ in $(seq 240); do
  curl -sf "localhost:$port/health/ready" > /dev/null && break
  kill -0 $worker 2>/dev/null || { cat "$run/worker.log"; exit 1; }
  sleep 0.5
done
dscguard attack --target "http://127.0.0.1:$port" --bundle "$bundle" --data "$data" --no-progress --no-plots \
  --out "$out"
