#!/usr/bin/env bash
# Issue 25, seventeenth session (H200, 2026-12-03), the session's last device seconds: does the
# sel12-trained model keep its 131k recall with half the samples (sample_size=128, fewer keys per
# query row: a cheaper prefill)? Same probes as call4's own-mode row (seed 0, 4 per depth bin).
#   run: bash experiments/results/2026-12-03-h200-sel12-trained/cheaper.sh   (carry .whl .carry/s12-*)
set -u
source experiments/results/2026-12-03-h200-sel12-trained/common.sh
timeout $(left) python3 -m experiments.lm.eval_retrieval --workdir=$W --out=$OUT/eval_s128.json \
  --lengths=131072 --modes=hyper:-1:s128 --variants='{"s128": {"sample_size": 128}}' \
  --ppl_seq_len=0 --timing_reps=1 --samples=4 2>&1 | filter > $OUT/eval_s128.log
echo rc=${PIPESTATUS[0]} >> $OUT/eval_s128.log
cat $OUT/eval_s128.log
