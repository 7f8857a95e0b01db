#!/usr/bin/env bash
# Issue 25, seventeenth session (H200, 2026-12-03): time to first token and decode speed of the
# model trained with select_blocks 12 x 64 (its step-3400 params from .carry/s12-*.npz), in its
# own mode (HyperAttention in all layers but the first, its config's options) against exact
# attention (cuDNN) on the same weights, prompts of 32k / 64k / 131k random bytes; then the
# per-kernel GPU time of one 131k prefill in each mode (prof_s12_prefill_{exact,hyper}.json).
#   run: bash experiments/results/2026-12-03-h200-sel12-trained/generate.sh   (carry .whl .carry/s12-*)
set -u
source experiments/results/2026-12-03-h200-sel12-trained/common.sh
T generate call start
timeout $(left) python3 -m experiments.benchmarks.bench_generate --workdir=$W \
  --out=$L/gen_s12_model.json --profile_out=$L/prof_s12_prefill 2>&1 | filter > $L/gen_s12_model.log
T gen rc=${PIPESTATUS[0]}
nvidia-smi -L > $L/device.txt
tar -cf $OUT/generate_logs.tar -C $L .
cat $L/timeline.txt $L/gen_s12_model.log
