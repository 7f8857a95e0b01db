#!/usr/bin/env bash
# Issue 24, seventeenth session (H200, 2026-12-03): the op at 131k with select_blocks 16 x 64
# after the kernels' padding fix (its row was timed before it: 33.4 / 125.2 ms, 4.6x), cuDNN in
# the same call; causal, 32 heads of 64, bf16.
#   run: bash experiments/results/2026-12-03-h200-sel16-op/run.sh
set -u
mkdir -p $OUT/sel16
python3 -m experiments.benchmarks.bench_attention --ns=131072 --causal=true --modes=fwd,fwdbwd \
  --reps=10 --impls=cudnn,hyper_pallas --select_blocks=16 --select_block_size=64 \
  --out=$OUT/sel16/bench_sel16x64.json 2>&1 | grep -v "^I1\|^W1" > $OUT/sel16/bench_sel16x64.log
nvidia-smi -L > $OUT/sel16/device.txt
cat $OUT/sel16/bench_sel16x64.log
