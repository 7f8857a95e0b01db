#!/usr/bin/env bash
# Issue 24, tenth session, call 2 (10-minute limit): the select_blocks option measured.
#   * the exact recipe's model (retrieval_131k's step 2000, carried as .whl/params/r131-*.npz)
#     evaluated exact, with the paper's HyperAttention and with selection variants in all layers
#     but the first, at 8k-32k and at 131k;
#   * beside it, the recipe trained from scratch with HyperAttention + the candidate option set
#     (select_blocks 4, sinks 16, band 256) in all layers but the first (steps < 1100 run at
#     <= 4096 tokens, exact by construction), its params exported for the next call.
set -u
cd "$(dirname "$0")/../../.."
L=/tmp/logs; mkdir -p $L
T() { echo "$(date +%T) $*" >> $L/timeline.txt; }
VARIANTS='{"sel4": {"select_blocks": 4}, "sel4local": {"select_blocks": 4, "sink_size": 16, "local_window": 256}, "sel8": {"select_blocks": 8}, "sel16x32": {"select_blocks": 16, "select_block_size": 32}}'
evalr() {  # limit mem workdir out [flags...]
  local t=$1 m=$2 w=$3 o=$4; shift 4
  XLA_PYTHON_CLIENT_MEM_FRACTION=$m timeout $t python3 experiments/eval_retrieval.py --workdir=$w \
    --out=$L/$o.json --variants="$VARIANTS" "$@" 2>&1 | grep -v "INFO\|^I1\|^W1" > $L/$o.log
}
T start
python3 -m experiments.lm.params_file import --files='.whl/params/r131-*.npz' --workdir=/tmp/r131 \
  > $L/import.log 2>&1
T imported
XLA_PYTHON_CLIENT_MEM_FRACTION=0.35 timeout 530 python3 experiments/train_lm.py \
  --config=experiments/configs/retrieval_32k.py --workdir=/tmp/s32 --config.attention=hyper \
  --config.hyper_last_layers=5 --config.hyper.select_blocks=4 --config.hyper.sink_size=16 \
  --config.hyper.local_window=256 --config.checkpoint_every=100 2>&1 | tr '\r' '\n' \
  | grep -v "INFO\|^I1\|^W1" | awk 'NR%20==1 || /rror|Traceback|{/' > $L/train_sel.log &
TRAIN=$!
evalr 480 0.17 /tmp/r131 eval_exact_model_a --lengths=8192,16384,32768 --ppl_seq_len=32768 \
  --modes=exact,hyper:-1,hyper:-1:sel4 --samples=3 &
E1=$!
evalr 480 0.17 /tmp/r131 eval_exact_model_b --lengths=8192,16384,32768 --ppl_seq_len=32768 \
  --modes=hyper:-1:sel4local,hyper:-1:sel8,hyper:-1:sel16x32 --samples=3 &
E2=$!
evalr 480 0.25 /tmp/r131 eval_exact_model_131k --lengths=131072 --ppl_seq_len=131072 \
  --modes=exact,hyper:-1,hyper:-1:sel4 --samples=2 &
E3=$!
wait $E1 $E2 $E3; T evals done
wait $TRAIN; T train done
python3 -m experiments.lm.params_file export --workdir=/tmp/s32 --out=$OUT/s32 --parts=3 > $L/export.log 2>&1
cp /tmp/s32/metrics.jsonl $L/metrics_s32.jsonl
nvidia-smi -L > $L/device.txt
T end
tar -cf $OUT/results.tar -C $L .
cat $L/timeline.txt; for f in $L/*.log; do echo "== $f"; tail -n 12 $f; done
