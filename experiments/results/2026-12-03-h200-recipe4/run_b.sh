#!/usr/bin/env bash
# Issue 24, fourteenth session, call B (right after run_a.sh, same warm machine): retrieval_131k
# resumed to step 3400, then the model scored alone on the GPU at 32k and 131k (4 needles per
# depth bin): exact, the paper's HyperAttention and select_blocks 8 x 64 / 16 x 64 in all layers
# but the first (prefill times beside the accuracies), perplexity at 32k; bf16 params exported.
#   run: bash experiments/results/2026-12-03-h200-recipe4/run_b.sh   (writes to $OUT)
set -u
START=$(date +%s)
export PYTHONPATH=/tmp/site
L=/tmp/logs; mkdir -p $L
T() { echo "$(date +%T) $*" >> $L/timeline.txt; }
quiet() { tr '\r' '\n' | grep -v "INFO\|^I1\|^W1" | awk 'NR%20==1 || /rror|Traceback|{/'; }
test -d /tmp/r131 || { echo "no /tmp/r131: the machine is not the one of call A"; exit 3; }
T call B start
XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout -k 30 200 python3 -m experiments.lm.main \
  --config=experiments/lm/configs/retrieval_131k.py --workdir=/tmp/r131 2>&1 | quiet > $L/train_131k_b.log
T train 131k done
cp /tmp/r131/metrics.jsonl $L/metrics_r131.jsonl
VARIANTS='{"sel8": {"select_blocks": 8, "select_block_size": 64}, "sel16": {"select_blocks": 16, "select_block_size": 64}}'
XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $((START + 560 - $(date +%s))) python3 -m experiments.lm.eval_retrieval \
  --workdir=/tmp/r131 --out=$L/eval_r131.json --lengths=32768,131072 --ppl_seq_len=32768 \
  --modes=exact,hyper:-1,hyper:-1:sel8,hyper:-1:sel16 --variants="$VARIANTS" --samples=4 2>&1 \
  | grep -v "INFO\|^I1\|^W1" > $L/eval_r131.log
T eval r131 done
python3 -m experiments.lm.params_file export --workdir=/tmp/r131 --out=$OUT/r131 --parts=3 > $L/export.log 2>&1
T end
tar -cf $OUT/results_b.tar -C $L .
cat $L/timeline.txt; tail -n 4 $L/train_131k_b.log; tail -n 24 $L/eval_r131.log; ls -la $OUT
