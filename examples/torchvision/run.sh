#!/usr/bin/env bash
# The torchvision example, end to end (README.md): train resnet18 at 3x16x16, bundle, check, measure, serve, attack.
set -euo pipefail
cd "$(dirname "$0")/../.."
run=runs/examples/torchvision
rm -rf "$run"  # a fresh run: bundle create writes only into a new or empty directory
python -m dscguard_examples.prepare torchvision --out $run
dscguard bundle create --model torchvision:resnet18 \
  --weights $run/online.safetensors --auxiliary $run/auxiliary.safetensors --trusted $run/trusted.npz \
  --classes 10 --mean 0.3063 0.3063 0.3063 --std 0.319357 0.319357 0.319357 \
  --description "torchvision's resnet18 at 3x16x16 on digits" --out $run/bundle
dscguard bundle check $run/bundle
dscguard eval --bundle $run/bundle --data $run/data.npz --strategies st dsc guard --seeds 0 --no-progress \
  --out reports/examples/torchvision
examples/serve_and_attack.sh $run/bundle $run/data.npz 8702 reports/examples/torchvision-http
