#!/usr/bin/env bash
# Issue 25, eighteenth session, second call (H200, 2026-12-03), with the run-score kernel's
# running max and its new default tiles (64 x 64, 4 warps, 3 stages; call1/tune_op.json):
# (1) the compiled selection and kernel-interface tests, (2) the op at 131k (causal, 32 heads of
# 64, bf16, select_blocks 12 x 64) against cuDNN, (3) time to first token of the random 28-layer
# model at 131k (sel 12 x 64 in all layers but the first, exact = cuDNN), (4) more run-score
# tilings at the model's shape if time is left.
#   run: bash experiments/results/2026-12-03-h200-tune-op/run2.sh   (carry .whl)
set -u
START=$(date +%s)
left() { local s=$((START + ${BUDGET:-565} - $(date +%s))); [ $s -lt 1 ] && s=1; echo $s; }
L=/tmp/logs2; mkdir -p $L
T() { echo "$(date +%T) $*" >> $L/timeline.txt; }
filter() { grep -v "INFO\|^I1\|^W1"; }
test -d /tmp/site || pip install -q --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 PYTHONUNBUFFERED=1
T start
timeout 150 python3 -m pytest -q -x tests/test_pallas_selection.py tests/test_pallas_api.py 2>&1 \
  | tail -n 8 > $L/tests.log
T tests rc=${PIPESTATUS[0]}
timeout $(left) python3 -m experiments.benchmarks.bench_attention --ns=131072 --causal=true \
  --modes=fwd,fwdbwd --reps=10 --impls=cudnn,hyper_pallas --select_blocks=12 \
  --select_block_size=64 --out=$L/bench_sel12x64.json > $L/bench_sel12x64.log 2>&1
T bench rc=$?
timeout $(left) python3 -m experiments.benchmarks.bench_generate --num_layers=28 \
  --prompt_lens=131072 --select_blocks=12 --select_block_size=64 \
  --out=$L/gen_deep28_sel12.json 2>&1 | filter > $L/gen_deep28_sel12.log
T gen rc=${PIPESTATUS[0]}
if [ $(left) -gt 60 ]; then
  timeout $(left) python3 -m experiments.benchmarks.tune_op --n=131072 --heads=8 --kv_heads=4 \
    --select_blocks=12 --select_block_size=64 --reps=10 --out=$L/tune_op2.json \
    --sweep=run_scores:64x64x4x2,run_scores:64x64x4x4,run_scores:32x64x4x3,run_scores:64x32x4x3 \
    2>&1 | filter > $L/tune_op2.log
  T sweep2 rc=${PIPESTATUS[0]}
fi
nvidia-smi -L > $L/device.txt
tar -cf $OUT/logs2.tar -C $L .
cat $L/timeline.txt $L/tests.log $L/gen_deep28_sel12.log
grep -hv "^W\|^I\|wrote" $L/bench_sel12x64.log | tail -n 12
grep "^{" $L/tune_op2.log 2>/dev/null | cut -c1-400
