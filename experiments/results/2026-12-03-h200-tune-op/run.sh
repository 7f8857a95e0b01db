#!/usr/bin/env bash
# Issue 25, eighteenth session (H200, 2026-12-03): the hyper layer of the generation model at
# 131k (causal, 8 query / 4 kv heads of 64, bf16, select_blocks 12 x 64, all else the paper's):
# (1) the run-score kernel before / after its running elementwise max (before: .before/run_scores.py,
# the kernel at HEAD~; default tiles), (2) a tile sweep of the run-score and level-forward kernels
# in the whole op (tune_op.py: per-kernel GPU time, cuDNN in the same process), (3) the compiled
# run-score tests.   run: bash experiments/results/2026-12-03-h200-tune-op/run.sh  (carry .before)
set -u
START=$(date +%s)
left() { local s=$((START + ${BUDGET:-560} - $(date +%s))); [ $s -lt 1 ] && s=1; echo $s; }
L=/tmp/logs; mkdir -p $L
T() { echo "$(date +%T) $*" >> $L/timeline.txt; }
filter() { grep -v "INFO\|^I1\|^W1"; }
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 PYTHONUNBUFFERED=1
S="python3 -m experiments.benchmarks.tune_op --n=131072 --heads=8 --kv_heads=4 --select_blocks=12
  --select_block_size=64 --reps=10"
K=pallas_kernels/triton/run_scores.py
T start
cp $K /tmp/run_scores_new.py && cp .before/run_scores.py $K
timeout $(left) $S --out=$L/tune_before.json 2>&1 | filter > $L/tune_before.log
T before rc=${PIPESTATUS[0]}
cp /tmp/run_scores_new.py $K
SW=run_scores:64x128x4x2,run_scores:128x64x4x2,run_scores:128x128x8x2,run_scores:64x128x8x2
SW=$SW,run_scores:32x128x4x2,run_scores:64x256x8x2,run_scores:64x64x4x3
SW=$SW,blocked_fwd:128x64x4x2,blocked_fwd:128x64x8x2,blocked_fwd:64x128x4x2
SW=$SW,blocked_fwd:64x64x4x3,blocked_fwd:128x64x4x3,blocked_fwd:64x32x4x2,blocked_fwd:128x128x8x2
timeout $(( $(left) - 60 )) $S --out=$L/tune_op.json --sweep=$SW 2>&1 | filter > $L/tune_op.log
T sweep rc=${PIPESTATUS[0]}
timeout $(left) python3 -m pytest -q -m gpu tests/test_pallas_selection.py -k run_scores 2>&1 \
  | tail -n 5 > $L/tests.log
T tests rc=${PIPESTATUS[0]}
nvidia-smi -L > $L/device.txt
tar -cf $OUT/logs.tar -C $L .
cat $L/timeline.txt $L/tests.log
python3 - <<'PY'
import json
for f in ("/tmp/logs/tune_before.json", "/tmp/logs/tune_op.json"):
  try:
    recs = json.load(open(f))["records"]
  except Exception as e:
    print(f, e); continue
  for r in recs:
    t = r.get("tiles") or {}
    km = r.get("kernel_ms", {})
    print(f[10:-5], r.get("field", r["impl"]), "x".join(str(v) for v in t.values()),
          *(f"{k}={v:.3f}" for k, v in km.items()), f"med={r.get('median_ms', 0):.2f}",
          r.get("error", "")[:80])
PY
