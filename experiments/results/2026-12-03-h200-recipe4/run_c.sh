#!/usr/bin/env bash
# Issue 25, fourteenth session, call C (after run_b.sh, same warm machine): time to first token
# and decode tokens/s, exact (cuDNN) vs HyperAttention (select_blocks 8 x 64) in all layers but
# the first: the trained 6-layer 131k model at 32k/64k/131k prompts, then a random 28-layer model
# of the same width at 32k/131k (where layer 0's exact share is small).
#   run: bash experiments/results/2026-12-03-h200-recipe4/run_c.sh   (writes to $OUT)
set -u
START=$(date +%s)
export PYTHONPATH=/tmp/site
L=/tmp/logs; mkdir -p $L
T() { echo "$(date +%T) $*" >> $L/timeline.txt; }
T call C start
SEL="--select_blocks=8 --select_block_size=64"
XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout 300 python3 -m experiments.benchmarks.bench_generate \
  --workdir=/tmp/r131 $SEL --out=$L/gen_r131.json 2>&1 | grep -v "INFO\|^I1\|^W1" > $L/gen_r131.log
T gen trained done
XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $((START + 560 - $(date +%s))) python3 -m experiments.benchmarks.bench_generate \
  --num_layers=28 --prompt_lens=32768,131072 $SEL --out=$L/gen_deep28.json 2>&1 \
  | grep -v "INFO\|^I1\|^W1" > $L/gen_deep28.log
T gen deep done
tar -cf $OUT/results_c.tar -C $L .
cat $L/timeline.txt; tail -n 8 $L/gen_r131.log $L/gen_deep28.log
