#!/usr/bin/env bash
# Issue 24, tenth session, call 3: the recipe trained with HyperAttention + select_blocks 4 +
# sinks 16 + band 256 in all layers but the first (call 2, carried as .whl/params_s32/), scored
# exact and in its own mode (its config's hyper settings) at 8k-32k; beside it, the GPU tests
# of the options and of NaN propagation on the compiled kernels (issue 25).
set -u
cd "$(dirname "$0")/../../.."
L=/tmp/logs; mkdir -p $L
T() { echo "$(date +%T) $*" >> $L/timeline.txt; }
T start
python3 -m experiments.lm.params_file import --files='.whl/params_s32/s32-*.npz' --workdir=/tmp/s32 \
  > $L/import.log 2>&1
XLA_PYTHON_CLIENT_MEM_FRACTION=0.4 timeout 230 python3 experiments/eval_retrieval.py --workdir=/tmp/s32 \
  --out=$L/eval_sel_model.json --lengths=8192,16384,32768 --ppl_seq_len=32768 \
  --modes=exact,hyper:-1 --samples=3 2>&1 | grep -v "INFO\|^I1\|^W1" > $L/eval_sel_model.log &
E=$!
XLA_PYTHON_CLIENT_MEM_FRACTION=0.4 timeout 200 python3 -m pytest -q -p no:cacheprovider \
  tests/test_nonfinite.py tests/test_options.py tests/test_cudnn.py > $L/gpu_tests.log 2>&1
T tests done
wait $E; T eval done
nvidia-smi -L > $L/device.txt
tar -cf $OUT/results.tar -C $L .
cat $L/timeline.txt; tail -n 15 $L/eval_sel_model.log; tail -n 8 $L/gpu_tests.log
