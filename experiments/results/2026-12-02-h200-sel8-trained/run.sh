#!/usr/bin/env bash
# Issue 24, eleventh session (H200, 2026-12-02): the recipe (retrieval_32k, 1900 steps) trained
# with HyperAttention + select_blocks 8 x 64 in all layers but the first, on the Pallas kernels
# (selection included), then scored exact and in its own mode at 8k-32k with perplexity at 32k.
#   run: bash experiments/results/2026-12-02-h200-sel8-trained/run.sh   (writes to $OUT)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
L=/tmp/logs; mkdir -p $L
T() { echo "$(date +%T) $*" >> $L/timeline.txt; }
T start
XLA_PYTHON_CLIENT_MEM_FRACTION=0.8 timeout 400 python3 -m experiments.lm.main \
  --config=experiments/lm/configs/retrieval_32k.py --workdir=/tmp/s8 --config.attention=hyper \
  --config.hyper_last_layers=5 --config.hyper.select_blocks=8 --config.hyper.select_block_size=64 \
  2>&1 | tr '\r' '\n' | grep -v "INFO\|^I1\|^W1" | awk 'NR%20==1 || /rror|Traceback|{/' > $L/train_sel8.log
T train done
XLA_PYTHON_CLIENT_MEM_FRACTION=0.8 timeout 150 python3 -m experiments.lm.eval_retrieval --workdir=/tmp/s8 \
  --out=$L/eval_sel8_model.json --lengths=8192,16384,32768 --ppl_seq_len=32768 \
  --modes=exact,hyper:-1 --samples=3 2>&1 | grep -v "INFO\|^I1\|^W1" > $L/eval_sel8_model.log
T eval done
cp /tmp/s8/metrics.jsonl $L/metrics_sel8.jsonl
nvidia-smi -L > $L/device.txt
tar -cf $OUT/results.tar -C $L .
cat $L/timeline.txt; tail -n 6 $L/train_sel8.log; tail -n 15 $L/eval_sel8_model.log
