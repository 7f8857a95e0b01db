#!/usr/bin/env bash
# Issue 25, seventeenth session (H200, 2026-12-03): where a HyperAttention prefill layer's time
# goes at 131k (causal forward), at the generation benchmark's shape (8 query heads, 4 kv heads,
# head_dim 64) and at the benchmarks' (32 / 32): per-kernel GPU time of select_blocks 12 x 64 and
# of the paper's settings, and the op against cuDNN in the same call at the model's shape.
#   run: bash experiments/results/2026-12-03-h200-ttft-profile/run.sh
set -u
L=/tmp/logs; mkdir -p $L
P="python3 -m experiments.benchmarks.profile_kernels --n=131072 --causal --mode=fwd --reps=3
  --top=30 --select_block_size=64"
for shape in "model 8 4" "bench 32 32"; do
  set -- $shape
  for sel in 12 0; do
    [ $1 = bench ] && [ $sel = 0 ] && continue
    $P --heads=$2 --kv_heads=$3 --select_blocks=$sel --out=$L/prof_$1_sel$sel.json \
      2>&1 | grep -v "^I1\|^W1" > $L/prof_$1_sel$sel.log
  done
done
python3 -m experiments.benchmarks.bench_attention --ns=131072 --causal=true --modes=fwd --reps=10 \
  --heads=8 --kv_heads=4 --impls=cudnn,hyper_pallas --select_blocks=12 --select_block_size=64 \
  --out=$L/bench_model_sel12.json > $L/bench_model_sel12.log 2>&1
nvidia-smi -L > $L/device.txt
tar -cf $OUT/profile_logs.tar -C $L .
head -n 25 $L/prof_*.log; grep -v "^I1\|^W1" $L/bench_model_sel12.log
