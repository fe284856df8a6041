#!/usr/bin/env bash
# The user-module example, end to end (README.md): train, bundle, check, measure in process, serve and attack.
set -euo pipefail
cd "$(dirname "$0")/../.."
run=runs/examples/user_module
rm -rf "$run"  # a fresh run: bundle create writes only into a new or empty directory
python -m dscguard_examples.prepare digits --out $run
dscguard bundle create --model dscguard_examples.nets:digits_cnn \
  --weights $run/online.safetensors --auxiliary $run/auxiliary.safetensors --trusted $run/trusted.npz \
  --classes 10 --mean 0.3063 --std 0.376579 --description "the user's digits CNN" --out $run/bundle
dscguard bundle check $run/bundle
dscguard eval --bundle $run/bundle --data $run/data.npz --strategies st dsc guard --no-progress \
  --out reports/examples/user_module
examples/serve_and_attack.sh $run/bundle $run/data.npz 8701 reports/examples/user_module-http
DSCGUARD_STRATEGY=st examples/serve_and_attack.sh $run/bundle $run/data.npz 8701 reports/examples/user_module-http-st
