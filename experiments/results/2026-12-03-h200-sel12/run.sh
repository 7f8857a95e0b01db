#!/usr/bin/env bash
# Issue 24, fifteenth session (H200): between select_blocks 8 x 64 (6.0x cuDNN at 131k, but
# perplexity +2.3%) and 16 x 64 (+1.6%, but 4.6x): 12 and 10 runs of 64. The step-3400 131k model
# (carried bf16 params, .carry/) scored at 32k and 131k (4 needles per depth bin, as the
# fourteenth session's eval_r131.json) beside exact, and the attention op at 131k, causal,
# forward and forward+backward, against cuDNN in the same call.
#   run: bash experiments/results/2026-12-03-h200-sel12/run.sh   (carry .carry, .whl; writes $OUT)
set -u
START=$(date +%s)
pip install -q --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
T() { echo "$(date +%T) $*" >> $OUT/timeline.txt; }
T start
python3 -m experiments.lm.params_file import --files='.carry/r131-*.npz' --workdir=/tmp/r131 \
  > $OUT/import.log 2>&1
T imported rc=$?
VARIANTS='{"sel12": {"select_blocks": 12, "select_block_size": 64}, "sel10": {"select_blocks": 10, "select_block_size": 64}}'
timeout 300 python3 -m experiments.lm.eval_retrieval --workdir=/tmp/r131 --out=$OUT/eval_sel12.json \
  --lengths=32768,131072 --ppl_seq_len=32768 --modes=exact,hyper:-1:sel12,hyper:-1:sel10 \
  --variants="$VARIANTS" --samples=4 2>&1 | grep -v "INFO\|^I1\|^W1" > $OUT/eval_sel12.log
T eval rc=$?
B="python3 -m experiments.benchmarks.bench_attention --ns=131072 --causal=true --modes=fwd,fwdbwd --reps=10 --select_block_size=64"
timeout $((START + 560 - $(date +%s))) $B --impls=cudnn,hyper_pallas --select_blocks=12 \
  --out=$OUT/bench_sel12x64.json > $OUT/bench_sel12x64.log 2>&1
T bench sel12 rc=$?
timeout $((START + 580 - $(date +%s))) $B --impls=hyper_pallas --select_blocks=10 \
  --out=$OUT/bench_sel10x64.json > $OUT/bench_sel10x64.log 2>&1
T bench sel10 rc=$?
tail -n 20 $OUT/eval_sel12.log; grep -v "^W\|^I" $OUT/bench_sel1*.log | grep -v wrote
cat $OUT/timeline.txt
