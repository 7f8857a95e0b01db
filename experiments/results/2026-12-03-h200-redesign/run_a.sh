#!/usr/bin/env bash
# Issue 26, fifteenth session, call A (H200): the redesign (stage files, plan pytrees, the
# pallas_kernels/triton leaf and backends table) must leave results and times unchanged.
# The compiled GPU test subset, then the same attention sweep (32k and 131k, causal and not,
# forward and forward+backward, cuDNN beside) on the tree before the redesign (.before/, commit
# in .before/COMMIT, carried) and on this tree, alternating, in one call; then select_blocks
# 16 x 64 (issue 24's best option set) against cuDNN.
#   run: bash experiments/results/2026-12-03-h200-redesign/run_a.sh   (carry .before; writes $OUT)
set -u
START=$(date +%s)
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
left() { echo $((START + 570 - $(date +%s))); }
T() { echo "$(date +%T) $*" >> $OUT/timeline.txt; }
T start
# (this step ran without ml_collections and stopped at collection; run_b.sh reran it)
timeout 230 python3 -m pytest -q -m gpu tests > $OUT/gpu_tests.log 2>&1
T gpu tests rc=$?
tail -n 3 $OUT/gpu_tests.log
ARGS="--ns=32768,131072 --causal=true,false --modes=fwd,fwdbwd --reps=10 --impls=cudnn,hyper_pallas"
B="python3 -m experiments.benchmarks.bench_attention $ARGS"
ROOT=$PWD
for tree in after before; do
  if [ $tree = before ]; then cd $ROOT/.before; else cd $ROOT; fi
  timeout $(left) $B --out=$OUT/sweep_$tree.json > $OUT/sweep_$tree.log 2>&1
  T sweep $tree rc=$?
done
cd $ROOT
timeout $(left) python3 -m experiments.benchmarks.bench_attention --ns=131072 --causal=true \
  --modes=fwd,fwdbwd --reps=10 --impls=cudnn,hyper_pallas --select_blocks=16 \
  --select_block_size=64 --out=$OUT/sel16x64.json > $OUT/sel16x64.log 2>&1
T sel16 rc=$?
grep -v "^W\|^I" $OUT/sweep_*.log $OUT/sel16x64.log | grep -v wrote
cat $OUT/timeline.txt
