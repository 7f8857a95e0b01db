#!/usr/bin/env bash
# One device call (H200, 2026-12-02, eleventh session): the select_blocks option in the Pallas
# kernels. Compiled tests, then causal 32k/131k forward and forward+backward of cuDNN, the
# paper's HyperAttention and the selection variants (cuDNN in the same call), then a kernel
# profile of the 131k forward with 16 runs of 32.
#   run: bash experiments/results/2026-12-02-h200-selection-pallas/run.sh   (writes to $OUT)
set -u
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
timeout 170 python3 -m pytest -q -x tests/test_pallas_selection.py \
  "tests/test_options.py::test_options_pallas_match_reference" > $OUT/gpu_tests.log 2>&1
tail -3 $OUT/gpu_tests.log
B="python3 -m experiments.benchmarks.bench_attention --ns=32768,131072 --causal=true --modes=fwd,fwdbwd --reps=10"
$B --impls=cudnn,hyper_pallas --out=$OUT/bench_paper.json > $OUT/bench_paper.log 2>&1
$B --impls=hyper_pallas --select_blocks=16 --select_block_size=32 --out=$OUT/bench_sel16x32.json > $OUT/bench_sel16x32.log 2>&1
$B --impls=hyper_pallas --select_blocks=8 --select_block_size=64 --out=$OUT/bench_sel8x64.json > $OUT/bench_sel8x64.log 2>&1
cat $OUT/bench_*.log | grep -v "^W\|^I" | tail -30
python3 -m experiments.benchmarks.profile_kernels --n=131072 --causal --mode=fwd --select_blocks=16 --select_block_size=32 --out=$OUT/profile_sel16x32_fwd.json > $OUT/profile_sel16x32_fwd.log 2>&1
head -30 $OUT/profile_sel16x32_fwd.log
