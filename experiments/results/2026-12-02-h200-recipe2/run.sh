#!/usr/bin/env bash
# Issue 24, tenth session, call 1 (10-minute limit): the longer retrieval_32k recipe (600 steps
# at 32k) trained alone on the GPU, its params exported, then continued with retrieval_131k
# (100 steps at 131k) while the 32k model is evaluated (exact and the paper's HyperAttention in
# all layers but the first) beside it; the 131k params exported at the end.
set -u
cd "$(dirname "$0")/../../.."
L=/tmp/logs; mkdir -p $L
T() { echo "$(date +%T) $*" >> $L/timeline.txt; }
train() {  # limit workdir config log mem [overrides...]
  local t=$1 w=$2 c=$3 log=$4 m=$5; shift 5
  XLA_PYTHON_CLIENT_MEM_FRACTION=$m timeout $t python3 experiments/train_lm.py --config=$c --workdir=$w "$@" 2>&1 \
    | tr '\r' '\n' | grep -v "INFO\|^I1\|^W1" | awk 'NR%20==1 || /rror|Traceback|{/' > $L/$log
}
T start
train 380 /tmp/r32 experiments/configs/retrieval_32k.py train_exact.log 0.9
T exact done
python3 -m experiments.lm.params_file export --workdir=/tmp/r32 --out=$OUT/r32 --parts=3 > $L/export.log 2>&1
cp -r /tmp/r32 /tmp/r131; rm -rf /tmp/r131/checkpoints/*tmp*
train $((555 - SECONDS)) /tmp/r131 experiments/configs/retrieval_131k.py train_131k.log 0.55 --config.eval_every=2000 &
LONG=$!
XLA_PYTHON_CLIENT_MEM_FRACTION=0.2 timeout $((540 - SECONDS)) python3 experiments/eval_retrieval.py --workdir=/tmp/r32 \
  --out=$L/eval_exact_model.json --lengths=8192,16384,32768 --modes=exact,hyper:-1 --samples=3 2>&1 \
  | grep -v "INFO\|^I1\|^W1" > $L/eval_exact_model.log
T eval done
wait $LONG; T 131k done
python3 -m experiments.lm.params_file export --workdir=/tmp/r131 --out=$OUT/r131 --parts=3 >> $L/export.log 2>&1
cp /tmp/r32/metrics.jsonl $L/metrics_r32.jsonl; cp /tmp/r131/metrics.jsonl $L/metrics_r131.jsonl
nvidia-smi -L > $L/device.txt
T end
tar -cf $OUT/results.tar -C $L .
cat $L/timeline.txt; tail -3 $L/train_exact.log $L/train_131k.log
