#!/usr/bin/env bash
# Issue 5's cipher point at the paper's model shape, on a GPU of the `device` tool: trains the
# 150M lexinvariant LM (12 x 1024, Adafactor, bf16) on Shakespeare for a short cosine schedule,
# then runs the three evaluations with the paper's probe (final hidden state, 10k steps) and
# the cipher probe on every residual stream. Prepare here with scripts/device/carry.sh, then:
#   device run, carry=[".carry"], timeout_s=600:  bash scripts/device/lexinvariant_cipher.sh
# Knobs (environment): STEPS (2500), BATCH (64), SEQ_LEN (512), TRAIN_S (270: the training is
# stopped by SIGTERM, which checkpoints, so the evaluations always run), BUDGET_S (560: the
# all-layers probe is skipped when it would end later), PROBE_STEPS (10000),
# NUM_SEQUENCES (1000), SET (more --config.x=y flags). Locally, PYTHON=.venv/bin/python
# WHEELS=0 CONFIG=tiny,lexinvariant checks the script in seconds.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
OUT=${OUT:-results/device_cipher}
WD=${WORKDIR:-/tmp/jaxgen_li}
if [ "${WHEELS:-1}" = 1 ]; then
  ls .carry/wheels/*.whl >/dev/null 2>&1 \
    || { echo 'no .carry/wheels: run bash scripts/device/carry.sh here and carry .carry' >&2; exit 2; }
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/jaxgen_site .carry/wheels/*.whl
  export PYTHONPATH=/tmp/jaxgen_site:$PWD JAXGEN_DATA_DIR=$PWD/.carry/tfds
fi
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WD"
start=$(date +%s)
timeout --signal=TERM --kill-after=60 "${TRAIN_S:-270}" $PY -m jaxgen.main \
    --config=configs/lexinvariant.py:"${CONFIG:-150M,lexinvariant}" --workdir="$WD" \
    --config.total_steps="${STEPS:-2500}" --config.batch_size="${BATCH:-64}" \
    --config.data.seq_len="${SEQ_LEN:-512}" --config.model.dtype=bfloat16 \
    --config.log_every=100 --config.checkpoint_every=500 --config.eval_every=1000 \
    --config.sample_every=1000000 --config.progress_bar=False ${SET:-} \
    >"$WD/train.log" 2>&1 || echo "training ended with status $? (124: stopped at TRAIN_S)"
{ grep -v -i warn "$WD/train.log" || true; } | tail -3
$PY - "$WD/metrics.jsonl" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for i in sorted(set(range(0, len(rows), max(1, len(rows) // 16))) | {len(rows) - 2, len(rows) - 1}):
  r = rows[i]
  print('step', r['step'], ' '.join(f'{k}={r[k]:.4g}' for k in ('loss', 'eval/loss', 'steps_per_sec') if k in r))
PYEOF
echo "training: $(( $(date +%s) - start )) s"
evals=(--lexinvariant="$WD" --probe_steps="${PROBE_STEPS:-10000}"
       --num_sequences="${NUM_SEQUENCES:-1000}")
eval_start=$(date +%s)
$PY -m jaxgen.analysis.lexinvariant all "${evals[@]}" --out="$OUT" --probe_layers=final
now=$(date +%s)
if (( now - start + (now - eval_start) > ${BUDGET_S:-560} )); then
  echo "skipping the all-layers probe: it would end past BUDGET_S=${BUDGET_S:-560} s"
  exit 0
fi
depth=$($PY -c "import json; print(json.load(open('$WD/config.json'))['model']['depth'])")
layers=$(seq -s, -f 'block%g' 0 $((depth - 1))),final
$PY -m jaxgen.analysis.lexinvariant cipher "${evals[@]}" --out="$OUT/all_layers" \
    --probe_layers="$layers"
echo "total: $(( $(date +%s) - start )) s; results in $OUT"
