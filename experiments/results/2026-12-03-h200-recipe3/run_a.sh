#!/usr/bin/env bash
# Issue 24, thirteenth session, call A (H200, 2026-12-03): the recipe with 1200 steps at 32k
# (retrieval_32k, 2500 steps) trained exact, scored exact at 8k-32k; then the same workdir
# continued with retrieval_131k (400 steps at 131k) until the call's time is up; SIGTERM makes
# it checkpoint, and call B (run_b.sh) resumes it on the same, still warm machine.
#   run: bash experiments/results/2026-12-03-h200-recipe3/run_a.sh   (writes to $OUT)
set -u
START=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
L=/tmp/logs; mkdir -p $L
T() { echo "$(date +%T) $*" >> $L/timeline.txt; }
quiet() { tr '\r' '\n' | grep -v "INFO\|^I1\|^W1" | awk 'NR%20==1 || /rror|Traceback|{/'; }
T start
XLA_PYTHON_CLIENT_MEM_FRACTION=0.8 timeout -k 30 420 python3 -m experiments.lm.main \
  --config=experiments/lm/configs/retrieval_32k.py --workdir=/tmp/r32 2>&1 | quiet > $L/train_32k.log
T train 32k done
cp /tmp/r32/metrics.jsonl $L/metrics_r32.jsonl
cp -r /tmp/r32 /tmp/r131
LEFT=$((START + 565 - $(date +%s)))
XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 timeout -k 30 $LEFT python3 -m experiments.lm.main \
  --config=experiments/lm/configs/retrieval_131k.py --workdir=/tmp/r131 2>&1 | quiet > $L/train_131k_a.log &
TRAIN=$!
XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 timeout $((LEFT - 10)) python3 -m experiments.lm.eval_retrieval \
  --workdir=/tmp/r32 --out=$L/eval_r32.json --lengths=8192,16384,32768 --ppl_seq_len=32768 \
  --modes=exact --samples=3 2>&1 | grep -v "INFO\|^I1\|^W1" > $L/eval_r32.log
T eval r32 done
wait $TRAIN; T train 131k stopped
nvidia-smi -L > $L/device.txt
tar -cf $OUT/results_a.tar -C $L .
cat $L/timeline.txt; tail -n 4 $L/train_32k.log $L/train_131k_a.log; tail -n 12 $L/eval_r32.log
