#!/usr/bin/env bash
# The tabular example, end to end (README.md): an MLP on breast-cancer features with per-feature bounds.
set -euo pipefail
cd "$(dirname "$0")/../.."
run=runs/examples/tabular
rm -rf "$run"  # a fresh run: bundle create writes only into a new or empty directory
python -m dscguard_examples.prepare tabular --out $run
dscguard bundle create --model dscguard_examples.nets:tabular_mlp --model-kwargs '{"features": 30, "classes": 2}' \
  --weights $run/online.safetensors --auxiliary $run/auxiliary.safetensors --trusted $run/trusted.npz \
  --classes 2 --class-names malignant,benign --feature-bounds $run/feature_bounds.json --set stream.batch_size=20 \
  --description "the user's MLP on scikit-learn's breast-cancer features" --out $run/bundle
dscguard bundle check $run/bundle
dscguard eval --bundle $run/bundle --data $run/data.npz --strategies st dsc guard --no-progress \
  --out reports/examples/tabular
examples/serve_and_attack.sh $run/bundle $run/data.npz 8703 reports/examples/tabular-http
DSCGUARD_STRATEGY=st examples/serve_and_attack.sh $run/bundle $run/data.npz 8703 reports/examples/tabular-http-st
DSCGUARD_STRATEGY=dsc examples/serve_and_attack.sh $run/bundle $run/data.npz 8703 reports/examples/tabular-http-dsc
