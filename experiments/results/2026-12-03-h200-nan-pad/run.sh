#!/usr/bin/env bash
# Issue 25, fifteenth session (H200): padding slots (-1 rows) of the Pallas kernels read zeros
# (masked loads where the shapes allow padding; unkept selected rows become -1). The compiled
# NaN-propagation and selection tests, then the kernels before the change (.before/prenan/,
# carried) and after it, alternating in one call, at 131k causal with select_blocks 8 x 64 (the
# selected rows' loads changed) and with the paper's settings (whole blocks: plain loads, as
# before), cuDNN beside.
#   run: bash experiments/results/2026-12-03-h200-nan-pad/run.sh   (carry .before; writes $OUT)
set -u
START=$(date +%s)
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
left() { echo $((START + $1 - $(date +%s))); }
T() { echo "$(date +%T) $*" >> $OUT/timeline.txt; }
T start
timeout 150 python3 -m pytest -q -x tests/test_nonfinite.py tests/test_pallas_selection.py \
  > $OUT/gpu_tests.log 2>&1
T tests rc=$?
tail -n 3 $OUT/gpu_tests.log
ROOT=$PWD
B="python3 -m experiments.benchmarks.bench_attention --ns=131072 --causal=true --modes=fwd,fwdbwd --reps=10"
for tree in before after; do
  if [ $tree = before ]; then cd $ROOT/.before/prenan; else cd $ROOT; fi
  impls=hyper_pallas; [ $tree = after ] && impls=cudnn,hyper_pallas
  timeout $(left 250) $B --impls=$impls --select_blocks=8 --select_block_size=64 \
    --out=$OUT/sel8_$tree.json > $OUT/sel8_$tree.log 2>&1
  T sel8 $tree rc=$?
done
for tree in before after; do
  if [ $tree = before ]; then cd $ROOT/.before/prenan; else cd $ROOT; fi
  timeout $(left 330) $B --impls=hyper_pallas --out=$OUT/paper_$tree.json > $OUT/paper_$tree.log 2>&1
  T paper $tree rc=$?
done
cd $ROOT
grep -v "^W\|^I" $OUT/sel8_*.log $OUT/paper_*.log | grep -v wrote
cat $OUT/timeline.txt
