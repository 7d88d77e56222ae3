#!/usr/bin/env bash
# The README's main job: trains the DiT `demo` config on Fashion-MNIST, samples, writes results.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
WORKDIR=${WORKDIR:-workdirs/dit_demo}
.venv/bin/python -m jaxgen.main --config=configs/dit.py:demo --workdir="$WORKDIR" "$@"
.venv/bin/python -m jaxgen.main --config=configs/dit.py:demo --workdir="$WORKDIR" --mode=eval "$@"
echo "Results in $WORKDIR: samples/*.png, metrics.jsonl, TensorBoard events, checkpoints/"
