#!/usr/bin/env bash
# Second device call (H200, 2026-12-02): after the run-score kernel (pallas_kernels/run_scores.py).
# Compiled tests of the selection kernels, then the same causal 32k/131k sweep as run.sh with
# cuDNN in the same call, and kernel profiles of the 131k forward.
#   run: bash experiments/results/2026-12-02-h200-selection-pallas/run2.sh   (writes to $OUT)
set -u
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
timeout 150 python3 -m pytest -q -x tests/test_pallas_selection.py > $OUT/gpu_tests2.log 2>&1
tail -3 $OUT/gpu_tests2.log
B="python3 -m experiments.benchmarks.bench_attention --ns=32768,131072 --causal=true --modes=fwd,fwdbwd --reps=10"
$B --impls=cudnn,hyper_pallas --select_blocks=8 --select_block_size=64 --out=$OUT/bench2_sel8x64.json > $OUT/bench2_sel8x64.log 2>&1
$B --impls=hyper_pallas --select_blocks=16 --select_block_size=32 --out=$OUT/bench2_sel16x32.json > $OUT/bench2_sel16x32.log 2>&1
$B --impls=hyper_pallas --select_blocks=4 --select_block_size=64 --out=$OUT/bench2_sel4x64.json > $OUT/bench2_sel4x64.log 2>&1
cat $OUT/bench2_*.log | grep -v "^W\|^I" | tail -30
for v in "8 64" "16 32"; do set -- $v
python3 -m experiments.benchmarks.profile_kernels --n=131072 --causal --mode=fwd --select_blocks=$1 --select_block_size=$2 --top=25 --out=$OUT/profile2_sel$1x$2_fwd.json 2>&1 | grep -v "^W\|^I" | head -16
done
