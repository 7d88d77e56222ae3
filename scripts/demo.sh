#!/usr/bin/env bash
# The README's main job: trains the DiT `demo` config on Fashion-MNIST, samples, and evaluates
# FID-FMNIST / IS / precision-recall with jaxgen's offline Fashion-MNIST feature network.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
WORKDIR=${WORKDIR:-workdirs/dit_demo}
.venv/bin/python -m jaxgen.main --config=configs/dit.py:demo --workdir="$WORKDIR" "$@"
# The feature network is trained once (~1.5 min) and cached in the data directory.
.venv/bin/python -m jaxgen.metrics.fmnist_net --if_missing
.venv/bin/python -m jaxgen.main --config=configs/dit.py:demo --workdir="$WORKDIR" --mode=eval \
  --config.eval.metrics=loss,fid,is,pr --config.eval.num_samples=500 "$@"
echo "Results in $WORKDIR: samples/*.png, eval_*.json, metrics.jsonl, TensorBoard events, checkpoints/"
